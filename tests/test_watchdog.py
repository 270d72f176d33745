"""The stall watchdog names the rank a stalled step waits for: a rank whose heartbeat stopped
(frozen) or one still at an earlier step; rank 1 speaks when the silent one is rank 0; a slow
first step with every rank alive prints nothing. A fake store stands in for torchrun's, so these
run in one process in about a second; tests/test_torchrun_faults.py freezes a real rank."""
from __future__ import annotations

import threading
import time

import pytest

from rega_engine.train.watchdog import StallWatchdog


class FakeStore:
    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        with self.lock:
            self.values[key] = value.encode()

    def check(self, keys) -> bool:
        with self.lock:
            return all(k in self.values for k in keys)

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.values[key]


class Peer:
    """Another rank's heartbeat thread: alive (its counter moves) at a given step, or frozen."""

    def __init__(self, store: FakeStore, rank: int, step: int, alive: bool = True):
        self.store, self.rank, self.step = store, rank, step
        self.seq = 0
        store.set(f"rega/heartbeat/{rank}", f"{step} 0")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if alive:
            self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.seq += 1
            self.store.set(f"rega/heartbeat/{self.rank}", f"{self.step} {self.seq}")

    def stop(self):
        self._stop.set()


def _watch(rank: int, world: int, store: FakeStore, step: int, wait_s: float = 3.0):
    dog = StallWatchdog(rank=rank, world_size=world, timeout_s=0.9, store=store,
                        heartbeat_s=0.2).start()   # a peer counts as frozen after 0.5 s still
    try:
        dog.begin(f"step {step}", step)
        assert dog.stall_after_s() == pytest.approx(0.3)   # a third of the timeout
        deadline = time.monotonic() + wait_s
        while not dog.last_report and time.monotonic() < deadline:
            time.sleep(0.02)
        return dog.last_report
    finally:
        dog.stop()


def test_rank_0_names_the_frozen_rank_and_the_one_behind(caplog):
    store = FakeStore()
    peers = [Peer(store, 1, 5, alive=False), Peer(store, 2, 4), Peer(store, 3, 5)]
    try:
        line = _watch(0, 4, store, 5)
    finally:
        for peer in peers:
            peer.stop()
    assert line.startswith("step 5 has waited ")
    assert ": waiting for rank 1 (no heartbeat for " in line and "stopped, hung" in line
    assert "rank 2 (still at step 4)" in line and "rank 3" not in line
    assert line in caplog.text


def test_rank_1_speaks_only_when_rank_0_is_the_silent_one():
    store = FakeStore()
    frozen_zero = Peer(store, 0, 5, alive=False)
    try:
        assert "waiting for rank 0 (no heartbeat" in _watch(1, 2, store, 5)
    finally:
        frozen_zero.stop()
    store = FakeStore()
    live_zero, frozen_two = Peer(store, 0, 5), Peer(store, 2, 5, alive=False)
    try:
        assert _watch(1, 3, store, 5, wait_s=1.0) == ""   # rank 0 is alive: it reports
    finally:
        live_zero.stop()
        frozen_two.stop()


def test_a_slow_first_step_with_every_rank_alive_is_not_a_stall():
    store = FakeStore()
    peer = Peer(store, 1, 1)
    try:
        assert _watch(0, 2, store, 1, wait_s=1.0) == ""
    finally:
        peer.stop()


def test_the_first_heartbeat_is_posted_before_start_returns():
    store = FakeStore()
    dog = StallWatchdog(rank=1, world_size=2, timeout_s=600, store=store, heartbeat_s=60).start()
    try:
        assert store.get("rega/heartbeat/1") == b"0 1"   # no heartbeat_s wait for the first
    finally:
        dog.stop()


def test_the_threshold_follows_the_typical_step():
    dog = StallWatchdog(rank=0, world_size=2, timeout_s=600, store=None)
    assert dog.stall_after_s() == 30.0     # no step yet: the floor
    dog._durations.extend([5.0, 6.0, 7.0])
    assert dog.stall_after_s() == 60.0     # 10 x the median step
    dog._durations.extend([100.0] * 10)
    assert dog.stall_after_s() == 200.0    # never past a third of the collective timeout


def test_a_collective_that_timed_out_or_lost_its_peer_becomes_one_line(tmp_path):
    import os
    import sys
    from types import SimpleNamespace
    sys.path.insert(0, os.path.dirname(__file__))
    from train_helpers import run_config

    from rega_engine.errors import TrainingError
    from rega_engine.train.loop import _collective_failure

    config = run_config(tmp_path, "--train.collective_timeout_s=6")
    runtime = SimpleNamespace(world_size=2, rank=0)
    dog = StallWatchdog(rank=0, world_size=2, timeout_s=6)
    dog.begin("step 5", 5)
    dog.last_report = "step 5 has waited 2 s: waiting for rank 1 (no heartbeat for 1+ s)"
    timed_out = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                             "6000ms for recv operation to complete")
    message = str(_collective_failure(timed_out, config, runtime, dog))
    assert message.startswith("step 5: rank 0 waited train.collective_timeout_s = 6 s for the "
                              "other ranks and gave up: step 5 has waited 2 s: waiting for rank 1")
    assert "Last complete checkpoint: none" in message and "--resume" in message
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:41602. This is typically caused by a remote worker crashing.")
    message = str(_collective_failure(lost, config, runtime, dog))
    assert message.startswith("step 5: rank 0 lost its connection to another rank (Connection "
                              "closed by peer [127.0.0.1]:41602): a rank died")
    # Anything else keeps its own message (or traceback); one process has no peers to lose.
    assert _collective_failure(RuntimeError("shape mismatch"), config, runtime, dog) is None
    assert _collective_failure(TrainingError("Timed out"), config, runtime, dog) is None
    assert _collective_failure(timed_out, config, SimpleNamespace(world_size=1, rank=0),
                               dog) is None
