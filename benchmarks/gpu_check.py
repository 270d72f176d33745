"""`make gpu-check`: everything a CUDA machine can tell about rega-engine, within one deadline.

GPU time comes in short slots on machines without network, so one command builds, tests and
measures, in order of value, and ends by its deadline (`--deadline`, default 480 s) whatever
happens:

  env      rega_engine importable from what the machine has (_gpu_check_env.py: already
           installed, else `pip install --no-deps --no-build-isolation --no-index -e .`, else
           the extension built in place and run from the checkout), Triton's cache in the run's
           folder; the versions of python, torch, CUDA, triton, transformers and the device;
  tests    the GPU test files (those carrying the `gpu` marker: attention, cross-entropy, the
           model and training), one pytest process each, so that one that does not import stops
           no other; `-m "gpu and not slow"`; every outcome recorded as the test finishes;
  kernels  attention forward and forward+backward (head dims 128 and 64, documents of 16k, 4k
           and 1k tokens) against SDPA's flash backend (and flash-attn where installed); fused
           linear cross-entropy at H=4096, V=128256, N=8192 and 32768 against eager and
           torch.compile, with peak memory and the weight-gradient path that ran
           (_gpu_check_kernels.py, one unit after the other, the most valuable first);
  e2e      benchmarks/bench_train.py on the 1B shape: rega, hf-padded, hf-flatten,
           rega-compile (and hf-flatten-liger where installed), one process per system;
  fp8      FP8 (train.precision = "fp8") against bf16: rega-compile-fp8 against rega-compile on
           Llama 3.1 8B's layer shape, then on the 1B shape (its bf16 baseline taken from e2e
           when that ran). Skipped as a whole, bf16 baselines included, without torchao or
           below sm_89.

A stage starts only with at least its least useful time left, gets at most what is left, and is
ended with its whole process group when that runs out: what it measured so far is kept and the
rest is named as skipped. The report, benchmarks/results/gpu_check_<device>.json and .md, is
rewritten after every stage, every test and every benchmark row (_gpu_check_report.py), so a slot
that ends mid-run still leaves every figure taken. The exit status is 1 when a correctness check
fails: a GPU test, a crashed worker, a rega kernel that did not run, or end-to-end systems that
disagree on the first step's loss (they start from the same weights on the same data); 0
otherwise, also when the deadline left parts out (the report says which); 2 without CUDA.

    python benchmarks/gpu_check.py                    # everything within 480 s
    python benchmarks/gpu_check.py --only kernels     # one part (tests, kernels, e2e, fp8)
    python benchmarks/gpu_check.py --deadline 900     # a longer slot
    python benchmarks/gpu_check.py --rehearsal        # on CPU: tiny shapes, torch backends

The rehearsal runs every stage, its arguments and its report on any machine (make test does),
so the command cannot rot between GPU slots; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import sys
import time
import traceback
from importlib.util import find_spec
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_check_env  # noqa: E402
import _gpu_check_report as report_files  # noqa: E402
from _procs import KILL_GRACE_S, Deadline, run_bounded  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS_DIR = BENCHMARKS / "results"
WORK_DIR = REPO / "runs" / "gpu-check"       # caches, logs, the rows files; git ignores runs/
STAGES = ("tests", "kernels", "e2e", "fp8")   # after env, which always runs first
DEFAULT_DEADLINE_S = 480
# The last report is written in this time after the last stage was ended.
END_RESERVE_S = 2.0 + KILL_GRACE_S
# A child told to stop at time T stops starting new work then; it is ended at T + this.
CHILD_MARGIN_S = 10.0
# Per stage: (the least time worth starting it with, the most it may take), in seconds. The
# rehearsal's figures are for a 2-core CPU; its stages are what `make test` times.
LIMITS = {
    "gpu": {"env": (0, 240), "tests": (60, 240), "kernels": (30, 120), "e2e": (45, 300),
            "fp8": (60, 300)},
    "rehearsal": {"env": (0, 240), "tests": (3, 240), "kernels": (5, 120), "e2e": (30, 300),
                  "fp8": (30, 300)},
}
# A GPU test file is started only with this much left for it and for each file after it.
TEST_FILE_MIN_S = {"gpu": 30, "rehearsal": 2}
# The GPU test files in order of value; any other file carrying the marker comes after them.
GPU_TEST_ORDER = ("test_attention_gpu.py", "test_cross_entropy_gpu.py", "test_gpu_training.py")
GPU_MARKER = re.compile(r"^\s*(?:pytestmark\s*=\s*\[?\s*|@)?pytest\.mark\.gpu\b", re.M)

# What each stage measures, full size on a GPU and tiny in the rehearsal. Kernel units run in this
# order (the targets' shapes first); estimate_s is the least time a unit is started with.
_ATTENTION_GPU = dict(tokens=[16384], num_heads=32, num_kv_heads=8, dtype="bfloat16", warmup=2,
                      reps=5)
_CE_GPU = dict(hidden_size=4096, vocab=128256, dtype="bfloat16", warmup=2, reps=5)
GPU_KERNEL_UNITS = [
    *({"name": f"attention d{d} {n // 1024}k-token documents", "bench":
       "bench_kernels:bench_attention", "estimate_s": 10,
       "kwargs": dict(_ATTENTION_GPU, head_dims=[d], doc_lens=[n])}
      for d, n in ((128, 16384), (128, 4096), (128, 1024))),
    {"name": "linear cross-entropy N=8192", "bench": "_bench_cross_entropy:bench_cross_entropy",
     "estimate_s": 30, "kwargs": dict(_CE_GPU, tokens=[8192])},
    *({"name": f"attention d64 {n // 1024}k-token documents", "bench":
       "bench_kernels:bench_attention", "estimate_s": 10,
       "kwargs": dict(_ATTENTION_GPU, head_dims=[64], doc_lens=[n])}
      for n in (16384, 4096, 1024)),
    {"name": "linear cross-entropy N=32768", "bench": "_bench_cross_entropy:bench_cross_entropy",
     "estimate_s": 20, "kwargs": dict(_CE_GPU, tokens=[32768])},
    {"name": "linear cross-entropy N=8192, weight-gradient fallback path",
     "bench": "_gpu_check_kernels:bench_cross_entropy_fallback_path", "estimate_s": 10,
     "kwargs": dict(_CE_GPU, tokens=[8192])},
]
REHEARSAL_KERNEL_UNITS = [
    *({"name": f"attention d16 {n}-token documents", "bench": "bench_kernels:bench_attention",
       "estimate_s": 2, "kwargs": dict(tokens=[256], doc_lens=[n], head_dims=[16], num_heads=4,
                                       num_kv_heads=2, dtype="float32", warmup=1, reps=2)}
      for n in (256, 64)),
    {"name": "linear cross-entropy N=128", "bench": "_bench_cross_entropy:bench_cross_entropy",
     "estimate_s": 2, "kwargs": dict(tokens=[128], hidden_size=32, vocab=256, dtype="float32",
                                     warmup=1, reps=2, include_compile=False)},
]
# bench_train runs: (name, which is also the shape; arguments; systems in order of value).
E2E_RUNS = {
    "gpu": [("1b", ["--shapes", "1b", "--steps", "6", "--warmup", "2"],
             ["rega", "hf-padded", "hf-flatten", "rega-compile", "hf-flatten-liger"])],
    "rehearsal": [("tiny", ["--shapes", "tiny", "--steps", "1", "--warmup", "1", "--rows", "1",
                            "--seq-len", "256"], ["rega", "hf-padded"])],
}
# Each FP8 run's bf16 pair comes from e2e when e2e measured it with the same arguments.
FP8_RUNS = {
    "gpu": [("8b-layers", ["--shapes", "8b-layers", "--steps", "4", "--warmup", "2"],
             ["rega-compile-fp8", "rega-compile"]),
            ("1b", ["--shapes", "1b", "--steps", "6", "--warmup", "2"],
             ["rega-compile-fp8", "rega-compile"])],
    "rehearsal": [("tiny", ["--shapes", "tiny", "--steps", "1", "--warmup", "1", "--rows", "1",
                            "--seq-len", "256"], ["rega-fp8", "rega"])],
}
MIN_SYSTEM_S = {"gpu": 30, "rehearsal": 10}
# First-step losses of the e2e systems must agree this closely (relative): same weights, same
# samples, same objective; bf16 kernels and reduction orders differ within a few parts in 1000.
FIRST_LOSS_RTOL = {"gpu": 2e-2, "rehearsal": 1e-3}
TARGETS = report_files.TARGETS


# --------------------------------------------------------------------------------------------
# The run: its clock, its report and the environment its stages share


class Run:
    def __init__(self, args):
        self.args = args
        self.profile = "rehearsal" if args.rehearsal else "gpu"
        self.deadline = Deadline(args.deadline)
        self.started = time.time()
        self.work = args.work_dir
        self.env = dict(os.environ)
        self.report = {"device": device_name(), "rehearsal": args.rehearsal,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "deadline_s": args.deadline, "finished": False, "stages": {}}
        slug = device_slug(self.report["device"], args.rehearsal)
        self.stem = args.out_dir / f"gpu_check_{slug}"

    def save(self) -> None:
        self.report["wall_s"] = round(time.time() - self.started, 1)
        report_files.write(self.report, self.stem)

    def budget(self, stage: str) -> tuple[float, str | None]:
        """(seconds the stage may take, None) or (0, why it is skipped)."""
        least, most = LIMITS[self.profile][stage]
        most = min(most, getattr(self.args, f"{stage}_timeout", None) or most)
        left = self.deadline.left() - END_RESERVE_S
        if left < max(least, 1):
            return 0, (f"deadline: {max(left, 0):.0f} s left of {self.args.deadline:.0f} s, the "
                       f"stage needs at least {max(least, 1):.0f} s")
        return min(most, left), None

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def fresh(self, name: str) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return path


def _python_path(env: dict, *folders: Path) -> dict:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([*(str(f) for f in folders),
                                         *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _last_line(done) -> str:
    """The last line a finished command printed: usually the error that ended it."""
    lines = [line for line in done.tail(2000).splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"exit {done.returncode}, no output"


def _read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file a child may still be writing (a torn last line waits)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --------------------------------------------------------------------------------------------
# env


def stage_env(run: Run, stage: dict, budget: float) -> None:
    build, run.env = _gpu_check_env.prepare(run.work, run.env, Deadline(budget),
                                            allow_build=not run.args.no_build)
    stage["build"] = build
    stage["versions"] = _gpu_check_env.versions(run.report["device"])
    if build["how"] is None:
        stage["status"] = "failed"
        stage["problems"] = ["rega_engine._C or rega_engine.kernels does not import, and no way "
                             "of building it worked (see Build)"]


# --------------------------------------------------------------------------------------------
# tests


def gpu_test_files(tests_dir: Path = REPO / "tests") -> list[Path]:
    """The test files that carry the `gpu` marker, the most valuable first."""
    found = [p for p in sorted(tests_dir.glob("test_*.py")) if GPU_MARKER.search(p.read_text())]
    rank = {name: i for i, name in enumerate(GPU_TEST_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def read_outcomes(path: Path, file: Path, ended: str | None) -> list[dict]:
    """One record per test of a file's outcome lines; a test that started and has no outcome was
    running when the process ended: `ended` says how ("timeout" or "crashed")."""
    tests = {}
    for record in _read_lines(path):
        test = tests.setdefault(record["test"], {"test": record["test"], "file": file.name})
        if record.get("event") == "start":
            continue
        # a teardown error after a passed call is still an error: the worst outcome stays
        if _SEVERITY[record["outcome"]] >= _SEVERITY.get(test.get("outcome"), -1):
            test.update(outcome=record["outcome"], seconds=record.get("seconds", 0.0),
                        message=record.get("message", ""))
    for test in tests.values():
        if "outcome" not in test:
            test.update(outcome=ended or "crashed", seconds=0.0,
                        message="still running when the deadline ended the stage"
                        if ended == "timeout" else "the pytest process died during this test")
    return list(tests.values())


_SEVERITY = {"skipped": 0, "passed": 1, "timeout": 2, "failed": 3, "error": 4, "crashed": 5}
FAILING = ("failed", "error", "crashed")


def stage_tests(run: Run, stage: dict, budget: float) -> None:
    stage_deadline = Deadline(budget)
    files = run.args.test_files or gpu_test_files()
    least = TEST_FILE_MIN_S[run.profile]
    env = _python_path(run.env, BENCHMARKS)
    # The same autotune choice in every process (and no benchmarking again): the checkpoint
    # test compares losses of two processes.
    env["TRITON_CACHE_AUTOTUNING"] = "1"
    stage.update(files={}, outcomes=[], skipped=[], problems=[])
    for i, file in enumerate(files):
        left = stage_deadline.left() - least * (len(files) - i - 1)
        if left < least:
            stage["skipped"].append(f"{file.name}: deadline ({max(left, 0):.0f} s left for it)")
            continue
        outcomes_path = run.fresh(f"tests/{file.stem}.jsonl")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-p", "_gpu_check_pytest", "-m", "gpu and not slow", str(file),
                   *shlex.split(run.args.pytest_args)]
        done_before = list(stage["outcomes"])

        def refresh(path=outcomes_path, file=file, before=done_before):
            stage["outcomes"] = before + read_outcomes(path, file, None)
            _count(stage)
            run.save()

        done = run_bounded(command, left, run.log(f"tests-{file.stem}"), cwd=REPO,
                           env=dict(env, GPU_CHECK_OUTCOMES=str(outcomes_path)), on_poll=refresh)
        outcomes = read_outcomes(outcomes_path, file, "timeout" if done.timed_out else None)
        stage["outcomes"] = done_before + outcomes
        stage["files"][file.name] = {"returncode": done.returncode, "seconds":
                                     round(done.seconds, 1), "output_tail": done.tail(3000)}
        if done.timed_out:
            finished = sum(o["outcome"] != "timeout" for o in outcomes)
            stage["skipped"].append(f"{file.name}: every test after the first {finished} (the "
                                    f"deadline ended it after {done.seconds:.0f} s)")
        elif done.returncode == 5:
            stage.setdefault("notes", []).append(f"{file.name}: no test selected")
        elif done.returncode not in (0, 1, 2) or not outcomes:
            # 1 (failures) and 2 (collection errors) have their outcomes above; anything else,
            # or nothing recorded at all (no pytest here, a conftest that does not import), is
            # said here
            stage["problems"].append(f"{file.name}: pytest exited {done.returncode} before "
                                     f"any outcome: {_last_line(done)}" if not outcomes else
                                     f"{file.name}: pytest exited {done.returncode} "
                                     f"({_last_line(done)})")
        _count(stage)
        run.save()
    counts = stage["counts"] = _count(stage)
    if not stage["outcomes"] and not stage["skipped"]:
        stage["problems"].append("no GPU test was collected")
    if any(counts[kind] for kind in FAILING) or stage["problems"]:
        stage["status"] = "failed"
    elif stage["skipped"]:
        stage["status"] = "cut"


def _count(stage: dict) -> dict:
    stage["counts"] = {kind: sum(o["outcome"] == kind for o in stage["outcomes"])
                       for kind in ("passed", "failed", "error", "crashed", "timeout", "skipped")}
    return stage["counts"]


# --------------------------------------------------------------------------------------------
# kernels


def kernel_units(run: Run) -> list[dict]:
    if run.args.kernel_units:
        return json.loads(run.args.kernel_units.read_text())
    return REHEARSAL_KERNEL_UNITS if run.args.rehearsal else GPU_KERNEL_UNITS


def read_kernel_rows(path: Path) -> dict:
    """What a kernel worker wrote: {"plan", "rows" (the last version of each), "started", "done",
    "errors", "skipped", "info"}."""
    found = {"plan": [], "rows": {}, "started": [], "done": [], "errors": {}, "skipped": {},
             "info": None}
    for record in _read_lines(path):
        unit = record.get("unit")
        if "plan" in record:
            found["plan"] = record["plan"]
        elif "row" in record:
            row = dict(record["row"], unit=unit)
            key = (unit, row.get("impl"), row.get("mode"), row.get("n_tokens"),
                   row.get("head_dim"), row.get("doc_len"))
            found["rows"][key] = row
        elif record.get("event") in ("start", "done"):
            found["started" if record["event"] == "start" else "done"].append(unit)
        elif "error" in record:
            found["errors"][unit] = record["error"]
        elif "skipped" in record:
            found["skipped"][unit] = record["skipped"]
        elif "info" in record:
            found["info"] = record["info"]
    return found


def _kernel_findings(stage: dict, found: dict) -> None:
    stage["rows"] = list(found["rows"].values())
    broken = [r for r in stage["rows"] if r["impl"].startswith("rega") and r["status"] != "ok"]
    stage["broken"] = [f"{r['unit']}: {r['impl']} {r.get('mode', '')} {r['status']}"
                       for r in broken]
    if found["info"]:
        stage["info"] = found["info"]
        if found["info"].get("ce_weight_grad_path"):
            stage["notes"] = [f"fused CE weight gradient: {found['info']['ce_weight_grad_path']}"]


def stage_kernels(run: Run, stage: dict, budget: float) -> None:
    units = kernel_units(run)
    units_path = run.fresh("kernels/units.json")
    units_path.write_text(json.dumps(units))
    rows_path = run.fresh("kernels/rows.jsonl")
    stop_at = time.time() + max(budget - CHILD_MARGIN_S, budget / 2)
    command = [sys.executable, str(BENCHMARKS / "_gpu_check_kernels.py"), "--units",
               str(units_path), "--rows", str(rows_path), "--deadline-at", str(stop_at),
               "--device", "cpu" if run.args.rehearsal else "cuda"]

    def refresh():
        _kernel_findings(stage, read_kernel_rows(rows_path))
        run.save()

    done = run_bounded(command, budget, run.log("kernels"), cwd=REPO, env=run.env,
                       on_poll=refresh)
    found = read_kernel_rows(rows_path)
    _kernel_findings(stage, found)
    stage.update(returncode=done.returncode, output_tail=done.tail(3000), problems=[],
                 skipped=[f"{unit}: {why}" for unit, why in found["skipped"].items()])
    interrupted = [u for u in found["started"] if u not in found["done"]]
    how = ("the deadline ended the worker" if done.timed_out
           else f"the worker died (exit {done.returncode})")
    for unit in interrupted:
        stage["skipped"].append(f"{unit}: the rest of it ({how} while it ran)")
    reached = set(found["started"]) | set(found["skipped"])
    stage["skipped"] += [f"{unit['name']}: not reached ({how})" for unit in units
                         if unit["name"] not in reached]
    stage["problems"] += [f"{unit}: {error.strip().splitlines()[-1]}"
                          for unit, error in found["errors"].items()]
    if not done.timed_out and done.returncode != 0:
        stage["problems"].append(f"the kernel worker died (exit {done.returncode}): "
                                 f"{_last_line(done)}")
    if stage["broken"] or stage["problems"]:
        stage["status"] = "failed"
    elif stage["skipped"]:
        stage["status"] = "cut"


# --------------------------------------------------------------------------------------------
# e2e and fp8: bench_train runs


def bench_train_run(run: Run, stage: dict, budget: float, name: str, args: list[str],
                    systems: list[str]) -> None:
    """One bench_train run within `budget`: its rows join stage["rows"] as they come."""
    import bench_train

    rows_path = run.fresh(f"{stage['name']}/{name}.jsonl")
    stop_at = time.time() + max(budget - CHILD_MARGIN_S, budget / 2)
    command = [sys.executable, str(BENCHMARKS / "bench_train.py"), *args, "--sequential",
               "--systems", ",".join(systems), "--out-dir", str(run.work / stage["name"]),
               "--rows-file", str(rows_path), "--deadline-at", str(stop_at),
               "--min-system-seconds", str(MIN_SYSTEM_S[run.profile]),
               "--timeout", str(budget)]
    before = list(stage["rows"])

    def collect():
        rows = []
        for record in _read_lines(rows_path):
            if "settings" in record:
                stage["settings"][record["shape"]] = record["settings"]
            elif "row" in record:
                rows.append(dict(record["row"], shape=record["shape"], run=name))
        stage["rows"] = before + rows
        _e2e_ratios(run, bench_train)
        return rows

    def refresh():
        collect()
        run.save()

    done = run_bounded(command, budget, run.log(f"{stage['name']}-{name}"), cwd=REPO,
                       env=run.env, on_poll=refresh)
    rows = collect()
    stage["runs"].append({"run": name, "command": " ".join(command),
                          "returncode": done.returncode, "seconds": round(done.seconds, 1)})
    measured = {r["system"] for r in rows}
    how = ("the deadline ended bench_train" if done.timed_out
           else f"bench_train exited {done.returncode}")
    missing = [s for s in systems if s not in measured]
    stage["skipped"] += [f"{name} {s}: not reached ({how})" for s in missing]
    if missing and not done.timed_out:
        stage["problems"].append(f"{name}: {how} before {', '.join(missing)}: "
                                 f"{_last_line(done)}")
    for row in rows:
        if row["status"] == "skipped" or row.get("deadline"):
            stage["skipped"].append(f"{name} {row['system']}: {row.get('reason', '')}"
                                    + (" (the deadline)" if row.get("deadline") else ""))
        elif row["status"] != "ok":
            stage["problems"].append(f"{name} {row['system']}: {row['status']} "
                                     f"{row.get('reason', '')}".strip())


def _e2e_ratios(run: Run, bench_train) -> None:
    """Ratios over the rows of each shape of e2e and fp8 together (an FP8 row's bf16 pair may
    come from e2e): bench_train's own, and rega's speed-up over each Hugging Face baseline."""
    stages = [run.report["stages"][s] for s in ("e2e", "fp8") if s in run.report["stages"]]
    by_shape = {}
    for stage in stages:
        for row in stage.get("rows", []):
            by_shape.setdefault(row["shape"], []).append(row)
    for rows in by_shape.values():
        bench_train.add_ratios(rows)
        _speedups(rows)


def _speedups(rows: list[dict]) -> None:
    """rega's real tokens/s over each Hugging Face baseline (rows of one shape), as
    `speedup_vs_<baseline>` (the targets read them)."""
    ok = {r["system"]: r for r in rows if r["status"] == "ok"}
    if "rega" in ok:
        for base in ("hf-padded", "hf-flatten", "hf-flatten-liger"):
            if base in ok:
                ok["rega"][f"speedup_vs_{base}"] = (ok["rega"]["tokens_per_s"]
                                                    / ok[base]["tokens_per_s"])


def first_loss_disagreements(rows: list[dict], rtol: float, only=None) -> list[str]:
    """Systems (of `only`, else all) whose first-step loss differs from rega's (else
    rega-compile's) by more than `rtol` (relative); the rows are those of one shape."""
    losses = {r["system"]: r["loss_first_step"] for r in rows
              if r["status"] == "ok" and r.get("loss_first_step") is not None}
    name = "rega" if "rega" in losses else "rega-compile"
    reference = losses.get(name)
    if reference is None:
        return []
    return [f"{system}: first-step loss {loss:.5f} vs {name}'s {reference:.5f} "
            f"(more than {rtol:.0e} apart: not the same objective)"
            for system, loss in losses.items()
            if (only is None or system in only) and abs(loss - reference) > rtol * abs(reference)]


