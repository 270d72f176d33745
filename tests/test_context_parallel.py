"""Context parallelism (parallel.cp, train/context_parallel.py) on CPU with gloo.

- The split itself (tests/cp_worker.py): one packed micro-batch through a plain model, whole and
  split over 2 and 4 ranks: the loss, every token's loss and logits and every parameter gradient
  agree, and every label is counted by exactly one rank.
- Training: cp = 2 on 2 processes and cp = 4 on 4 train like one process on the same rows, and
  so does dp 2 x cp 2 on 4 (the single process reads the two data-parallel deals); a checkpoint
  of the 2 x 2 run resumes with cp = 1 (the same data-parallel ranks: it goes on exactly as the
  2 x 2 run did) and with cp = 4 (elastic: one data-parallel rank).
- The zigzag split's balance and the key rules, in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    COMPARABLE,
    assert_same_run,
    assert_same_weights,
    read_log,
    single_process_runs,
    torchrun,
)

from rega_engine.config import ConfigError, ParallelConfig, load_config  # noqa: E402
from rega_engine.train.context_parallel import (  # noqa: E402
    attention_work,
    imbalance,
    token_owners,
)
from rega_engine.train.parallel import mesh_shape  # noqa: E402

TESTS = Path(__file__).parent
STEPS = 4
SAVED = 2
GRAD_ACCUM = 2
# Measured (torch 2.13 CPU, fp32): the split run's largest differences to the whole one were
# 1.5e-5 in a summed loss of about 400 (relative 4e-8), 5e-7 in a token's loss or logit and
# 1.7e-6 in a gradient whose largest entry is 4.8; trained 4 steps, 2e-7 in a step's loss.
# Summation order is all that differs. The final weights: 1.7e-5 apart at most (cp 2; cp 4 1.3e-5,
# 2 x 2 1.2e-5), where AdamW turns a last-bit difference of a gradient whose second moment is tiny
# into a visible fraction of one update (lr 3e-3), as tests/test_hsdp.py sees across meshes.
TOL = 1e-5
WEIGHT_TOL = 5e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("cp", [2, 4])
def test_a_split_batch_gives_the_whole_batchs_loss_logits_and_gradients(tmp_path, cp):
    torchrun(cp, [str(TESTS / "cp_worker.py"), str(tmp_path), f"cp{cp}"])
    for rank in range(cp):
        seen = json.loads((tmp_path / f"cp{cp}_rank{rank}.json").read_text())
        assert seen["kv_heads"] == [4, 2]   # grouped-query attention
        assert seen["loss"] <= TOL * 10, seen            # of a sum of about 400
        assert seen["token_losses"] <= TOL and seen["logits"] <= TOL, seen
        assert seen["grads"] <= TOL * seen["grad_scale"], seen
        counted, labels = seen["counted"]
        assert counted == labels > 0


# name: (processes, dp_shard, cp, extra arguments)
RUNS = {"cp2": (2, 1, 2, ()), "cp4": (4, 1, 4, ("--model.activation_checkpointing=block",)),
        "dp2cp2": (4, 2, 2, (f"--checkpoint.every={SAVED}", "--checkpoint.keep=2"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on one and on two data-parallel deals, then the RUNS; returns (tmp, args)."""
    tmp = tmp_path_factory.mktemp("cp")
    args = single_process_runs(tmp, COMPARABLE, (1, 2), GRAD_ACCUM, STEPS)
    for name, (processes, shard, cp, extra) in RUNS.items():
        torchrun(processes, ["-m", "rega_engine.cli", "train", *args,
                             f"--train.out_dir={tmp / name}", "--checkpoint.export=true",
                             f"--parallel.dp_shard={shard}", f"--parallel.cp={cp}", *extra])
    return tmp, args


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_context_parallel_training_equals_one_process(runs, name):
    tmp, _ = runs
    processes, shard, cp, _ = RUNS[name]
    single = tmp / f"single{shard}"
    assert_same_run(read_log(single), read_log(tmp / name), TOL)
    assert read_log(single)[-1]["loss"] < read_log(single)[0]["loss"]
    assert_same_weights(single, tmp / name, WEIGHT_TOL)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_cp_checkpoint_resumes_with_another_cp_degree(runs):
    tmp, args = runs
    saved = tmp / "dp2cp2" / "checkpoints" / f"step_{SAVED}"
    assert (saved / "meta.json").is_file()
    for name, processes, shard, cp in (("resume_cp1", 2, 2, 1), ("resume_cp4", 4, 1, 4)):
        out = tmp / name
        shutil.copytree(saved, out / "checkpoints" / saved.name)
        result = torchrun(processes, ["-m", "rega_engine.cli", "train", *args,
                                      f"--train.out_dir={out}", "--resume",
                                      "--checkpoint.every=0", f"--parallel.dp_shard={shard}",
                                      f"--parallel.cp={cp}"])
        assert f"resumed from {saved.name}" in result.stderr.replace(str(out / "checkpoints") +
                                                                     "/", "")
        log = read_log(out)
        assert [r["step"] for r in log] == list(range(SAVED + 1, STEPS + 1))
        first = read_log(tmp / "dp2cp2")[0]["loss"]
        assert all(0 < r["loss"] < first for r in log), (name, [r["loss"] for r in log])
    # cp = 1 on the 2 x 2 run's two data-parallel ranks reads the same rows: it goes on exactly
    # as the 2 x 2 run did (cp = 4 has one data-parallel rank, so other rows: elastic).
    assert_same_run(read_log(tmp / "dp2cp2")[SAVED:], read_log(tmp / "resume_cp1"), TOL)


