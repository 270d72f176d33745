"""A step that waits on a frozen rank says so, and names the rank.

A collective waits for every rank; one rank stopped (SIGSTOP, a hung host, a device in a bad
state) stalls all the others in silence until the process group's timeout
(train.collective_timeout_s). Here a thread on every rank posts a heartbeat (its step and a
counter) to the process group's store every `heartbeat_s`; when the current step has run longer
than `stall_after_s()` (10 x the typical step, at least 30 s, at most a third of the collective
timeout), rank 0 reads every rank's heartbeat twice, a few heartbeats apart, and logs one line
naming the ranks still at an earlier step and those whose heartbeat stopped:

    step 7 has waited 12 s (typical step 0.4 s): waiting for rank 3 (no heartbeat for 3 s:
    stopped, hung or its host unreachable?)

Rank 1 speaks instead when the rank that falls silent is rank 0. The line repeats every
stall_after_s() while the stall lasts; the collective timeout then ends the run (the loop turns
the timeout into one line naming the step). The heartbeats cost one small store write per rank
and second, off the training thread; nothing is read while steps run normally.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque

from rega_engine.log import get_logger

log = get_logger(__name__)

_KEY = "rega/heartbeat/{}"


def default_store():
    """The default process group's key-value store (torchrun's), or None."""
    try:
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    except Exception:   # a private function: without it, stalls are reported without names
        return None


class StallWatchdog:
    def __init__(self, *, rank: int, world_size: int, timeout_s: float, store=None,
                 heartbeat_s: float = 1.0, floor_s: float = 30.0):
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.heartbeat_s, self.floor_s = timeout_s, heartbeat_s, floor_s
        self.store = store
        self._durations: deque[float] = deque(maxlen=20)
        self._lock = threading.Lock()
        self._what: str | None = None   # the phase that waits on the other ranks, e.g. "step 7"
        self._step = 0
        self._since = 0.0
        self._seq = 0
        self._next_report = float("inf")
        self._first_sample: tuple[float, dict] | None = None
        self.last_report = ""           # the newest stall line, for the timeout's error message
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the training thread's side ---------------------------------------------------------

    def start(self) -> StallWatchdog:
        if self.world_size > 1 and self._thread is None:
            # The first heartbeat goes out now, not a heartbeat later: a rank that dies in its
            # first second must read as "no heartbeat for N s", not "no heartbeat yet".
            self._beat()
            self._thread = threading.Thread(target=self._run, name="rega-stall-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def begin(self, what: str, step: int) -> None:
        """A phase that waits on the other ranks starts: `what` names it in the stall line."""
        with self._lock:
            self._what, self._step = what, step
            self._since = time.monotonic()
            self._next_report = self._since + self.stall_after_s()
            self._first_sample = None
            self.last_report = ""

    def end(self, *, typical: bool = True) -> None:
        """The phase ended; `typical`: its duration counts towards the typical step."""
        with self._lock:
            if self._what is not None and typical:
                self._durations.append(time.monotonic() - self._since)
            self._what = None
            self._next_report = float("inf")

    @property
    def phase(self) -> str | None:
        """The phase running now (or the one an exception interrupted)."""
        return self._what

    def typical_s(self) -> float | None:
        return statistics.median(self._durations) if self._durations else None

    def stall_after_s(self) -> float:
        typical = self.typical_s()
        after = max(10 * typical, self.floor_s) if typical is not None else self.floor_s
        return min(after, self.timeout_s / 3)

    # -- the watchdog thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
                self._check()
            except Exception:   # the store went away (teardown): heartbeats end quietly
                if self._stop.is_set():
                    return
                time.sleep(self.heartbeat_s)

    def _beat(self) -> None:
        if self.store is None:
            return
        self._seq += 1
        self.store.set(_KEY.format(self.rank), f"{self._step} {self._seq}")

    def _heartbeats(self) -> dict[int, tuple[int, int]]:
        """rank -> (step, counter) of every rank that posted one."""
        beats = {}
        for r in range(self.world_size):
            key = _KEY.format(r)
            if self.store.check([key]):
                step, seq = self.store.get(key).decode().split()
                beats[r] = (int(step), int(seq))
        return beats

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            what, step, since = self._what, self._step, self._since
            due = what is not None and now >= self._next_report
        if not due or self.rank > 1:
            return
        if self.store is None:
            self._report(what, step, now - since, None)
            return
        if self._first_sample is None:
            # Two readings a few heartbeats apart tell a silent rank from a live one, without
            # comparing clocks across hosts.
            self._first_sample = (now, self._heartbeats())
            return
        first_at, first = self._first_sample
        if now - first_at < 2.5 * self.heartbeat_s:
            return
        second = self._heartbeats()
        self._first_sample = None
        suspects = self._silent(first, second, now - first_at,
                                "stopped, hung or its host unreachable?")
        for r, (at_step, _) in second.items():
            if r != self.rank and r not in suspects and at_step < step:
                suspects[r] = f"still at step {at_step}"
        if self.rank == 1 and 0 not in suspects:
            with self._lock:   # rank 0 is alive and reports for itself
                self._next_report = now + self.stall_after_s()
            return
        self._report(what, step, now - since, suspects)

    def _silent(self, first: dict, second: dict, apart_s: float, guess: str) -> dict[int, str]:
        """{rank: why} for each other rank whose heartbeat did not move between two readings
        `apart_s` seconds apart (or never came)."""
        silent = {}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            if r not in second:
                silent[r] = "no heartbeat yet"
            elif first.get(r) == second[r]:
                silent[r] = f"no heartbeat for {apart_s:.0f}+ s: {guess}"
        return silent

    def silent_ranks(self) -> dict[int, str] | None:
        """After a collective lost its connection to a peer: which ranks died, as {rank: why},
        from two readings of the heartbeats a few heartbeats apart (on the calling thread, about
        2.5 heartbeats: a second or two). None where the store cannot tell (none, or it went
        away with the rank that hosted it)."""
        if self.store is None:
            return None
        try:
            first = self._heartbeats()
            started = time.monotonic()
            time.sleep(2.5 * self.heartbeat_s)
            second = self._heartbeats()
        except Exception:   # the store died with its host (a rank-hosted store): no names
            return None
        return self._silent(first, second, time.monotonic() - started,
                            "the process died or its host went away")

    def _report(self, what: str, step: int, waited: float, suspects: dict | None) -> None:
        typical = self.typical_s()
        head = (f"{what} has waited {waited:.0f} s"
                + (f" (typical step {typical:.2g} s)" if typical is not None else ""))
        if suspects is None:
            line = f"{head}: a rank is not answering (no store to tell which)"
        elif suspects:
            line = f"{head}: waiting for " + ", ".join(f"rank {r} ({why})"
                                                       for r, why in sorted(suspects.items()))
        elif step > 1 and what.startswith("step"):
            line = (f"{head}; every rank is alive and at this step: a slow collective, device or "
                    "filesystem?")
        else:   # the first step compiles and warms up: slow is normal there
            line = ""
        with self._lock:
            if self._what == what:
                self._next_report = time.monotonic() + self.stall_after_s()
                if line:
                    self.last_report = line
        if line:
            log.warning(line)
