"""Reading the files a user hands us (JSON, safetensors) so that a bad one is one clear error.

A truncated config.json or a corrupted weights file otherwise surfaces as a bare
`json.JSONDecodeError` or `SafetensorError` from deep inside a stage, without the file's name.
These readers raise the package's own error kind instead (the caller picks which: a model's
config.json is a ConfigError, a prepared dataset's meta.json a DataError, weights a
CheckpointError), naming the file, the line and column where JSON went wrong, and what to do.
"""
from __future__ import annotations

import contextlib
import json
import os

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
