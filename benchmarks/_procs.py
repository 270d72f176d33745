"""Run a command under a time limit and end it completely: its whole process group, not one pid.

gpu_check starts every stage, and bench_train every benchmarked system, through `run_bounded`:
the child gets a session of its own, its output goes to a log file (a pipe fills up and blocks a
chatty child, and a killed child's output must survive it), and when the limit passes SIGTERM and
then SIGKILL go to the whole group, so that no compile worker or test subprocess keeps the GPU
busy into the next stage. `Deadline` is the one clock a run's parts share.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# After SIGTERM a group gets this long to exit before SIGKILL (time to flush a last row).
KILL_GRACE_S = 5.0
TIMED_OUT = 124        # the exit status coreutils' `timeout` uses, for a command we ended
NOT_STARTED = 127      # the shell's status for a command that could not be run


class Deadline:
    """A point in time every part of a run is measured against. `at` is wall-clock (time.time),
    so that it can be handed to a child process on its command line."""

    def __init__(self, seconds: float):
        self.at = time.time() + seconds

    @classmethod
    def at_epoch(cls, at: float) -> Deadline:
        deadline = cls(0)
        deadline.at = at
        return deadline

    def left(self) -> float:
        return self.at - time.time()


@dataclass
class Finished:
    command: list[str]
    returncode: int        # TIMED_OUT when ended by the limit, NOT_STARTED when it never ran
    timed_out: bool
    seconds: float
    log_path: Path

    def tail(self, chars: int = 3000) -> str:
        """The last `chars` characters of the command's output (stdout and stderr together)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def run_bounded(command: list[str], timeout: float, log_path: Path, *, cwd: Path | None = None,
                env: dict | None = None, on_poll=None, poll_s: float = 1.0) -> Finished:
    """Runs `command` for at most `timeout` seconds (then its process group is ended), its output
    in `log_path`. `on_poll()` is called about every `poll_s` seconds while it runs: the caller's
    chance to save what the child has written so far."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as error:   # no such program, not executable
            log.write(f"could not start {command[0]}: {error}\n".encode())
            return Finished(command, NOT_STARTED, False, 0.0, log_path)
        timed_out = False
        try:
            while True:
                left = started + timeout - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    proc.wait(timeout=min(poll_s, left))
                    break
                except subprocess.TimeoutExpired:
                    if on_poll is not None:
                        on_poll()
        finally:
            # Also after a normal exit: whatever the command left running in its group goes too.
            _end_group(proc)
        if timed_out:
            log.write(f"\n[ended after {timeout:.0f} s: the time limit]\n".encode())
    returncode = TIMED_OUT if timed_out else proc.returncode
    return Finished(command, returncode, timed_out, time.monotonic() - started, log_path)


def _end_group(proc: subprocess.Popen) -> None:
    # The child leads its own session, so its pid is the group id of everything it started.
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):   # the group is already gone
        pass
