"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

<out_dir>/checkpoints/step_<N>/
    .metadata, __*_*.distcp   model and optimizer, each rank writing its own shards (DCP)
    rank_<r>.pt               what is per rank: loader position, RNG states (tensors and plain
                              Python values only, read back with torch.load(weights_only=True))
    meta.json                 step, world size, elapsed time, the dataset trained on (path,
                              fingerprint), the model ("model": its config.json, dtype, LoRA
                              settings, tokenizer and base folders, for `rega-engine export`),
                              and the size and sha256 of every other file ("files"); written last

A checkpoint is written under `step_<N>.tmp` and renamed by rank 0 after every rank has finished,
so a directory named `step_<N>` is complete by construction and a run killed mid-write leaves only
a `.tmp` directory, which resuming ignores. Single-process runs without a process group use DCP's
no_dist mode: the same files, the same code. A write that fails (a full disk) stops every rank
with one line naming the disk, the folder and the last complete checkpoint.

checkpoint.async = true: DCP's async_save copies each rank's state to host memory (the one pause
of training) and a thread writes it, hashes it and renames it, with the same files and the same
rule (`PendingCheckpoint`); at most one is in flight: the next save, a SIGTERM and the end of the
run wait for it, so only complete step_<N> folders ever appear.

`Checkpointer` is the training run's policy over these files: when to save and how many to keep
(those whose files have their recorded sizes first), whether and from which checkpoint to resume
(the newest whose files match their checksums; rank 0 decides, every rank follows; a damaged one
is named and moved aside), refusing a checkpoint of another dataset or model shape before
anything is loaded, and refusing to start a fresh run over an earlier one's checkpoints.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from rega_engine import distributed
from rega_engine.config import CheckpointConfig
from rega_engine.data.dataset import damaged_dataset_error
from rega_engine.errors import CheckpointError, ConfigError, TrainingError
from rega_engine.files import (
    describe_disk,
    disk_full,
    file_sha256,
    first_line,
    human_bytes,
    read_json_object,
)
from rega_engine.log import get_logger

log = get_logger(__name__)
# DCP warns on every single-process save and load that it assumes a single process: we mean it.
# A filter for the process rather than a catch_warnings block: the background writer's thread
# warns too, and catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

_STEP_DIR = re.compile(r"^step_(\d+)$")
META_FILE = "meta.json"


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; temporary directories are
    skipped."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / META_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def rng_state(device: torch.device) -> dict:
    """Every random generator a step may draw from, in a form torch.load(weights_only=True)
    reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rank_state: dict, *, keep: int,
                    meta: dict | None = None, background: bool = False,
                    group=None) -> Path | PendingCheckpoint:
    """Writes checkpoint `step` (a collective: every rank calls it) and prunes old ones.

    `rank_state` is this rank's own state (loader position, RNG); `meta` goes to meta.json, with
    the size and sha256 of every file (`files`). Returns the final directory. A write that fails
    (a full disk) raises TrainingError on every rank naming the disk, the folder and the last
    complete checkpoint, and leaves no temporary directory behind.

    background: DCP's async_save copies this rank's model and optimizer state to host memory and
    returns at once; the files are written, hashed, completed and renamed by a thread, and a
    PendingCheckpoint is returned (its result() is the final directory, or raises that
    TrainingError). That thread's collectives use `group`, a gloo group of every rank beside
    training's own: two threads must never share a process group, and DCP's async save needs a
    CPU one.
    """
    root = checkpoint_root(out_dir)
    tmp = root / f"step_{step}.tmp"
    write = _Write(out_dir, step, tmp, keep=keep, meta=meta, rank_state=_serialized(rank_state),
                   group=group)
    failure = None
    if distributed.rank() == 0:
        log.info(f"checkpoint: saving step {step} to {root / f'step_{step}'}"
                 f"{' in the background' if background else ''} ...")
        failure = _attempt(lambda: _fresh_directory(root, tmp), root)
    failure = distributed.broadcast_from_rank0(failure)   # also the barrier before writing
    if failure is not None:
        write.fail(failure)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    no_dist = not distributed.is_distributed()
    if not background:
        try:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=no_dist)
        except _DCP_FAILURES as e:   # every rank must reach the gather in finish()
            failure = _failure_text(e, root)
        return write.finish(failure)
    upload = None
    try:   # stages to host memory, then starts DCP's writer thread
        upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group,
                                no_dist=no_dist)
    except _DCP_FAILURES as e:
        failure = _failure_text(e, root)
    # Every rank staged, or all stop here together (a writer already started elsewhere then
    # waits in its group's collectives until that group's timeout, and is abandoned).
    failure = next((f for f in distributed.gather_objects(failure) if f), None)
    if failure is not None:
        write.fail(failure)
    log.debug(f"checkpoint: step {step} staged in {time.perf_counter() - write.started:.2f} s")
    return PendingCheckpoint(step, lambda: write.finish(_upload_failure(upload, root)))


def _upload_failure(upload, root: Path) -> str | None:
    """How DCP's background write ended: None, or its failure in words."""
    try:
        upload.result()
    except _DCP_FAILURES as e:
        return _failure_text(e, root)
    return None


