"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

<out_dir>/checkpoints/step_<N>/
    .metadata, __*_*.distcp   model and optimizer, each rank writing its own shards (DCP)
    rank_<r>.pt               what is per rank: loader position, RNG states (tensors and plain
                              Python values only, read back with torch.load(weights_only=True))
    meta.json                 step, world size, elapsed time; written last

A checkpoint is written under `step_<N>.tmp` and renamed by rank 0 after every rank has finished,
so a directory named `step_<N>` is complete by construction and a run killed mid-write leaves only
a `.tmp` directory, which resuming ignores. Single-process runs without a process group use DCP's
no_dist mode: the same files, the same code.

`Checkpointer` is the training run's policy over these files: when to save and how many to keep,
whether and from which checkpoint to resume (rank 0 decides, every rank follows), and refusing
to start a fresh run over an earlier one's checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rega_engine import distributed
from rega_engine.config import CheckpointConfig
from rega_engine.errors import TrainingError
from rega_engine.log import get_logger

log = get_logger(__name__)

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
                    meta: dict | None = None) -> Path:
    """Writes checkpoint `step` (a collective: every rank calls it) and prunes old ones.

    `rank_state` is this rank's own state (loader position, RNG); `meta` goes to meta.json.
    Returns the final directory.
    """
    root = checkpoint_root(out_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    rank = distributed.rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():   # left by a run killed while writing this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()

    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp),
                 no_dist=not distributed.is_distributed())
    _write_durably(tmp / f"rank_{rank}.pt", lambda f: torch.save(rank_state, f))
    distributed.barrier()
    if rank == 0:
        info = {"step": step, "world_size": distributed.world_size(), **(meta or {})}
        _write_durably(tmp / META_FILE, lambda f: f.write(json.dumps(info, indent=2).encode()))
        if final.exists():   # an older run's checkpoint of the same step: this one supersedes it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep > 0:
            for _, old in complete_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Loads model and optimizer in place (resharding as needed); returns (meta, this rank's
    state)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {path} is not a complete checkpoint")
    meta = json.loads(meta_path.read_text())
    # Elastic: DCP reshards model and optimizer to this world size, and the loaders' position is
    # the rows of the epoch consumed by all ranks together, so any number of processes resumes.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not distributed.is_distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rank = distributed.rank()
    # A rank the saving run did not have reads rank 0's loader positions (the same on every rank)
    # and keeps its own freshly seeded RNG states.
    own = rank < int(meta["world_size"])
    rank_file = path / f"rank_{rank if own else 0}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} not found: the checkpoint {path} is incomplete")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    if not own:
        rank_state.pop("rng", None)
    return meta, rank_state


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
                 loaders: Sequence, device: torch.device):
        self.out_dir = Path(out_dir)
        self.policy = policy
        self.total_steps = total_steps
        self.model, self.optimizer, self.loaders = model, optimizer, list(loaders)
        self.device = device

    def resume(self) -> ResumePoint:
        """Loads the newest complete checkpoint when checkpoint.resume is set (a fresh start if
        there is none); refuses a fresh run where an earlier run left checkpoints."""
        earlier = complete_checkpoints(self.out_dir)
        if earlier and not self.policy.resume:
            # A fresh run would interleave its checkpoints with the old ones and prune the wrong
            # ones.
            raise TrainingError(
                f"train.out_dir = {self.out_dir} holds checkpoints of an earlier run (newest: "
                f"{earlier[-1][1]}); pass --resume to continue it, or use another "
                "train.out_dir (or remove its checkpoints/) to start afresh")
        if not self.policy.resume:
            return ResumePoint()
        path = self._newest_agreed()
        if path is None:
            log.info(f"--resume: no complete checkpoint in {checkpoint_root(self.out_dir)}; "
                     "starting from step 0")
            return ResumePoint()
        point = self._load(path)
        if point.step >= self.total_steps:
            raise TrainingError(f"{path} is at step {point.step}, train.steps = "
                                f"{self.total_steps}: nothing to do; raise --train.steps to "
                                "train further")
        return point

    def due(self, step: int) -> bool:
        """Whether the policy saves after `step`: every checkpoint.every steps and at the last."""
        every = self.policy.every
        return bool(every) and (step % every == 0 or step == self.total_steps)

    def save(self, step: int, *, elapsed_s: float) -> Path:
        rank_state = {"step": step, "loaders": [loader.state_dict() for loader in self.loaders],
                      "rng": rng_state(self.device)}
        return save_checkpoint(self.out_dir, step, self.model, self.optimizer, rank_state,
                               keep=self.policy.keep,
                               meta={"elapsed_s": elapsed_s, "steps": self.total_steps})

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def _newest_agreed(self) -> Path | None:
        """Rank 0 chooses, everyone follows: ranks must never load different steps."""
        path = latest_checkpoint(self.out_dir) if distributed.rank() == 0 else None
        chosen = distributed.broadcast_from_rank0(None if path is None else str(path))
        return None if chosen is None else Path(chosen)

    def _load(self, path: Path) -> ResumePoint:
        meta, rank_state = load_checkpoint(path, self.model, self.optimizer)
        states = rank_state["loaders"]
        if len(states) != len(self.loaders) and len({json.dumps(s,
            sort_keys=True) for s in states}) == 1:
            states = states[:1] * len(self.loaders)   # global positions: one serves every loader
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


# --------------------------------------------------------------------------------------------
# File helpers


@contextmanager
def _quiet_single_process():
    # DCP warns on every single-process save/load that it assumes a single process: we mean it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
