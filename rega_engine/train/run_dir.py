"""What a training run's folder (train.out_dir) holds beyond checkpoints, and who may write it.

  run.lock        held (flock) by the run writing the folder; says its host, pid and start time.
                  Removed at a clean exit: a lock file that no process holds is what a crashed or
                  killed run leaves, and the next run says so and takes over.
  preempted.json  written after the checkpoint of a SIGTERM is complete, removed when a run
                  starts: the "pre-empted, resume me" status that survives torchrun, which exits
                  1 whatever its workers' status (docs/many-gpus.md: requeue recipe).

`claim` is called once per run, by every rank after the process group exists; rank 0 decides
(the lock, and whether the folder's earlier outputs may be replaced) and every rank raises the
same error, so a refused torchrun job stops on every rank before anything is written. One lock
per job, taken by global rank 0 only: a run's folder must be on a filesystem every node sees (its
ranks write one checkpoint together), so another job's rank 0 meets the same lock file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from rega_engine import distributed
from rega_engine.errors import ConfigError, TrainingError
from rega_engine.log import get_logger

log = get_logger(__name__)

LOCK_FILE = "run.lock"
PREEMPTED_FILE = "preempted.json"
# What a finished run leaves, and what --train.overwrite=true removes (with checkpoints/). The
# eval files are eval.output's default place (<train.out_dir>/eval.json).
_REPLACED = ("hf", "hf_adapter", "hf_base", "eval.json", "eval.predictions.jsonl", "log.jsonl",
             "loss_curves.png", "tensorboard", "profile", "checkpoints", PREEMPTED_FILE)
# flock's "not on this filesystem" answers (Lustre mounted without -o flock, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class RunLock:
    path: Path
    fd: int | None                  # None where the filesystem has no locks
    created: tuple[Path, ...] = ()  # folders this run made, deepest first

    def release(self) -> None:
        """A clean exit: the lock file goes (removed while still held, so that a run which
        opened it meanwhile sees it is gone: lock_out_dir), and so do the folders the run made
        if nothing else was written there (a run refused at set-up leaves no trace)."""
        if self.fd is not None:
            import fcntl
            try:
                self.path.unlink(missing_ok=True)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:   # not empty: the run's outputs stay
                break


def _holder_text(record: dict) -> str:
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started "
            f"{record.get('started', '?')}")


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def lock_out_dir(out_dir: str | os.PathLike) -> RunLock:
    """An exclusive lock on the run's folder, or ConfigError naming the run that holds it."""
    import fcntl

    out_dir = Path(out_dir)
    created = []
    folder = out_dir.absolute()
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    path = out_dir / LOCK_FILE
    while True:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:   # a run refused at set-up removed its empty folder meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno in _NO_LOCKS:
                if holder is None:   # the empty file this call just made
                    path.unlink(missing_ok=True)
                log.warning(f"{path}: the filesystem does not support locks ({error.strerror}); "
                            "a second run started in this train.out_dir would not be refused")
                return RunLock(path, None, tuple(created))
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            break
        # Locked, but the file may be one a finishing run removed after we opened it: only the
        # file still at the path counts.
        try:
            at_path = os.stat(path)
        except FileNotFoundError:
            at_path = None
        mine = os.fstat(fd)
        if at_path is not None and (at_path.st_ino, at_path.st_dev) == (mine.st_ino,
                                                                        mine.st_dev):
            return _take(fd, path, tuple(created))
        os.close(fd)
    who = _holder_text(holder) if holder else "a run that is just starting"
    # Exit 2 (docs/pipeline.md "Exit status"): the command as given cannot run; a requeue script
    # must not retry it into the running job's folder.
    raise ConfigError(f"train.out_dir = {out_dir} is in use by another run ({who}; lock "
                      f"{path}); wait for it to end or stop it, or give this run another "
                      "train.out_dir")


def _take(fd: int, path: Path, created: tuple[Path, ...]) -> RunLock:
    """The lock is ours: say if a crashed run left its record, then write ours."""
    previous = _read_holder(fd)
    if previous is not None:
        log.info(f"note: the run before ({_holder_text(previous)}) did not end cleanly (killed or "
                 f"crashed; {path} still names it); this run takes the folder over")
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
    return RunLock(path, fd, created)


