"""Reading the files a user hands us (JSON, safetensors) so that a bad one is one clear error.

A truncated config.json or a corrupted weights file otherwise surfaces as a bare
`json.JSONDecodeError` or `SafetensorError` from deep inside a stage, without the file's name.
These readers raise the package's own error kind instead (the caller picks which: a model's
config.json is a ConfigError, a prepared dataset's meta.json a DataError, weights a
CheckpointError), naming the file, the line and column where JSON went wrong, and what to do.

Also the helpers every writer shares when a write fails or a file may be damaged: the sha256 of a
file, and the disk a path lives on (mount point, device, free space) for a message that says
which disk is full.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil

from .errors import CheckpointError, ConfigError


def _with_fix(message: str, fix: str) -> str:
    return f"{message}; {fix}" if fix else message


def read_json(path: str | os.PathLike, *, error: type = ConfigError, fix: str = ""):
    """The parsed contents of the JSON file `path`. Raises `error` naming the file when it is
    missing, a directory, unreadable, not UTF-8 or not valid JSON (with line:column); `fix`
    says what to do and ends the message."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise error(_with_fix(f"{path}: file not found", fix)) from None
    except IsADirectoryError:
        raise error(_with_fix(f"{path} is a directory, not a JSON file", fix)) from None
    except OSError as e:
        raise error(_with_fix(f"{path}: cannot read it ({e.strerror or e})", fix)) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        message = f"{path}: not UTF-8 text (byte {e.start}), so not JSON"
        raise error(_with_fix(message, fix)) from None
    except json.JSONDecodeError as e:
        # An unterminated string can only end at the end of the file (a raw newline in a string
        # is an error of its own), so it is a cut-off file too.
        cut_short = e.pos >= len(raw.rstrip()) or e.msg.startswith("Unterminated string")
        detail = "the file ends too early (cut short?)" if cut_short else e.msg
        message = f"{path}:{e.lineno}:{e.colno}: invalid JSON: {detail}"
        raise error(_with_fix(message, fix)) from None


def read_json_object(path: str | os.PathLike, *, error: type = ConfigError, fix: str = "") -> dict:
    """`read_json` for files whose top level must be an object (config.json, meta.json)."""
    value = read_json(path, error=error, fix=fix)
    if not isinstance(value, dict):
        raise error(_with_fix(f"{os.fspath(path)}: expected a JSON object at the top level, found "
                              f"{type(value).__name__}", fix))
    return value


_WEIGHTS_FIX = ("the file is truncated or corrupted (an interrupted download or copy?): "
                "fetch or export the checkpoint again")


@contextlib.contextmanager
def open_safetensors(file: str | os.PathLike, device: str = "cpu"):
    """`safetensors.safe_open(file, framework="pt")`, with a file that is not a whole safetensors
    file (truncated, garbage, a directory) raised as CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    file = os.fspath(file)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such safetensors file")
    try:
        handle = safe_open(file, framework="pt", device=device)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                              f"{_WEIGHTS_FIX}") from None
    with handle as opened:
        yield opened


# -- checksums and the disk a write failed on ------------------------------------------------------
_HASH_BLOCK = 1 << 22


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 4 MiB blocks (hashlib releases the GIL on each, so threads
    hashing different files run in parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _device_of(mount: str) -> str:
    try:
        with open("/proc/mounts") as f:
            found = [line.split()[0] for line in f if len(line.split()) > 1
                     and line.split()[1] == mount]
    except OSError:
        return ""
    return found[-1] if found else ""


def disk_usage(path: str | os.PathLike):
    """shutil.disk_usage of the filesystem holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_mount_point(os.fspath(path)))


def describe_disk(path: str | os.PathLike) -> str:
    """'the disk at /mnt/data (/dev/nvme1n1): 12.0 MB free of 1.0 TB': the filesystem holding
    `path`, named as df names it, for messages about a write that failed."""
    mount = _mount_point(os.fspath(path))
    device = _device_of(mount)
    where = f"the disk at {mount}" + (f" ({device})" if device else "")
    try:
        usage = disk_usage(path)
    except OSError:
        return where
    return f"{where}: {human_bytes(usage.free)} free of {human_bytes(usage.total)}"


# A failing write reports "disk full" in several ways: ENOSPC or EDQUOT from the OS, or only
# torch's "[enforce fail at inline_container.cc:...] ... file write failed", which says nothing.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_FREE_BYTES = 64 << 20


def disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether `error`, raised by a write under `path`, means the disk (or the quota) is full:
    by its errno or text anywhere in its chain, or, for errors that do not say (torch's zip
    writer), by the space left on the disk now."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return disk_usage(path).free < _FULL_FREE_BYTES
    except OSError:
        return False


def first_line(error: BaseException) -> str:
    """The error as one short line: its first non-empty line, prefixed by its type."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def refuse_filled_output(out: str | os.PathLike, overwrite: bool) -> None:
    """An `--out` folder that already holds files is refused unless `overwrite` (the caller then
    replaces it only once its own work succeeded, so a failed run keeps the old folder)."""
    out = os.fspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"--out {out} already holds files; pass --overwrite to replace them, or "
                          "choose another folder")