def _finish_bench_stage(run: Run, stage: dict) -> None:
    rtol = FIRST_LOSS_RTOL[run.profile]
    mine = {(r["shape"], r["system"]) for r in stage["rows"]}
    for shape in {r["shape"] for r in stage["rows"]}:
        rows = [r for name in ("e2e", "fp8") for r in
                run.report["stages"].get(name, {}).get("rows", []) if r["shape"] == shape]
        stage["problems"] += first_loss_disagreements(
            rows, rtol, only={s for sh, s in mine if sh == shape})
    if stage["problems"]:
        stage["status"] = "failed"
    elif stage["skipped"]:
        stage["status"] = "cut"


def _bench_stage(run: Run, stage: dict, budget: float, runs: list) -> None:
    stage_deadline = Deadline(budget)
    stage.update(runs=[], rows=[], settings={}, skipped=[], problems=[])
    for name, args, systems in runs:
        left = stage_deadline.left()
        if left < MIN_SYSTEM_S[run.profile]:
            stage["skipped"] += [f"{name} {s}: deadline ({max(left, 0):.0f} s left)"
                                 for s in systems]
            continue
        bench_train_run(run, stage, left, name, args, systems)
        run.save()
    _finish_bench_stage(run, stage)


def stage_e2e(run: Run, stage: dict, budget: float) -> None:
    _bench_stage(run, stage, budget, E2E_RUNS[run.profile])