class _Write:
    """One checkpoint's writing after DCP's part, on every rank: the rank file, the sha256 of this
    rank's files, then (rank 0) meta.json and the rename, and pruning; collectives on `group`."""

    def __init__(self, out_dir, step: int, tmp: Path, *, keep: int, meta: dict | None,
                 rank_state: bytes, group):
        self.out_dir, self.step, self.tmp = out_dir, step, tmp
        self.root, self.final = tmp.parent, tmp.parent / f"step_{step}"
        self.keep, self.meta, self.rank_state, self.group = keep, meta, rank_state, group
        self.started = time.perf_counter()

    def finish(self, failure: str | None) -> Path:
        """`failure`: this rank's DCP write failed (its text), else None. Returns the final
        directory on every rank, or raises the TrainingError of `fail` on every rank."""
        rank = distributed.rank()
        files, hash_s = {}, 0.0
        if failure is None:
            try:
                name = f"rank_{rank}.pt"
                _write_durably(self.tmp / name, lambda f: f.write(self.rank_state))
                files[name] = {"bytes": len(self.rank_state),
                               "sha256": hashlib.sha256(self.rank_state).hexdigest()}
                hashed = time.perf_counter()
                files.update(_hash_own_files(self.tmp, rank))
                hash_s = time.perf_counter() - hashed
            except _DCP_FAILURES as e:   # every rank must reach the gather below
                failure = _failure_text(e, self.root)
        gathered = distributed.gather_objects((files, hash_s, failure), self.group)  # a barrier
        failure = next((f for _, _, f in gathered if f), None)
        if failure is None:
            if rank == 0:
                manifest = {name: entry for part, _, _ in gathered for name, entry in part.items()}
                info = {"step": self.step, "world_size": distributed.world_size(),
                        **(self.meta or {}), "files": dict(sorted(manifest.items()))}
                failure = _attempt(lambda: _complete(self.tmp, self.final, info), self.root)
            failure = distributed.broadcast_from_rank0(failure, self.group)
        if failure is not None:
            self.fail(failure)
        if rank == 0:
            if self.keep > 0:
                _prune(self.out_dir, self.keep)
            total = sum(entry["bytes"] for part, _, _ in gathered for entry in part.values())
            log.info(f"checkpoint: saved step {self.step}, {human_bytes(total)} in "
                     f"{time.perf_counter() - self.started:.1f} s (of which sha256 "
                     f"{max(h for _, h, _ in gathered):.1f} s): {self.final}")
        distributed.barrier(self.group)
        return self.final

    def fail(self, failure: str) -> NoReturn:
        """Every rank raises the same TrainingError; rank 0 removes the partial checkpoint."""
        if distributed.rank() == 0:   # the space a partial checkpoint holds is what the next
            shutil.rmtree(self.tmp, ignore_errors=True)   # try needs
        latest = latest_checkpoint(self.out_dir)
        fix = ("free space (or lower checkpoint.keep)" if failure.startswith(_NO_SPACE)
               else "fix what stopped the write")
        raise TrainingError(
            f"checkpoint step {self.step}: writing {self.tmp} failed: {failure}; the partial "
            f"checkpoint was removed; the last complete checkpoint is "
            f"{latest or 'none (no checkpoint yet)'}: {fix}, then run again with --resume")


