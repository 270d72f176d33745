"""bench_train under gpu-check's deadline: every system's row goes to --rows-file as soon as it is
known, a system is not started without the time it needs, and an optional package that is missing
(matplotlib for the chart, Liger) costs its own part only, never the run."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402


def test_past_the_deadline_no_system_starts_and_each_row_is_written(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    code = bench_train.main([
        "--device", "cpu", "--shapes", "tiny", "--systems", "rega,hf-padded", "--steps", "1",
        "--warmup", "1", "--rows", "1", "--seq-len", "256", "--sequential", "--out-dir",
        str(tmp_path), "--rows-file", str(rows_file), "--deadline-at", str(time.time() - 1)])
    assert code == 0   # nothing failed: nothing was started
    records = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert records[0]["shape"] == "tiny" and records[0]["systems"] == ["rega", "hf-padded"]
    assert records[0]["settings"]["seq_len"] == 256
    rows = [r["row"] for r in records[1:]]
    assert [r["system"] for r in rows] == ["rega", "hf-padded"]
    assert all(r["status"] == "skipped" and r["reason"].startswith("deadline") for r in rows)


def test_without_matplotlib_only_the_chart_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    report = {"device": "cpu", "shapes": {}}
    said = bench_train.write_chart(report, tmp_path / "chart.png")
    assert said.startswith("no chart: matplotlib is not installed")
    assert not (tmp_path / "chart.png").exists()


def test_a_liger_that_does_not_import_is_a_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    reason = bench_train._skip_reason("hf-flatten-liger", "cuda")
    assert reason is not None and "liger-kernel is not installed" in reason


def test_ratios_pair_each_fp8_system_with_its_bf16_run():
    rows = [{"system": "rega-compile", "status": "ok", "tokens_per_s": 100.0,
             "loss_last_step": 2.0},
            {"system": "rega-compile-fp8", "status": "ok", "tokens_per_s": 130.0,
             "loss_last_step": 2.01}]
    bench_train.add_ratios(rows)
    assert rows[1]["fp8_speedup"] == pytest.approx(1.3)
    assert rows[1]["fp8_loss_gap_last_step"] == pytest.approx(0.005)