def fp8_unavailable(run: Run) -> str | None:
    """Why FP8 cannot run here (then its runs and their bf16 baselines are all skipped), or None:
    the check train.precision = "fp8" makes (torchao, torch's version, sm_89+)."""
    if find_spec("torchao") is None:
        return "torchao is not installed"
    device = "cpu" if run.args.rehearsal else "cuda:0"
    probe = ("from rega_engine.train.fp8 import check_fp8_supported; "
             f"check_fp8_supported({device!r})")
    done = run_bounded([sys.executable, "-c", probe],
                       max(min(120, run.deadline.left() - END_RESERVE_S), 1),
                       run.log("fp8-check"), cwd=REPO, env=run.env)
    if done.returncode == 0:
        return None
    return _last_line(done)


def stage_fp8(run: Run, stage: dict, budget: float) -> None:
    import bench_train

    started = time.time()
    why = fp8_unavailable(run)
    if why is not None:
        stage.update(status="skipped", reason=f"FP8 runs and their bf16 baselines: {why}")
        return
    e2e = run.report["stages"].get("e2e", {})
    measured = {(r["shape"], r["system"], r["run"]) for r in e2e.get("rows", [])
                if r["status"] == "ok"}
    e2e_args = {name: args for name, args, _ in E2E_RUNS[run.profile]}
    runs, reused = [], []
    for name, args, systems in FP8_RUNS[run.profile]:
        # the bf16 pair measured by e2e with these very arguments is not measured again
        again = [s for s in systems
                 if not (s in bench_train.FP8_BASELINE.values() and e2e_args.get(name) == args
                         and (name, s, name) in measured)]
        reused += [f"{name} {s}" for s in systems if s not in again]
        runs.append((name, args, again))
    _bench_stage(run, stage, budget - (time.time() - started), runs)
    if reused:
        stage.setdefault("notes", []).append(f"bf16 pairs from e2e: {', '.join(reused)}")