def test_each_document_is_cut_in_2cp_pieces_and_rank_i_keeps_piece_i_and_its_mirror():
    # One document filling a row of 16, cp 2: pieces of 4, the row's own zigzag.
    assert token_owners(torch.tensor([0, 16]), 2).tolist() == [0] * 4 + [1] * 8 + [0] * 4
    # Documents of 9 and 3 and a padding run of 4: 9 = 4 pieces of 2 plus 1 left over; the
    # left-over tokens (9's last, all of 3's) go round the ranks in zigzag order 0 1 1 0 ...
    assert token_owners(torch.tensor([0, 9, 12, 16]), 2).tolist() == [
        0, 0, 1, 1, 1, 1, 0, 0, 0,   1, 1, 0,   0, 1, 1, 0]
    for cu in ([0, 5, 17, 40, 48], [0, 1, 2, 3, 48], [0, 48, 96]):
        owners = token_owners(torch.tensor(cu), 4)
        assert torch.bincount(owners).tolist() == [cu[-1] // 4] * 4
    with pytest.raises(ValueError, match="20 tokens are not a multiple of 8"):
        token_owners(torch.tensor([0, 20]), 4)


def test_attention_work_counts_every_query_key_pair_once():
    for docs in ([64], [10, 30, 24], [1] * 64, [7, 50]):
        work = attention_work(docs, 64, 4)
        assert sum(work) == sum(n * (n + 1) // 2 for n in docs)
    assert attention_work([64], 64, 4) == [520, 520, 520, 520]   # one document: even


def test_the_zigzag_split_balances_a_realistic_length_mix():
    """Attention work per rank within 10% on packed rows of a long-tailed mix of documents
    (lognormal lengths, median ~900 tokens, a few near the row length), cp 2, 4 and 8."""
    generator = torch.Generator().manual_seed(0)
    seq_len = 32768
    lengths = (torch.randn(1500, generator=generator) * 1.2 + 6.8).exp().long().clamp(16, seq_len)
    rows, row, used = [], [], 0
    for n in lengths.tolist():   # first fit in arrival order, as a stream of rows fills
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(n)
        used += n
    for cp in (2, 4, 8):
        totals = [0] * cp
        for docs in rows:
            for rank, w in enumerate(attention_work(docs, seq_len, cp)):
                totals[rank] += w
        assert imbalance(totals) < 0.10, (cp, imbalance(totals))
        # and per row, where each step's slowest rank sets the pace
        assert max(imbalance(attention_work(docs, seq_len, cp)) for docs in rows) < 0.10


def test_cp_keys(tmp_path):
    assert mesh_shape(ParallelConfig(cp=2), 8, 8) == (1, 4)
    assert mesh_shape(ParallelConfig(dp_replicate=2, cp=2), 8, 4) == (2, 2)
    # "auto": the node's processes left after cp (8 / 2), and replica groups for the rest
    assert mesh_shape(ParallelConfig(dp_shard="auto", dp_replicate=-1, cp=2), 16, 8) == (2, 4)
    with pytest.raises(ConfigError, match=r"parallel\.cp = 3 does not divide the 8 process"):
        mesh_shape(ParallelConfig(cp=3), 8, 8)
    with pytest.raises(ConfigError, match=r"a mesh of 1 x 2 x 2 = 4 process\(es\), but this run "
                                          r"has 8"):
        mesh_shape(ParallelConfig(dp_shard=2, cp=2), 8, 8)
    config = tmp_path / "run.toml"
    config.write_text("[data]\nseq_len = 100\n[parallel]\ncp = 4\n")
    with pytest.raises(ConfigError, match=r"data\.seq_len = 100 must be a multiple of 2 x "
                                          r"parallel\.cp = 8.*use data\.seq_len = 104"):
        load_config(config)
    config.write_text("[parallel]\ncp = 0\n")
    with pytest.raises(ConfigError, match=r"parallel\.cp = 0: expected an integer >= 1"):
        load_config(config)
