"""benchmarks/bench_long_context.py in a CPU quick mode: the driver launches cp = 1 and cp = 2
under torchrun on a short packed row of mixed documents and reports the same summed loss, about
half the activation bytes per rank, and a balanced split."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_long_context.py"


@pytest.mark.multiprocess
def test_quick_run_reports_cp_off_and_on(tmp_path):
    command = [sys.executable, str(SCRIPT), "--seq-len", "256", "--cp", "1,2", "--docs", "mix",
               "--warmup", "1", "--steps", "1", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("long_context_*.json")
    assert path.with_suffix(".md").exists()
    rows = json.loads(path.read_text())["docs"]["mix"]["rows"]
    assert [r["cp"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    split = rows[1]
    assert split["loss_matches_cp1"] and split["loss_rel_diff_vs_cp1"] < 1e-4
    # CP divides everything per token but the gathered keys and values of the row
    assert 0.45 < split["activation_bytes_vs_cp1"] < 0.65
    assert split["tokens_per_rank"] == [128, 128]
    assert split["imbalance"] < 0.05