STAGE_FUNCTIONS = {"env": stage_env, "tests": stage_tests, "kernels": stage_kernels,
                   "e2e": stage_e2e, "fp8": stage_fp8}


# --------------------------------------------------------------------------------------------
# Facts about the machine


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(name: str, rehearsal: bool) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name.split("(")[0]).strip("-").lower()
    return f"rehearsal-{slug}" if rehearsal else slug


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STAGES),
                        help=f"comma-separated stages to run after env: {', '.join(STAGES)}")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds the whole command may take (default %(default)s)")
    parser.add_argument("--rehearsal", action="store_true",
                        help="CPU rehearsal: tiny shapes and torch backends (run by make test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help="caches (Triton, Inductor), logs and rows files (default "
                             "runs/gpu-check)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments for tests")
    parser.add_argument("--test-files", type=lambda s: [Path(p) for p in s.split(",") if p],
                        help="comma-separated test files for tests (default: those carrying the "
                             "gpu marker)")
    parser.add_argument("--kernel-units", type=Path,
                        help="a JSON file of kernel benchmark units (see _gpu_check_kernels.py) "
                             "instead of the built-in ones")
    parser.add_argument("--no-build", action="store_true", help="never build the extension")
    for stage in STAGES:
        parser.add_argument(f"--{stage}-timeout", type=float,
                            help=f"at most this many seconds for {stage} (within the deadline)")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in args.stages]   # always in order of value
    return args


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".writable"
        probe.write_text("")
        probe.unlink()
        return folder
    except OSError:
        import tempfile
        return Path(tempfile.mkdtemp(prefix="gpu-check-"))


