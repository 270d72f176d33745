"""`make gpu-check` rehearsed on CPU: every stage runs with tiny shapes and writes its report, so
that the command a GPU slot depends on cannot rot between slots; a failing stage makes it exit 1
while the stages after it still run and report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def _gpu_check(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict, str]:
    out_dir = Path(args[args.index("--out-dir") + 1])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    reports = list(out_dir.glob("gpu_check_rehearsal-*.json"))
    assert len(reports) == 1, proc.stderr[-3000:]
    markdown = reports[0].with_suffix(".md").read_text()
    return proc, json.loads(reports[0].read_text()), markdown


@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_reports(tmp_path):
    proc, report, markdown = _gpu_check("--rehearsal", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = report["stages"]
    assert list(stages) == ["env", "tests", "kernels", "e2e"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    versions = stages["env"]["versions"]
    assert {"python", "torch", "triton", "transformers", "cuda", "device"} <= set(versions)
    # the GPU tests were collected (and skip here): the suite the GPU will run exists
    assert stages["tests"]["counts"]["skipped"] >= 10
    assert any("test_gpu_training" in o["test"] for o in stages["tests"]["outcomes"])
    kernels = stages["kernels"]["rows"]
    attention = [r for r in kernels if r["op"] == "attention"]
    assert {(r["impl"], r["mode"], r["doc_len"]) for r in attention} == {
        (impl, mode, n) for impl in ("rega", "sdpa-math") for mode in ("fwd", "fwd+bwd")
        for n in (64, 256)}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in kernels)
    assert {r["impl"] for r in kernels if r["op"] == "linear_cross_entropy"} == {
        "eager", "rega_fused"}
    e2e = {r["system"]: r for r in stages["e2e"]["rows"]}
    assert e2e["rega"]["status"] == e2e["hf-padded"]["status"] == "ok"
    assert e2e["rega"]["loss_first_step"] == pytest.approx(e2e["hf-padded"]["loss_first_step"],
                                                           rel=1e-3)
    # train.precision = "fp8" through the same benchmark (on CPU via torch._scaled_mm), with its
    # ratio to bf16; the compiled FP8 runs on the 1B and 8B layer shapes are for GPUs and say so.
    assert e2e["rega-fp8"]["status"] == "ok" and e2e["rega-fp8"]["fp8_speedup"] > 0
    assert "on GPUs only" in stages["e2e"]["skipped"]
    assert len(report["targets"]) == len(gpu_check.TARGETS)
    for heading in ("## Versions", "## Stages", "## Targets", "## kernels: attention",
                    "## kernels: linear_cross_entropy", "## e2e"):
        assert heading in markdown


@pytest.mark.slow
def test_a_failing_stage_fails_the_run_and_the_next_stages_still_report(tmp_path):
    failing = tmp_path / "test_broken_on_gpu.py"
    failing.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_broken():\n"
                       "    assert 1 == 2, 'the kernel is wrong'\n")
    proc, report, markdown = _gpu_check(
        "--rehearsal", "--only", "tests,kernels", "--out-dir", str(tmp_path / "out"),
        "--pytest-args", str(failing))
    assert proc.returncode == 1
    tests = report["stages"]["tests"]
    assert tests["status"] == "failed" and tests["counts"]["failed"] == 1
    assert "the kernel is wrong" in markdown and "test_broken" in markdown
    assert report["stages"]["kernels"]["status"] == "ok"
    assert "e2e" not in report["stages"] and report["ok"] is False


def test_first_step_losses_must_agree():
    rows = [{"system": "rega", "status": "ok", "loss_first_step": 11.90},
            {"system": "hf-padded", "status": "ok", "loss_first_step": 11.95},
            {"system": "hf-flatten", "status": "ok", "loss_first_step": 12.60},
            {"system": "hf-flatten-liger", "status": "skipped"}]
    problems = gpu_check.first_loss_disagreements(rows, rtol=2e-2)
    assert len(problems) == 1 and problems[0].startswith("hf-flatten:")


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "kernel"])