class PendingCheckpoint:
    """A checkpoint being written in the background (checkpoint.async): a thread runs its
    completion; result() waits for it and returns the final directory or raises its failure.
    The thread is not a daemon: a process that ends while it runs waits for it, so the write
    completes (or fails, leaving only a .tmp folder) rather than being cut off."""

    def __init__(self, step: int, complete):
        self.step = step
        self._path: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(complete,),
                                        name=f"checkpoint-step-{step}")
        self._thread.start()

    def _run(self, complete) -> None:
        try:
            self._path = complete()
        except BaseException as e:   # noqa: BLE001 (handed to whoever waits, on the main thread)
            self._error = e

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._path


def _fresh_directory(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():   # left by a run killed while writing this very step
        shutil.rmtree(tmp)
    tmp.mkdir()


def _complete(tmp: Path, final: Path, info: dict) -> None:
    """meta.json last, then the rename: a directory named step_<N> is complete by construction."""
    _write_durably(tmp / META_FILE, lambda f: f.write(json.dumps(info, indent=2).encode()))
    if final.exists():   # an older run's checkpoint of the same step: this one supersedes it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


# DCP reports failures as a CheckpointException, which derives from BaseException, not Exception.
_DCP_FAILURES = (Exception, dcp.CheckpointException)


def _attempt(action, root: Path) -> str | None:
    """Runs `action` (one rank's part of a collective step); its failure as text, so that every
    rank can be told and raise together instead of waiting for one that has given up."""
    try:
        action()
    except _DCP_FAILURES as e:
        return _failure_text(e, root)
    return None


_NO_SPACE = "no space left on device"


def _failure_text(error: BaseException, root: Path) -> str:
    """A failed write in words: a full disk says so (torch's own message, "enforce fail at
    inline_container.cc", does not), and names the disk."""
    error = _root_error(error)
    reason = _NO_SPACE if disk_full(error, root) else first_line(error)
    return f"{reason} ({describe_disk(root)})"


def _root_error(error: BaseException) -> BaseException:
    """The exception a rank raised inside DCP's CheckpointException (which holds every failed
    rank's exception and traceback as its text)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        first = first[0] if isinstance(first, tuple) else first
        if isinstance(first, BaseException):
            return first
    return error


# -- checksums ---------------------------------------------------------------------------------
# Every file of a checkpoint has its size and sha256 in meta.json ("files"). The rank that wrote a
# file hashes it right after writing it, while it is still in the page cache, so the cost is
# spread over the ranks and never crosses the network: sha256 runs at 0.8 to 1.3 GB/s on one
# core of the 2-core machine this was measured on (shared with other jobs), about 2 GB/s on an idle
# core with SHA-NI. Measured there: a 1.1 GB single-rank checkpoint saved in 6.7 s, of which
# 0.8 s hashing (12%). A resume hashes each file once more (0.9 s for that checkpoint), again
# spread over the ranks, before DCP reads it.
_DCP_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")   # DCP's FileSystemWriter: __<rank>_<n>.distcp
_RANK_FILE = re.compile(r"^rank_\d+\.pt$")


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _serialized(rank_state: dict) -> bytes:
    """rank_<r>.pt's bytes, taken when the save starts (a background write must not see the
    loader positions and RNG states of later steps)."""
    buffer = io.BytesIO()
    torch.save(rank_state, buffer)
    return buffer.getvalue()


def _hash_own_files(directory: Path, rank: int) -> dict:
    """{name: entry} of the DCP files this rank wrote; rank 0 also takes DCP's .metadata and any
    file no rank's name claims (rank_<r>.pt files are hashed by their writer as they are
    written)."""
    entries = {}
    for path in sorted(directory.iterdir()):
        owner = _DCP_FILE.match(path.name)
        mine = (int(owner.group(1)) == rank if owner
                else rank == 0 and not _RANK_FILE.match(path.name) and path.name != META_FILE)
        if mine and path.is_file():
            entries[path.name] = _file_entry(path)
    return entries


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """What is wrong with checkpoint `path` against the sizes and sha256 sums of its meta.json, a
    line per file ([] when it verifies, or when it predates checksums). A collective: every rank
    hashes every world_size-th file and all learn the result."""
    path = Path(path)
    try:
        meta = read_json_object(path / META_FILE, error=CheckpointError)
    except CheckpointError as e:
        return [str(e)]
    files = meta.get("files") or {}
    if not isinstance(files, dict):   # every rank sees this, so every rank returns here
        return [f"{path / META_FILE}: 'files' is {type(files).__name__}, not a table of files"]
    problems = []
    for name in sorted(files)[distributed.rank()::distributed.world_size()]:
        file, entry = path / name, files[name]
        # A meta.json entry that parses but is damaged is this checkpoint's problem, never a
        # traceback: one rank raising here would leave the others waiting in the gather below.
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            problems.append(f"{path / META_FILE}: the entry of {name} is malformed ({entry!r:.80})")
            continue
        try:
            size = file.stat().st_size
            if size != entry["bytes"]:
                cut = " (truncated)" if size < entry["bytes"] else ""
                problems.append(f"{file} is {size} bytes, meta.json says {entry['bytes']}{cut}")
            elif file_sha256(file) != entry["sha256"]:
                problems.append(f"{file}: sha256 differs from meta.json (the file changed after "
                                "it was written)")
        except FileNotFoundError:
            problems.append(f"{file} is missing")
        except OSError as e:
            problems.append(f"{file}: cannot read it ({e.strerror or e})")
    return sorted(p for part in distributed.gather_objects(problems) for p in part)


def _sizes_match(path: Path) -> bool:
    """Whether a checkpoint has checksums and its files the sizes they record: the cheap half of
    checkpoint_problems, for choosing what to keep."""
    try:
        files = json.loads((path / META_FILE).read_text()).get("files")
        return bool(files) and all((path / name).stat().st_size == entry["bytes"]
                                   for name, entry in files.items())
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def _prune(out_dir, keep: int) -> None:
    """Keeps the newest `keep` complete checkpoints, those whose files have their recorded sizes
    before the others: a checkpoint that does not verify never stays at the cost of one that
    does (a full re-hash at each save would cost a read of every kept checkpoint; resume does
    that)."""
    newest_first = [path for _, path in reversed(complete_checkpoints(out_dir))]
    whole = [path for path in newest_first if _sizes_match(path)]
    kept = set((whole + [path for path in newest_first if path not in whole])[:keep])
    for path in newest_first:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _move_aside(path: Path) -> Path:
    """Renames a damaged checkpoint out of the step_<N> names, so that neither a resume nor the
    pruning counts it, and keeps it for a look."""
    target = path.with_name(f"{path.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """meta.json of checkpoint `path`."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {path} is not a complete checkpoint")
    return read_json_object(meta_path, error=CheckpointError,
                            fix="the checkpoint is damaged; resume from an older one")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(meta, this rank's state) of checkpoint `path`, read without loading anything."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    rank = distributed.rank()
    # A rank the saving run did not have reads rank 0's loader positions (the same on every rank)
    # and keeps its own freshly seeded RNG states.
    own = rank < int(meta["world_size"])
    rank_file = path / f"rank_{rank if own else 0}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} not found: the checkpoint {path} is incomplete")
    try:
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 (a damaged file raises anything from pickle to zip)
        raise CheckpointError(f"{rank_file}: cannot be read ({first_line(e)}); the checkpoint is "
                              "damaged: move it aside to resume from an older one") from e
    if not own:
        rank_state.pop("rng", None)
    return meta, rank_state


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *,
                    read: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
    """Loads model and optimizer in place (resharding as needed); returns (meta, this rank's
    state). `read`: what read_checkpoint(path) returned, when the caller has it already."""
    path = Path(path)
    meta, rank_state = read or read_checkpoint(path)
    # Elastic: DCP reshards model and optimizer to this world size, and the loaders' position is
    # the rows of the epoch consumed by all ranks together, so any number of processes resumes.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not distributed.is_distributed())
    except _DCP_FAILURES as e:
        # A checkpoint that verified and matches the model's shapes was checked before; this is
        # one written before checksums existed, damaged.
        raise CheckpointError(f"{path}: DCP cannot read it ({first_line(_root_error(e))}); the "
                              "checkpoint is damaged: move it aside to resume from an older "
                              "one") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return meta, rank_state