def _log_completed(path: Path) -> bool:
    """log.jsonl's last record is the last step of its run (records name train.steps as
    total_steps; a log without them, from an older version, is not counted)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue   # a line cut short by a kill
        return isinstance(record, dict) and record.get("step", 0) >= record.get("total_steps",
                                                                                 float("inf"))
    return False


def finished_outputs(out_dir: str | os.PathLike) -> list[str]:
    """The outputs of a finished run in out_dir: the export (hf/, hf_adapter/), eval.json, a
    completed log.jsonl."""
    out_dir = Path(out_dir)
    found = [f"{name}/" for name in ("hf", "hf_adapter")
             if (out_dir / name).is_dir() and any((out_dir / name).iterdir())]
    if (out_dir / "eval.json").is_file():
        found.append("eval.json")
    if _log_completed(out_dir / "log.jsonl"):
        found.append("log.jsonl of a completed run")
    return found


def _remove(target: Path) -> None:
    """Removes a replaced output. A link to a folder elsewhere (checkpoints/ on a scratch disk)
    keeps the link and loses what it points at's contents: the user's layout stays."""
    if target.is_symlink() and target.is_dir():
        for child in target.iterdir():
            _remove(child)
    elif target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def _decide(out_dir: Path, *, resume: bool, overwrite: bool) -> tuple[str, str] | None:
    """Rank 0: (error kind, message) when the run may not start in out_dir, else None (having
    removed what --train.overwrite=true replaces)."""
    from rega_engine.train.checkpoint import complete_checkpoints

    if resume and overwrite:
        return ("config", "--resume and train.overwrite = true both given: resume continues the "
                "run in train.out_dir, overwrite removes it; give one (a requeued job script "
                "should pass --resume only)")
    finished = finished_outputs(out_dir)
    checkpoints = complete_checkpoints(out_dir)
    if overwrite:
        removed = [name for name in _REPLACED if os.path.lexists(out_dir / name)]
        for name in removed:
            _remove(out_dir / name)
        if removed:
            log.info(f"train.overwrite = true: removed {', '.join(removed)} from {out_dir}")
        return None
    if not finished:
        return None   # checkpoints alone: the Checkpointer asks for --resume
    what = ", ".join(finished)
    if resume and not checkpoints:
        return ("config", f"--resume: train.out_dir = {out_dir} holds a finished run ({what}) "
                "and no checkpoint to resume from; pass --train.overwrite=true (not --resume) to "
                "train it again from step 0, or use another train.out_dir")
    if not resume:
        resumable = (f", --resume to continue from its checkpoint {checkpoints[-1][1].name}"
                     if checkpoints else "")
        return ("config", f"train.out_dir = {out_dir} holds a finished run ({what}); pass "
                f"--train.overwrite=true to replace it (its outputs and checkpoints are "
                f"removed){resumable}, or use another train.out_dir")
    return None


def claim(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunLock | None:
    """Every rank: rank 0 locks out_dir and checks what it holds; a refusal is raised on every
    rank alike. Returns rank 0's lock (None on the other ranks); the caller releases it."""
    out_dir = Path(out_dir)
    lock, refusal = None, None
    if distributed.rank() == 0:
        try:
            lock = lock_out_dir(out_dir)
            refusal = _decide(out_dir, resume=resume, overwrite=overwrite)
            if refusal is None:
                clear_preempted(out_dir)
        except (TrainingError, ConfigError) as error:
            refusal = ("config" if isinstance(error, ConfigError) else "training", str(error))
        except OSError as error:   # read-only, no permission, ...: every rank stops alike
            where = error.filename or out_dir
            refusal = ("config", f"train.out_dir = {out_dir}: cannot prepare it for this run "
                       f"({error.strerror or error} at {where}); point train.out_dir at a "
                       "folder this run may write")
    refusal = distributed.broadcast_from_rank0(refusal)
    if refusal is not None:
        if lock is not None:
            lock.release()
        kind, message = refusal
        raise (ConfigError if kind == "config" else TrainingError)(message)
    return lock


def write_preempted(out_dir: str | os.PathLike, *, step: int, total_steps: int,
                    checkpoint: str | os.PathLike) -> Path:
    """Rank 0, after every rank finished writing the checkpoint: the job's "pre-empted,
    checkpoint complete" status, for a requeue script to read whatever the launcher exits with."""
    path = Path(out_dir) / PREEMPTED_FILE
    record = {"step": step, "steps": total_steps, "checkpoint": os.fspath(checkpoint),
              "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    tmp = path.with_name(PREEMPTED_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def clear_preempted(out_dir: str | os.PathLike) -> None:
    (Path(out_dir) / PREEMPTED_FILE).unlink(missing_ok=True)