def _end_on_sigterm(signum, frame):
    # SystemExit unwinds through run_bounded, which ends the running stage's process group: a
    # driver stopped from outside leaves nothing running on the GPU (the report on disk is the
    # one saved at the last row).
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    import torch

    if not args.rehearsal and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device; on a CPU run `python benchmarks/gpu_check.py "
              "--rehearsal` (what make test does) to check the command itself", file=sys.stderr)
        return 2
    args.work_dir = _writable(args.work_dir)
    run = Run(args)
    for name in ["env", *args.stages]:
        stage = run.report["stages"][name] = {"name": name, "status": "running"}
        budget, why = run.budget(name)
        if why:
            stage.update(status="skipped", reason=why, seconds=0.0)
            print(f"gpu-check: {name} skipped: {why}", file=sys.stderr, flush=True)
            run.save()
            continue
        print(f"gpu-check: {name} (at most {budget:.0f} s) ...", file=sys.stderr, flush=True)
        run.save()
        started = time.time()
        try:
            STAGE_FUNCTIONS[name](run, stage, budget)
        except Exception:  # one broken stage must not silence the ones after it
            stage.update(status="failed", error=traceback.format_exc()[-3000:])
        if stage["status"] == "running":
            stage["status"] = "ok"
        stage["seconds"] = round(time.time() - started, 1)
        print(f"gpu-check: {name} {stage['status']} ({stage['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
        run.save()
    run.report["finished"] = True
    run.save()
    print(report_files.markdown(run.report))
    print(f"gpu-check: wrote {run.stem}.json and .md ({run.report['wall_s']:.0f} s of "
          f"{args.deadline:.0f})", file=sys.stderr)
    return 0 if run.report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
