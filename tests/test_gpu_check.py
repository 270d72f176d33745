"""`make gpu-check` rehearsed on CPU, so that the command a GPU slot depends on cannot rot between
slots: the whole run with tiny shapes (slow), and, seconds each, the paths a slot can take: the
deadline ending a stage and skipping the rest, a killed benchmark worker leaving its earlier rows,
the driver stopped from outside leaving a report with every row taken and nothing running, a test
file that does not import leaving the others running, and missing optional packages as skips."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

# A real rehearsal kernel unit: tiny attention on CPU (seconds).
ATTENTION_UNIT = {"name": "attention tiny", "bench": "bench_kernels:bench_attention",
                  "estimate_s": 1, "kwargs": dict(tokens=[128], doc_lens=[64], head_dims=[16],
                                                  num_heads=2, num_kv_heads=1, dtype="float32",
                                                  warmup=1, reps=1)}


def _run(tmp_path, *args: str, env: dict | None = None, timeout: float = 300):
    out_dir = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--rehearsal",
               "--out-dir", str(out_dir), "--work-dir", str(tmp_path / "work"), *args]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **(env or {})))
    wall = time.monotonic() - started
    report, markdown = _report(out_dir)
    assert report is not None, proc.stderr[-3000:]
    return proc, report, markdown, wall


def _report(out_dir: Path):
    reports = list(out_dir.glob("gpu_check_rehearsal-*.json"))
    if not reports:
        return None, None
    return json.loads(reports[0].read_text()), reports[0].with_suffix(".md").read_text()


def _test_file(path: Path, body: str) -> Path:
    path.write_text("import pytest\n\n" + body)
    return path


def _bench_module(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_reports(tmp_path):
    # matplotlib made to fail its import: bench_train's chart is optional and the run measured
    # everything, so it must stay a success
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc, report, markdown, _ = _run(tmp_path, env={"PYTHONPATH": str(hide.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = report["stages"]
    assert list(stages) == ["env", "tests", "kernels", "e2e", "fp8"]
    assert all(s["status"] in ("ok", "skipped") for s in stages.values()), stages
    assert report["finished"] and report["ok"]
    assert stages["env"]["build"]["how"] == "installed"
    versions = stages["env"]["versions"]
    assert {"python", "torch", "triton", "transformers", "cuda", "device"} <= set(versions)
    # the GPU test files were collected one by one (and skip here): the suite the GPU runs exists
    assert set(stages["tests"]["files"]) == {"test_attention_gpu.py", "test_cross_entropy_gpu.py",
                                             "test_gpu_training.py"}
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
    assert "ce_weight_grad_path" in stages["kernels"]["info"]
    e2e = {r["system"]: r for r in stages["e2e"]["rows"]}
    assert e2e["rega"]["status"] == e2e["hf-padded"]["status"] == "ok"
    assert e2e["rega"]["loss_first_step"] == pytest.approx(e2e["hf-padded"]["loss_first_step"],
                                                           rel=1e-3)
    if stages["fp8"]["status"] == "ok":   # train.precision = "fp8" (on CPU via torch._scaled_mm)
        fp8 = {r["system"]: r for r in stages["fp8"]["rows"]}
        # its bf16 pair is e2e's rega row: not measured twice
        assert list(fp8) == ["rega-fp8"] and fp8["rega-fp8"]["fp8_speedup"] > 0
    else:
        assert "torchao" in stages["fp8"]["reason"]
    assert len(report["targets"]) == len(gpu_check.TARGETS)
    for heading in ("## Versions", "## Build", "## Stages", "## Targets", "## kernels: attention",
                    "## kernels: linear_cross_entropy", "## e2e"):
        assert heading in markdown


def test_the_deadline_ends_a_stage_keeps_its_results_and_skips_the_rest(tmp_path):
    tests = _test_file(tmp_path / "test_slow_on_gpu.py",
                       "import time\n\n@pytest.mark.gpu\ndef test_quick():\n    pass\n\n"
                       "@pytest.mark.gpu\ndef test_never_ends():\n    time.sleep(600)\n")
    deadline = 20
    proc, report, markdown, wall = _run(tmp_path, "--deadline", str(deadline), "--no-build",
                                        "--test-files", str(tests))
    assert proc.returncode == 0, proc.stderr[-3000:]   # nothing failed; the rest was left out
    assert report["finished"] and report["ok"] and not report["complete"]
    assert report["wall_s"] <= deadline and wall < deadline + 10   # + the driver's own start
    stages = report["stages"]
    outcomes = {o["test"].split("::")[-1]: o["outcome"] for o in stages["tests"]["outcomes"]}
    assert outcomes == {"test_quick": "passed", "test_never_ends": "timeout"}
    assert stages["tests"]["status"] == "cut"
    for name in ("kernels", "e2e", "fp8"):
        assert stages[name]["status"] == "skipped"
        assert stages[name]["reason"].startswith("deadline")
    assert any(part.startswith("kernels: deadline") for part in report["skipped"])
    assert "## Skipped" in markdown and "incomplete" in markdown


def test_a_test_file_that_does_not_import_leaves_the_others_running(tmp_path):
    broken = _test_file(tmp_path / "test_broken_on_gpu.py",
                        "import a_package_this_image_lacks  # noqa\n\n@pytest.mark.gpu\n"
                        "def test_never_collected():\n    pass\n")
    failing = _test_file(tmp_path / "test_wrong_on_gpu.py",
                         "@pytest.mark.gpu\ndef test_kernel():\n"
                         "    assert 1 == 2, 'the kernel is wrong'\n")
    fine = _test_file(tmp_path / "test_fine_on_gpu.py",
                      "@pytest.mark.gpu\ndef test_kernel():\n    pass\n\n"
                      "@pytest.mark.gpu\n@pytest.mark.slow\ndef test_long():\n    pass\n")
    measures = _bench_module(tmp_path / "measures.py",
                             "def bench(device=None, on_row=None):\n"
                             "    return [{'op': 'x', 'impl': 'eager', 'status': 'ok'}]\n")
    units = tmp_path / "units.json"
    units.write_text(json.dumps([{"name": "x", "bench": f"{measures}:bench"}]))
    proc, report, markdown, _ = _run(
        tmp_path, "--only", "tests,kernels", "--no-build", "--kernel-units", str(units),
        "--test-files", ",".join(str(p) for p in (broken, failing, fine)))
    assert proc.returncode == 1
    tests = report["stages"]["tests"]
    by_file = {o["file"]: o for o in tests["outcomes"]}
    assert by_file["test_broken_on_gpu.py"]["outcome"] == "error"
    assert "a_package_this_image_lacks" in by_file["test_broken_on_gpu.py"]["message"]
    assert by_file["test_wrong_on_gpu.py"]["outcome"] == "failed"
    assert "the kernel is wrong" in by_file["test_wrong_on_gpu.py"]["message"]
    # the slow test is left to `make test-gpu`: the slot runs `-m "gpu and not slow"`
    assert [o["test"].split("::")[-1] for o in tests["outcomes"]
            if o["file"] == "test_fine_on_gpu.py"] == ["test_kernel"]
    assert by_file["test_fine_on_gpu.py"]["outcome"] == "passed"
    assert tests["status"] == "failed" and not report["ok"]
    assert "the kernel is wrong" in markdown and "## Failed tests" in markdown
    # a failed stage does not stop the next one
    assert report["stages"]["kernels"]["status"] == "ok"
    assert "e2e" not in report["stages"]


def test_a_killed_kernel_worker_leaves_its_earlier_rows(tmp_path):
    dies = _bench_module(tmp_path / "dies.py",
                         "import os, signal\n\ndef bench(device=None, on_row=None):\n"
                         "    os.kill(os.getpid(), signal.SIGKILL)\n")
    units = tmp_path / "units.json"
    units.write_text(json.dumps([
        ATTENTION_UNIT,
        {"name": "a segfault", "bench": f"{dies}:bench", "estimate_s": 0},
        dict(ATTENTION_UNIT, name="attention after it")]))
    proc, report, markdown, _ = _run(tmp_path, "--only", "kernels", "--no-build",
                                     "--kernel-units", str(units))
    assert proc.returncode == 1   # a crashed worker is a correctness failure
    kernels = report["stages"]["kernels"]
    assert kernels["status"] == "failed"
    assert {(r["impl"], r["mode"]) for r in kernels["rows"]} == {
        (impl, mode) for impl in ("rega", "sdpa-math") for mode in ("fwd", "fwd+bwd")}
    assert all(r["unit"] == "attention tiny" and r["status"] == "ok" for r in kernels["rows"])
    assert any("died" in problem for problem in kernels["problems"])
    assert any(part.startswith("a segfault: the rest of it (the worker died")
               for part in kernels["skipped"])
    assert any(part.startswith("attention after it: not reached") for part in kernels["skipped"])
    assert "## kernels: attention" in markdown


def test_a_driver_stopped_mid_stage_leaves_every_row_and_nothing_running(tmp_path):
    sleeps = _bench_module(tmp_path / "sleeps.py",
                           "import time\n\ndef bench(device=None, on_row=None):\n"
                           "    time.sleep(600)\n")
    units = tmp_path / "units.json"
    units.write_text(json.dumps([ATTENTION_UNIT,
                                 {"name": "hangs", "bench": f"{sleeps}:bench", "estimate_s": 0}]))
    out_dir = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--rehearsal", "--only",
         "kernels", "--no-build", "--kernel-units", str(units), "--out-dir", str(out_dir),
         "--work-dir", str(tmp_path / "work")], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        give_up = time.monotonic() + 120
        report = None
        while time.monotonic() < give_up:   # the report on disk gets the rows as they come
            report, _ = _report(out_dir)
            if report and len(report["stages"].get("kernels", {}).get("rows", [])) == 4:
                break
            time.sleep(0.5)
        plan = json.loads((tmp_path / "work" / "kernels" / "rows.jsonl").read_text()
                          .splitlines()[0])
        driver.send_signal(signal.SIGTERM)   # the slot ends
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    report, markdown = _report(out_dir)
    assert report["finished"] is False and "running" in markdown
    rows = report["stages"]["kernels"]["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    # the worker (its own process group) went with the driver: nothing keeps the device busy
    for _ in range(50):
        try:
            os.kill(plan["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(plan["pid"], signal.SIGKILL)
        pytest.fail("the kernel worker outlived the stopped driver")


def test_missing_optional_packages_are_skips_not_failures(tmp_path):
    hide = tmp_path / "hide"
    for package in ("torchao", "matplotlib", "flash_attn", "liger_kernel"):
        (hide / package).mkdir(parents=True)
        (hide / package / "__init__.py").write_text("raise ImportError('not on this image')\n")
    proc, report, markdown, wall = _run(tmp_path, "--only", "fp8", "--no-build",
                                        env={"PYTHONPATH": str(hide)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp8 = report["stages"]["fp8"]
    assert fp8["status"] == "skipped" and report["ok"]
    assert "FP8 runs and their bf16 baselines" in fp8["reason"] and "torchao" in fp8["reason"]
    assert "rows" not in fp8 and wall < 60   # no bf16 run spent on a comparison without FP8
    assert "fp8: FP8 runs and their bf16 baselines" in markdown


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "kernel"])


def test_stages_run_in_order_of_value_whatever_the_order_asked():
    assert gpu_check.parse_args(["--only", "fp8,tests,e2e"]).stages == ["tests", "e2e", "fp8"]


def test_the_slot_collects_only_the_gpu_test_files():
    assert [p.name for p in gpu_check.gpu_test_files()] == list(gpu_check.GPU_TEST_ORDER)


def test_first_step_losses_must_agree():
    rows = [{"system": "rega", "status": "ok", "loss_first_step": 11.90},
            {"system": "hf-padded", "status": "ok", "loss_first_step": 11.95},
            {"system": "hf-flatten", "status": "ok", "loss_first_step": 12.60},
            {"system": "hf-flatten-liger", "status": "skipped"}]
    problems = gpu_check.first_loss_disagreements(rows, rtol=2e-2)
    assert len(problems) == 1 and problems[0].startswith("hf-flatten:")
    assert gpu_check.first_loss_disagreements(rows, rtol=2e-2, only={"hf-padded"}) == []


def test_a_test_running_when_its_process_ended_is_named(tmp_path):
    lines = tmp_path / "outcomes.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in [
        {"test": "t.py::a", "event": "start"},
        {"test": "t.py::a", "outcome": "passed", "when": "call", "seconds": 1.0, "message": ""},
        {"test": "t.py::a", "outcome": "error", "when": "teardown", "seconds": 0.1,
         "message": "cleanup failed"},
        {"test": "t.py::b", "event": "start"}]) + '{"test": "t.py::c", "ev')   # a torn line
    outcomes = {o["test"]: o for o in gpu_check.read_outcomes(lines, Path("t.py"), None)}
    assert outcomes["t.py::a"]["outcome"] == "error"   # the teardown error is not hidden
    assert outcomes["t.py::b"]["outcome"] == "crashed"
    assert set(outcomes) == {"t.py::a", "t.py::b"}
    ended = gpu_check.read_outcomes(lines, Path("t.py"), "timeout")
    assert {o["test"]: o["outcome"] for o in ended}["t.py::b"] == "timeout"