def model_shape_mismatch(path: str | os.PathLike, model: torch.nn.Module) -> str | None:
    """How the model tensors of checkpoint `path` (DCP's .metadata) differ from `model`'s, in
    words, or None when names and shapes agree. Reads only the metadata."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception:   # noqa: BLE001 (unreadable: loading says so, naming the checkpoint)
        return None
    saved = {key[len("model."):]: tuple(entry.size)
             for key, entry in metadata.state_dict_metadata.items()
             if key.startswith("model.") and hasattr(entry, "size")}
    current = {key: tuple(value.shape) for key, value in get_model_state_dict(model).items()
               if isinstance(value, torch.Tensor)}
    differ = [(key, saved[key], shape) for key, shape in current.items()
              if key in saved and saved[key] != shape]
    missing = [key for key in current if key not in saved]
    extra = [key for key in saved if key not in current]
    parts = []
    if differ:
        key, there, here = differ[0]
        more = f" ({len(differ)} tensors differ)" if len(differ) > 1 else ""
        parts.append(f"{key} is {list(there)} there and {list(here)} in this model{more}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of this model are not in it ({missing[0]}, ...)")
    if extra:
        parts.append(f"{len(extra)} of its tensors are not in this model ({extra[0]}, ...)")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------------------------
# The run's policy


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: step 0 of a fresh run, or the step of the checkpoint it resumed."""
    step: int = 0
    elapsed_s: float = 0.0       # the training time of the run up to that checkpoint
    path: Path | None = None


