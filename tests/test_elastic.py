"""Elastic resume: a run checkpointed with 2 processes (FSDP2 on gloo) resumes with 1, then with
2 again; over the epoch every planned row is trained exactly once, and the loss goes on falling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import cli_args, read_log, run_config  # noqa: E402

WORKER = Path(__file__).with_name("elastic_worker.py")


def _train(tmp_path, args, tag: str, processes: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", REGA_ROWS_DIR=str(tmp_path),
               REGA_RUN_TAG=tag)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, str(WORKER), *args], env=env, capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _rows(tmp_path, epoch: int = 0) -> Counter:
    seen = Counter()
    for file in tmp_path.glob("rows_*.jsonl"):
        for line in file.read_text().splitlines():
            e, row = json.loads(line)
            if e == epoch:
                seen[tuple(row)] += 1
    return seen


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_with_other_world_sizes_trains_every_row_once(tmp_path, capfd):
    from rega_engine.data import PackedLoader

    config = run_config(tmp_path, "--checkpoint.every=1", "--checkpoint.keep=1", steps=3)
    args = [a for a in cli_args(config) if not a.startswith(("--train.steps=",
                                                             "--checkpoint.resume="))]
    # The epoch as planned: its rows do not depend on the number of processes.
    planned = Counter()
    for batch in PackedLoader(config.data.prepared, seq_len=64, batch_size=2,
                              seed=config.train.seed, prefetch=0):
        for row, kinds in zip(batch.input_ids.numpy(), batch.kind_ids.numpy()):
            if (kinds >= 0).any():
                planned[tuple(row[kinds >= 0].tolist())] += 1
    rows = sum(planned.values())
    assert rows > 24   # 3 steps x 4 rows, 3 x 2, and more for the last run to finish

    _train(tmp_path, [*args, "--train.steps=3"], "a", 2)                  # 12 rows on 2 ranks
    # 6 rows on 1 process, in this one (saves a start-up)
    from elastic_worker import record_rows

    from rega_engine.cli import main
    from rega_engine.data import loader as loader_module
    original = record_rows(str(tmp_path / "rows_b_rank0.jsonl"))
    try:
        assert main(["train", *args, "--train.steps=6", "--resume"]) == 0
    finally:
        loader_module._BatchIterator.__next__ = original
    assert "continues at row 12 of epoch 0" in capfd.readouterr().err
    assert sum(1 for _ in open(tmp_path / "rows_b_rank0.jsonl")) == 6
    # past the epoch's end
    _train(tmp_path, [*args, f"--train.steps={6 + rows // 4 + 1}", "--resume"], "c", 2)

    assert _rows(tmp_path) == planned      # every planned row once: none twice, none skipped
    log = read_log(config.train.out_dir)
    assert [r["step"] for r in log] == list(range(1, 6 + rows // 4 + 2))
    assert all(sum(r["loss_tokens_by_domain"].values())
               == sum(r["loss_tokens_by_kind"].values()) > 0 for r in log)
    losses = [r["loss"] for r in log]
    assert all(0 < x < 20 for x in losses)
    # The resumed runs go on from the checkpointed weights: no jump back to the initial loss.
    assert max(losses[3:6]) < losses[0] and sum(losses[-3:]) / 3 < losses[0]
