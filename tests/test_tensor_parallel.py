"""Tensor parallelism (parallel.tp, train/tensor_parallel.py) on CPU with gloo.

- tp 2 on 2 processes (without sequence parallelism) and dp 2 x tp 2 on 4 (with it and with
  activation checkpointing) train like one process on the same rows over 20 steps: every step's
  loss and gradient norm, and the final weights after gathering; tp 2 with tied embeddings
  likewise (one table of 257 rows split unevenly, serving as embedding and head), with
  sequence parallelism and torch.compile per block; HSDP (2 replicas of 1) x tp 2 on 4; and
  tp 2 with LoRA adapters (split with their layers; the merged export compared); and cp 2 x
  tp 2 on 4 (a row's tokens split over the cp ranks, each share over the tp ranks).
- tests/test_tensor_parallel_simulated.py checks tp 4 and 8 in one process.
- The 2 x 2 run's checkpoint resumes with FSDP only (tp 1, the same two data-parallel ranks: it
  goes on exactly as the 2 x 2 run did) and in one process without FSDP (elastic).
- What a tp degree must divide, in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_hf_config  # noqa: E402
from train_helpers import (  # noqa: E402
    COMPARABLE,
    assert_same_run,
    assert_same_weights,
    read_log,
    run_config,
    single_process_runs,
    torchrun,
)

from rega_engine.config import ConfigError, ParallelConfig, load_config  # noqa: E402
from rega_engine.model.args import ModelArgs  # noqa: E402
from rega_engine.train.parallel import mesh_shape  # noqa: E402
from rega_engine.train.tensor_parallel import check_divisible  # noqa: E402

STEPS = 20
SAVED = 10
GRAD_ACCUM = 2
# Measured (torch 2.13 CPU, fp32, 20 steps at lr 3e-3, about two passes over the data, the
# vocabulary-parallel loss), worst of the runs: losses within 4.8e-6, per-domain losses 1.4e-5,
# gradient norms (up to 3.9) 2.1e-5, final weights 3.2e-5; the compiled run's weights 5.5e-5,
# cp 2 x tp 2's gradient norms 4.9e-5. Summation order is all that differs (and inductor's
# fusions, compiled; each cp rank's share of the loss, with CP); over 20 steps AdamW turns
# last-bit gradient differences into a growing fraction of an update (lr 3e-3), as across HSDP
# meshes, so 5e-5 for every figure, twice that for those two.
TOL = 5e-5
WEIGHT_TOL = 5e-5
# name: (log tolerance, weight tolerance) where they differ from TOL and WEIGHT_TOL
LOOSER = {"tp2_tied": (TOL, 1e-4), "cp2tp2": (1e-4, WEIGHT_TOL)}
# name: (processes, dp_shard, extra arguments, the single-process run it equals). Sequence
# parallelism is on by default: tp2 runs without it; tp2_tied compiles each block.
RUNS = {"tp2": (2, 1, ("--parallel.sequence_parallel=false",), "single1"),
        "dp2tp2": (4, 2, (f"--checkpoint.every={SAVED}", "--checkpoint.keep=2",
                          "--model.activation_checkpointing=block"), "single2"),
        "tp2_tied": (2, 1, ("--model.init_config={tied}", "--model.compile=true"),
                     "single1_tied"),
        "hsdp2tp2": (4, 1, ("--parallel.dp_replicate=2",), "single2"),
        "tp2_lora": (2, 1, ("--lora.rank=4",), "single1_lora"),
        "cp2tp2": (4, 1, ("--parallel.cp=2",), "single1")}
# The single-process references besides single_process_runs' single1 and single2: name: extra
# arguments (cli_args leaves [lora] out, so the runs pass it themselves).
REFERENCES = {"single1_tied": ("--model.init_config={tied}",),
              "single1_lora": ("--lora.rank=4",)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process references, then the RUNS; returns (tmp, args)."""
    from rega_engine.train.loop import train
    tmp = tmp_path_factory.mktemp("tp")
    args = single_process_runs(tmp, COMPARABLE, (1, 2), GRAD_ACCUM, STEPS)
    tied = tmp / "tied.json"
    # 257 ids: the table splits unevenly over the tp ranks (129 + 128 rows)
    tied.write_text(json.dumps(tiny_hf_config("llama3", tie_word_embeddings=True, vocab_size=257)))
    for name, extra in REFERENCES.items():
        single = run_config(tmp, *COMPARABLE, f"--train.grad_accum={GRAD_ACCUM}",
                            "--checkpoint.export=true", *(e.format(tied=tied) for e in extra),
                            steps=STEPS)
        single.train.out_dir = str(tmp / name)
        assert train(single) == 0
    for name, (processes, shard, extra, _) in RUNS.items():
        torchrun(processes, ["-m", "rega_engine.cli", "train", *args,
                             f"--train.out_dir={tmp / name}", "--checkpoint.export=true",
                             f"--parallel.dp_shard={shard}", "--parallel.tp=2",
                             *(e.format(tied=tied) for e in extra)])
    return tmp, args


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_tensor_parallel_training_equals_one_process(runs, name):
    tmp, _ = runs
    single = tmp / RUNS[name][3]
    tol, weight_tol = LOOSER.get(name, (TOL, WEIGHT_TOL))
    assert_same_run(read_log(single), read_log(tmp / name), tol)
    assert read_log(single)[-1]["loss"] < read_log(single)[0]["loss"]
    assert_same_weights(single, tmp / name, weight_tol)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_tp_checkpoint_resumes_with_fsdp_only_and_in_one_process(runs):
    from rega_engine.cli import main

    tmp, args = runs
    saved = tmp / "dp2tp2" / "checkpoints" / f"step_{SAVED}"
    assert (saved / "meta.json").is_file()

    def resume_args(name: str) -> list[str]:
        out = tmp / name
        shutil.copytree(saved, out / "checkpoints" / saved.name)
        return [*args, f"--train.out_dir={out}", "--resume", "--checkpoint.every=0"]

    torchrun(2, ["-m", "rega_engine.cli", "train", *resume_args("resume_fsdp"),
                 "--parallel.dp_shard=2"])
    assert main(["train", *resume_args("resume_one")]) == 0
    for name in ("resume_fsdp", "resume_one"):
        log = read_log(tmp / name)
        assert [r["step"] for r in log] == list(range(SAVED + 1, STEPS + 1))
        first = read_log(tmp / "dp2tp2")[0]["loss"]
        assert all(0 < r["loss"] < first for r in log), (name, [r["loss"] for r in log])
    # FSDP over the same two data-parallel ranks reads the same rows: exactly the 2 x 2 run's steps
    assert_same_run(read_log(tmp / "dp2tp2")[SAVED:], read_log(tmp / "resume_fsdp"), TOL)