class Checkpointer:
    """When one training run saves, how many checkpoints it keeps, and where it resumes from.

    It holds what a checkpoint is made of: the model and optimizer (DCP, sharded) and, per rank,
    the loaders' positions and the RNG states, so that a resumed run continues exactly where the
    checkpoint was taken. Every method is a collective: every rank calls it.
    """

    def __init__(self, out_dir: str | os.PathLike, policy: CheckpointConfig, *, total_steps: int,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loaders: Sequence, device: torch.device, verify_data: bool = False,
                 timeout_s: float | None = None, model_meta: dict | None = None):
        self.out_dir = Path(out_dir)
        self.policy = policy
        self.total_steps = total_steps
        self.model, self.optimizer, self.loaders = model, optimizer, list(loaders)
        self.device = device
        self.verify_data = verify_data   # data.verify: hash the dataset at a resume too
        # What `rega-engine export` needs to rebuild the model from a checkpoint alone (meta.json
        # "model": the Hugging Face config, LoRA settings, dtype, tokenizer and base folders).
        self.model_meta = model_meta
        self._pending: PendingCheckpoint | None = None
        self._group = None
        if policy.async_ and distributed.is_distributed():
            # The background writer's own group (every rank calls new_group, in the same order):
            # gloo, which DCP's async save needs, beside NCCL on GPUs; on CPU beside training's
            # gloo groups, which the writer thread must not share with the main thread.
            self._group = dist.new_group(backend="gloo", timeout=None if timeout_s is None
                                         else timedelta(seconds=timeout_s))

    def resume(self) -> ResumePoint:
        """Loads the newest complete checkpoint when checkpoint.resume is set (a fresh start if
        there is none); refuses a fresh run where an earlier run left checkpoints."""
        earlier = complete_checkpoints(self.out_dir)
        if earlier and not self.policy.resume:
            # A fresh run would interleave its checkpoints with the old ones and prune the wrong
            # ones.
            raise ConfigError(
                f"train.out_dir = {self.out_dir} holds checkpoints of an earlier run (newest: "
                f"{earlier[-1][1]}); pass --resume to continue it, or use another "
                "train.out_dir (or remove its checkpoints/) to start afresh")
        if not self.policy.resume:
            self._verify_data()   # a run's first start hashes its dataset
            return ResumePoint()
        path = self._newest_verified()
        if path is None:
            # A warning: a requeued job passes --resume every time, and a folder that moved
            # (a config's relative paths resolve against its own folder) starts over here.
            log.warning(f"--resume: no complete checkpoint in {checkpoint_root(self.out_dir)}; "
                        "starting from step 0")
            self._verify_data()
            return ResumePoint()
        point = self._load(path)
        # At train.steps exactly, the run only has its export left (the loop does it): a run
        # stopped between its last checkpoint and its export can still be finished.
        if point.step > self.total_steps:
            raise TrainingError(f"{path} is at step {point.step}, past train.steps = "
                                f"{self.total_steps}: nothing to do; raise --train.steps to "
                                "train further")
        return point

    def due(self, step: int) -> bool:
        """Whether the policy saves after `step`: every checkpoint.every steps and at the last."""
        every = self.policy.every
        return bool(every) and (step % every == 0 or step == self.total_steps)

    def save(self, step: int, *, elapsed_s: float, wait: bool = False) -> Path | None:
        """Saves checkpoint `step`; returns its directory. With checkpoint.async the write goes on
        in the background and None is returned (`wait`: unless the caller needs it complete now,
        as a SIGTERM does). Waits first for a save still in flight: one at a time."""
        self.wait()
        rank_state = {"step": step, "loaders": [loader.state_dict() for loader in self.loaders],
                      "rng": rng_state(self.device)}
        meta = {"elapsed_s": elapsed_s, "steps": self.total_steps}
        if self.model_meta is not None:
            meta["model"] = self.model_meta
        dataset = self._dataset()
        if dataset is not None:   # what a resume checks it continues on
            meta["dataset"] = {"path": str(dataset.path), "fingerprint": dataset.fingerprint,
                               "samples": len(dataset), "tokens": dataset.num_tokens}
        saved = save_checkpoint(self.out_dir, step, self.model, self.optimizer, rank_state,
                                keep=self.policy.keep, meta=meta, background=self.policy.async_,
                                group=self._group)
        if isinstance(saved, PendingCheckpoint):
            self._pending = saved
            return self.wait() if wait else None
        return saved

    @property
    def writing_step(self) -> int | None:
        """The step of the checkpoint being written in the background now, None when none is."""
        pending = self._pending
        return pending.step if pending is not None and pending.running else None

    def wait(self) -> Path | None:
        """Waits for the checkpoint in flight, if any; its directory (or its TrainingError, also
        that of a write that has already ended)."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self, *, wait: bool = True) -> None:
        """At the end of a run that failed: lets a checkpoint in flight complete (it is a valid
        one of an earlier step) and logs, rather than raises, its own failure. wait=False when a
        rank is lost: its writer would wait for that rank in vain; it is left to fail on its
        group's timeout, leaving only a .tmp folder."""
        if not wait:
            self._pending = None
            return
        try:
            self.wait()
        except Exception as error:   # noqa: BLE001 (the run's own error is the one to raise)
            log.warning(f"the checkpoint written in the background failed too: {error}")

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def _dataset(self):
        return getattr(self.loaders[0], "dataset", None) if self.loaders else None

    def _newest_verified(self) -> Path | None:
        """The newest complete checkpoint whose files match their checksums. Rank 0 lists, every
        rank hashes a share of each candidate, all take the same decision: ranks must never load
        different steps. A damaged checkpoint is named with what is wrong, moved aside
        (step_<N>.damaged) and skipped; when none is left, the resume stops."""
        listed = distributed.broadcast_from_rank0(
            [str(path) for _, path in complete_checkpoints(self.out_dir)]
            if distributed.rank() == 0 else None)
        damaged = []
        for path in map(Path, reversed(listed)):
            problems = checkpoint_problems(path)
            if not problems:
                if distributed.rank() == 0 and not _sizes_match(path):
                    log.info(f"--resume: {path} was written without checksums (an earlier "
                             "version): its files cannot be verified")
                return path
            if distributed.rank() == 0:
                aside = _move_aside(path)
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                log.warning(f"--resume: skipping {path}: {problems[0]}{more}; it is damaged, "
                            f"moved to {aside.name}; trying the next older checkpoint")
            damaged.append(path.name)
            distributed.barrier()
        if damaged:
            raise CheckpointError(
                f"--resume: every checkpoint in {checkpoint_root(self.out_dir)} is damaged "
                f"({', '.join(damaged)}; each moved aside as <name>.damaged): nothing to resume "
                "from; run again without --resume to start from step 0")
        return None

    def _load(self, path: Path) -> ResumePoint:
        read = read_checkpoint(path)
        states = self._loader_states(read[1])
        self._check_resumable(path, read[0], states)   # before any state is touched
        if self.verify_data:
            self._verify_data()
        meta, rank_state = load_checkpoint(path, self.model, self.optimizer, read=read)
        for loader, state in zip(self.loaders, states, strict=True):
            loader.load_state_dict(state)
        if int(meta["world_size"]) != distributed.world_size():
            log.info(f"elastic resume: {path} was written by {meta['world_size']} process(es), "
                     f"this run has {distributed.world_size()}; model and optimizer resharded, the "
                     f"data continues at row {self.loaders[0].rows_consumed} of epoch "
                     f"{self.loaders[0].epoch}")
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"], self.device)
        return ResumePoint(step=int(meta["step"]), elapsed_s=float(meta.get("elapsed_s", 0.0)),
                           path=path)

    def _loader_states(self, rank_state: dict) -> list[dict]:
        states = rank_state["loaders"]
        if len(states) != len(self.loaders) and len({json.dumps(s,
            sort_keys=True) for s in states}) == 1:
            states = states[:1] * len(self.loaders)   # global positions: one serves every loader
        if len(states) != len(self.loaders):
            raise CheckpointError(f"--resume: the checkpoint holds {len(states)} loader positions, "
                                  f"this run reads {len(self.loaders)}")
        return states

    def _check_resumable(self, path: Path, meta: dict, states: list[dict]) -> None:
        """Refuses, in one line, a checkpoint of another run: trained on another dataset, with
        other data settings, or of another model shape. Reads only meta.json, the rank file and
        DCP's metadata, so that nothing is loaded into the model, optimizer or loaders first."""
        what_to_do = "or start a new run in another train.out_dir"
        saved, dataset = meta.get("dataset"), self._dataset()
        if saved and dataset is not None and saved.get("fingerprint") != dataset.fingerprint:
            raise CheckpointError(
                f"--resume: {path} was trained on the dataset {saved.get('path')} (fingerprint "
                f"{str(saved.get('fingerprint'))[:12]}, {saved.get('samples')} samples), but "
                f"data.prepared = {dataset.path} holds another one (fingerprint "
                f"{dataset.fingerprint[:12]}, {len(dataset)} samples): resume with "
                f"--data.prepared={saved.get('path')} (the run's own dataset), {what_to_do}")
        for loader, state in zip(self.loaders, states):
            for key, was, now in loader.state_mismatches(state)[:1]:
                what = (f"{was} samples in data.prepared, this run has {now}"
                        if key == "num_samples" else
                        f"{'data.seq_len' if key == 'seq_len' else f'the loader {key}'} = "
                        f"{was}, this run has {now}")
                raise CheckpointError(
                    f"--resume: {path} was saved with {what} (data.prepared = "
                    f"{getattr(dataset, 'path', '?')}): resume with the dataset and data settings "
                    f"the run started with, {what_to_do}")
        mismatch = model_shape_mismatch(path, self.model)
        if mismatch:
            raise CheckpointError(
                f"--resume: {path} holds a model of another shape: {mismatch}; resume with the "
                "model the run started with (model.init_config or model.path, and lora), "
                f"{what_to_do}")

    def _verify_data(self) -> None:
        """Hashes the dataset's files against the sha256 sums of its index, each rank a share of
        the files (see rega_engine.data.dataset for the cost), before the first step."""
        dataset = self._dataset()
        files = dataset.checksummed_files() if dataset is not None else []
        if not files:   # format 1 has no sums; its sizes were checked when it was opened
            return
        started = time.perf_counter()
        problems = dataset.damaged_files(distributed.rank(), distributed.world_size())
        problems = sorted(p for part in distributed.gather_objects(problems) for p in part)
        if problems:
            raise damaged_dataset_error(problems)
        size = sum(file.stat().st_size for file, _ in files)
        log.info(f"data: the {len(files)} files of {dataset.path} ({human_bytes(size)}) match "
                 f"the sha256 sums of its meta.json ({time.perf_counter() - started:.1f} s)")


# --------------------------------------------------------------------------------------------
# File helpers


def _write_durably(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable (a crash right after must not bring the .tmp name back).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
