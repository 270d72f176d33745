"""FSDP2 on CPU (gloo): two processes under torchrun train exactly like one process on the same
global batch, including through a sharded DCP checkpoint and a resume.

The single process reads both ranks' deals of the dataset as its two micro-batches
(`train(config, loader_deals=[(0, 2), (1, 2)])`, grad_accum=2), so both runs see the same rows
and the same global loss weight per step; they differ only in who computes what and in FSDP's
sharding, reduce-scatter and (for the torchrun run) activation checkpointing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    cli_args,
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
)

from rega_engine.train.checkpoint import complete_checkpoints  # noqa: E402
from rega_engine.train.loop import train  # noqa: E402

STEPS = 5
# Constant learning rate, so that a 3-step run resumed to 5 steps is the same run as 5 steps.
COMMON = ("--train.warmup_steps=0", "--train.min_lr_ratio=1.0", "--train.grad_clip=0.5",
          "--train.weight_decay=0.1")


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "rega_engine.cli", "train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_gloo_processes_match_one_process_through_a_resume(tmp_path):
    single = run_config(tmp_path, *COMMON, "--train.grad_accum=2", "--checkpoint.export=true",
                        steps=STEPS)
    single.train.out_dir = str(tmp_path / "single")
    train(single, loader_deals=[(0, 2), (1, 2)])

    # Two processes, one micro-batch each: 3 steps with a checkpoint at the end, then --resume to 5.
    multi = run_config(tmp_path, *COMMON, "--train.grad_accum=1", "--checkpoint.every=3",
                       "--checkpoint.export=true", "--model.activation_checkpointing=block",
                       steps=STEPS)
    multi.train.out_dir = str(tmp_path / "multi")
    args = cli_args(multi)
    _torchrun([*args, "--train.steps=3", "--checkpoint.export=false"])
    checkpoints = complete_checkpoints(tmp_path / "multi")
    assert [step for step, _ in checkpoints] == [3]
    # DCP wrote one shard file per rank, and each rank its own loader/RNG state.
    files = {p.name for p in checkpoints[0][1].iterdir()}
    assert {"rank_0.pt", "rank_1.pt", ".metadata"} <= files
    assert sum(name.endswith(".distcp") for name in files) == 2
    resumed = _torchrun([*args, "--resume"])
    assert "resumed from" in resumed.stderr

    one, two = read_log(tmp_path / "single"), read_log(tmp_path / "multi")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        assert a["tokens"] == b["tokens"]
        for name, value in a["loss_by_domain"].items():
            assert (value is None) == (b["loss_by_domain"][name] is None)
            if value is not None:
                assert value == pytest.approx(b["loss_by_domain"][name], abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]

    final_one = load_file(tmp_path / "single" / "hf" / "model.safetensors")
    final_two = load_file(tmp_path / "multi" / "hf" / "model.safetensors")
    assert final_one.keys() == final_two.keys()
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: {m}")

    # Elastic: the 2-process checkpoint resumes in one process (DCP reshards; the loader's
    # position is global rows); tests/test_elastic.py holds the rows trained to an epoch's.
    multi.checkpoint.resume = True
    multi.train.steps = STEPS + 1
    assert train(multi) == 0
    assert [r["step"] for r in read_log(tmp_path / "multi")] == list(range(1, STEPS + 2))
