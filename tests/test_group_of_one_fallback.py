"""A single-process bf16 run starts a process group of one for FSDP2 (NCCL on a GPU). Where that
group cannot start (NCCL in a container without its shared memory, say), the run says so in one
line and trains without the group instead of dying; rehearsed here with gloo on CPU."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import read_log, run_config  # noqa: E402

from rega_engine.train.loop import train  # noqa: E402
from rega_engine.train.parallel import setup_runtime, teardown_runtime  # noqa: E402


@pytest.fixture
def group_cannot_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1971, unhandled system "
                                    "error (run with NCCL_DEBUG=INFO for details)\nmore lines")

    monkeypatch.setattr(dist, "init_process_group", refuse)


def test_the_runtime_goes_on_without_a_group_and_says_why(group_cannot_start, capsys):
    runtime = setup_runtime("cpu", "bf16")
    try:
        assert not runtime.use_fsdp and not runtime.distributed and runtime.mesh is None
        assert (runtime.rank, runtime.world_size) == (0, 1) and not dist.is_initialized()
    finally:
        teardown_runtime(runtime)
    said = [line for line in capsys.readouterr().err.splitlines() if "process group" in line]
    assert len(said) == 1
    assert "GLOO could not start a process group of one (NCCL error in" in said[0]
    assert "bfloat16 instead of fp32 master weights" in said[0]


def test_training_runs_without_the_group(tmp_path, group_cannot_start):
    assert train(run_config(tmp_path, "--model.dtype=bf16", steps=3)) == 0
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)


def test_a_group_that_starts_is_used(tmp_path):
    runtime = setup_runtime("cpu", "bf16")
    try:
        assert runtime.use_fsdp and runtime.owns_process_group and dist.get_world_size() == 1
    finally:
        teardown_runtime(runtime)
    assert not dist.is_initialized()