def test_what_a_tp_degree_must_divide():
    args = ModelArgs.from_hf_config(tiny_hf_config("llama3"))   # 4 heads, 2 KV heads
    check_divisible(args, 2)
    with pytest.raises(ConfigError, match=r"parallel\.tp = 4 does not divide the model's "
                                          r"num_key_value_heads = 2"):
        check_divisible(args, 4)
    assert mesh_shape(ParallelConfig(tp=2), 8, 8) == (1, 4)
    # two nodes of 8, blocks over 4: a node holds 2 data-parallel ranks, replicated across nodes
    assert mesh_shape(ParallelConfig(dp_replicate=-1, dp_shard="auto", tp=4), 16, 8) == (2, 2)
    with pytest.raises(ConfigError, match=r"parallel\.tp = 3 does not divide the 8 process"):
        mesh_shape(ParallelConfig(tp=3), 8, 8)


def test_sequence_parallelism_needs_seq_len_a_multiple_of_tp(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[data]\nseq_len = 1023\n[parallel]\ntp = 2\n")
    with pytest.raises(ConfigError, match=r"data\.seq_len = 1023 must be a multiple of "
                                          r"parallel\.tp .*use data\.seq_len = 1024"):
        load_config(config)
    config.write_text("[data]\nseq_len = 1023\n[parallel]\ntp = 2\nsequence_parallel = false\n")
    assert load_config(config).parallel.sequence_parallel is False
    # with context parallelism each cp rank's tokens are split over its tp ranks
    config.write_text("[data]\nseq_len = 12\n[parallel]\ntp = 4\ncp = 2\n")
    with pytest.raises(ConfigError, match=r"data\.seq_len = 12 must be a multiple of parallel\.tp "
                                          r"x parallel\.cp .*use data\.seq_len = 16"):
        load_config(config)
