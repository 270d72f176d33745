"""benchmarks/bench_tensor_parallel.py in a CPU quick mode: the driver launches fsdp and tp2 on two
gloo processes over the same global batch and reports the same first-step loss for both, and
positive throughput figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tensor_parallel.py"


@pytest.mark.multiprocess
def test_quick_run_reports_fsdp_and_tp(tmp_path):
    command = [sys.executable, str(SCRIPT), "--shape", "tiny", "--nproc", "2", "--tp", "2",
               "--seq-len", "128", "--warmup", "1", "--steps", "1", "--device", "cpu",
               "--timeout", "150", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("tensor_parallel_*.json")
    assert path.with_suffix(".md").exists()
    report = json.loads(path.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert list(rows) == ["fsdp", "tp2"] and all(r["status"] == "ok" for r in rows.values())
    fsdp, tp2 = rows["fsdp"], rows["tp2"]
    assert (fsdp["tp"], fsdp["dp_shard"], tp2["tp"], tp2["dp_shard"]) == (1, 2, 2, 1)
    # the same global batch: one row on each fsdp rank, both rows on each tp rank
    assert fsdp["rows_per_rank"] == [1, 1] and tp2["rows_per_rank"] == [2, 2]
    assert tp2["loss_matches_fsdp"] and tp2["loss_rel_diff_vs_fsdp"] < 1e-4
    assert abs(tp2["loss_first_step"] - fsdp["loss_first_step"]) < 1e-4 * fsdp["loss_first_step"]
    for row in (fsdp, tp2):
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_per_gpu"] > 0
        assert row["step_time_s"] > 0 and row["mfu"] is None   # no peak FLOP/s for a CPU
    assert tp2["tokens_per_s_vs_fsdp"] > 0
