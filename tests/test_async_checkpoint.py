"""checkpoint.async (issue 25, part 2): a checkpoint written in the background equals a
synchronous one tensor for tensor, training goes on while it is written (a storage writer slowed
on purpose), and a SIGTERM while one is pending leaves only complete checkpoints and resumes bit
for bit. Tiny single-process CPU runs; the several-process case is in tests/test_hsdp.py."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
)

from rega_engine.train.checkpoint import checkpoint_root, complete_checkpoints  # noqa: E402
from rega_engine.train.loop import PREEMPTED_EXIT_CODE, train  # noqa: E402

STEPS = 8
SETTINGS = ("--checkpoint.every=2", "--checkpoint.keep=10", "--checkpoint.export=true")


def _slow_writer(monkeypatch, seconds: float, on_first_write=None):
    """DCP's file writer takes `seconds` longer per checkpoint; `on_first_write` runs in the
    writer's thread as the first checkpoint's data is written."""
    real = dcp.FileSystemWriter.write_data
    writes = []

    def write_data(self, plan, planner):
        writes.append(threading.current_thread().name)
        if len(writes) == 1 and on_first_write is not None:
            on_first_write()
        time.sleep(seconds)
        return real(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)
    return writes


def _tensors(checkpoint, tmp_path) -> dict:
    out = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


def _assert_same(got: dict, expected: dict, where: str = "") -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        if isinstance(expected[key], dict):
            _assert_same(got[key], expected[key], f"{where}{key}.")
        elif isinstance(expected[key], torch.Tensor):
            assert torch.equal(got[key], expected[key]), where + key
        else:
            assert got[key] == expected[key], where + key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The synchronous run every case is held against."""
    tmp = tmp_path_factory.mktemp("sync")
    torch.set_num_threads(1)
    assert train(run_config(tmp, *SETTINGS, steps=STEPS)) == 0
    return tmp / "run"


def test_an_async_checkpoint_equals_a_synchronous_one_and_training_goes_on(
        tmp_path, monkeypatch, reference):
    writes = _slow_writer(monkeypatch, 1.0)
    assert train(run_config(tmp_path, *SETTINGS, "--checkpoint.async=true", steps=STEPS)) == 0
    run = tmp_path / "run"
    # DCP wrote in a thread of its own, never the training thread.
    assert len(writes) == STEPS // 2 and threading.main_thread().name not in writes
    # The steps after a save went on while it was written: their records name it pending.
    log = read_log(run)
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(reference)]
    assert [r["checkpoint_pending"] for r in log][:4] == [None, None, 2, 2]
    assert all(r["checkpoint_s"] < 1.0 for r in log[:3])   # step 2's save did not stop step 3
    # Every checkpoint complete, equal to the synchronous one: model, optimizer, rank state.
    assert [s for s, _ in complete_checkpoints(run)] == [2, 4, 6, 8]
    assert not [p for p in checkpoint_root(run).iterdir() if p.name.endswith(".tmp")]
    for step, path in complete_checkpoints(run):
        twin = checkpoint_root(reference) / f"step_{step}"
        _assert_same(_tensors(path, tmp_path), _tensors(twin, tmp_path))
        _assert_same(torch.load(path / "rank_0.pt", weights_only=True),
                     torch.load(twin / "rank_0.pt", weights_only=True))
    # The end of training waited for the last write before exporting.
    _assert_same(load_file(run / "hf" / "model.safetensors"),
                 load_file(reference / "hf" / "model.safetensors"))


def test_a_sigterm_while_a_save_is_pending_leaves_complete_checkpoints_and_resumes_exactly(
        tmp_path, monkeypatch, reference):
    # The SIGTERM arrives while step 2's checkpoint is being written: the run finishes its step,
    # waits for that write, saves that step too and exits 143.
    _slow_writer(monkeypatch, 1.0, on_first_write=lambda: os.kill(os.getpid(), signal.SIGTERM))
    config = run_config(tmp_path, *SETTINGS, "--checkpoint.async=true", steps=STEPS)
    assert train(config) == PREEMPTED_EXIT_CODE
    run = tmp_path / "run"
    stopped = read_log(run)[-1]
    assert stopped["step"] < STEPS and stopped["checkpoint_pending"] == 2
    assert [s for s, _ in complete_checkpoints(run)] == [2, stopped["step"]]
    assert not [p for p in checkpoint_root(run).iterdir() if p.name.endswith(".tmp")]
    assert (run / "preempted.json").is_file() and not (run / "hf").exists()

    monkeypatch.undo()
    config = run_config(tmp_path, *SETTINGS, "--checkpoint.async=true", "--checkpoint.resume=true",
                        steps=STEPS)
    assert train(config) == 0
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in read_log(reference)]
    _assert_same(load_file(run / "hf" / "model.safetensors"),
                 load_file(reference / "hf" / "model.safetensors"))
