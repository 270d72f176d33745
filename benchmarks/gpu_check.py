"""`make gpu-check`: everything a CUDA machine can tell about rega-engine, in one command.

GPU time comes in short slots on machines without network, so one run builds, tests and measures,
and keeps going past a failing stage so that every stage still reports:

  env      build the C++ extension in place from what the machine has (`pip install --no-deps
           --no-build-isolation -e .`, only if `rega_engine._C` does not import) and record the
           versions of python, torch, CUDA, triton, transformers and the device;
  tests    `pytest -m gpu`: the kernels, the model with Triton kernels against the torch
           backends, training steps through `rega-engine train` (compile on and off), DCP resume,
           `apply_rega_kernels` on a transformers Llama; every outcome is recorded;
  kernels  attention forward and forward+backward (head dims 64 and 128, documents of 1k, 4k and
           16k tokens) against SDPA's flash backend (and flash-attn where installed); fused
           linear cross-entropy at H=4096, V=128256, N=8192 and 32768 against eager and
           torch.compile, with peak memory;
  e2e      the end-to-end benchmark (benchmarks/bench_train.py) on the 1B shape: rega,
           rega-compile, hf-padded, hf-flatten (and hf-flatten-liger where installed); then FP8
           (train.precision = "fp8") against bf16, rega-compile-fp8 against rega-compile, on the
           1B shape and on Llama 3.1 8B's layer shape (4 layers, rows of 8192 tokens), one
           bench_train run each (each within the stage's timeout). FP8 is skipped, with the
           reason, where torchao is missing or the GPU is below sm_89.

It writes benchmarks/results/gpu_check_<device>.json and .md (versions, every figure, every test
outcome, the targets met or not) and exits 1 when a correctness check fails: a GPU test, a stage
that crashed, a rega kernel that did not run, or systems of the end-to-end benchmark that disagree
on the first step's loss (they start from the same weights on the same data). A missed speed
target is reported, not an exit failure.

    python benchmarks/gpu_check.py                  # everything (aim: under 6 minutes on an
    H100/H200)
    python benchmarks/gpu_check.py --only kernels   # rerun one part (tests, kernels, e2e; comma
    list)
    python benchmarks/gpu_check.py --rehearsal      # on CPU: tiny shapes, torch backends (make
    test)

The rehearsal runs every stage, its arguments and its report on any machine, so the command
cannot rot between GPU slots; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
STAGES = ("tests", "kernels", "e2e")        # `env` always runs first
STAGE_TIMEOUT_S = {"env": 240, "tests": 240, "kernels": 150, "e2e": 240}

# What each stage measures, full size on a GPU and tiny in the rehearsal.
GPU_SHAPES = {
    "attention": dict(tokens=(16384,), doc_lens=(1024, 4096, 16384), head_dims=(64, 128),
                      num_heads=32, num_kv_heads=8, dtype="bfloat16", warmup=2, reps=5),
    "cross_entropy": dict(tokens=(8192, 32768), hidden_size=4096, vocab=128256,
                          dtype="bfloat16", warmup=2, reps=5),
    "e2e": ["--shapes", "1b", "--steps", "6", "--warmup", "2", "--sequential",
            "--systems", "rega,rega-compile,hf-padded,hf-flatten,hf-flatten-liger"],
    "e2e_fp8": [["--shapes", "1b", "--steps", "6", "--warmup", "2", "--sequential",
                 "--systems", "rega-compile,rega-compile-fp8"],
                ["--shapes", "8b-layers", "--steps", "4", "--warmup", "2", "--sequential",
                 "--systems", "rega-compile,rega-compile-fp8"]],
}
REHEARSAL_SHAPES = {
    "attention": dict(tokens=(256,), doc_lens=(64, 256), head_dims=(16,), num_heads=4,
                      num_kv_heads=2, dtype="float32", warmup=1, reps=2),
    "cross_entropy": dict(tokens=(128,), hidden_size=32, vocab=256, dtype="float32",
                          warmup=1, reps=2, include_compile=False),
    "e2e": ["--shapes", "tiny", "--steps", "1", "--warmup", "1", "--rows", "1", "--seq-len",
            "256", "--sequential", "--systems", "rega,rega-fp8,hf-padded"],
    # Compiled FP8 on the 1B and 8B layer shapes takes minutes per step on a CPU; the
    # rehearsal's rega-fp8 above runs the same FP8 code path through the benchmark.
    "e2e_fp8": None,
}
# First-step losses of the e2e systems must agree this closely (relative): same weights, same
# samples, same objective; bf16 kernels and reduction orders differ within a few parts in 1000.
FIRST_LOSS_RTOL = {"gpu": 2e-2, "rehearsal": 1e-3}

# The targets on an H100/H200 (bf16); reported as met or not, never an exit failure.
TARGETS = (
    ("attention d128, 16k-token documents, forward >= 450 TFLOP/s",
     lambda r: _attention_tflops(r, 128, 16384, "fwd"), lambda v: v >= 450),
    ("attention d128, 16k-token documents, forward+backward >= 350 TFLOP/s",
     lambda r: _attention_tflops(r, 128, 16384, "fwd+bwd"), lambda v: v >= 350),
    ("fused linear CE, N=8192: forward+backward time <= eager's",
     lambda r: _ce_ratio(r, 8192, "time_vs_eager"), lambda v: v <= 1.0),
    ("fused linear CE, N=8192: peak memory <= 25% of eager's",
     lambda r: _ce_ratio(r, 8192, "memory_vs_eager"), lambda v: v <= 0.25),
    ("1B end to end: rega MFU >= 50%",
     lambda r: _e2e_value(r, "rega", "mfu"), lambda v: v >= 0.5),
    ("1B end to end: rega >= 2x hf-padded real tokens/s",
     lambda r: _e2e_value(r, "rega", "speedup_vs_hf-padded"), lambda v: v >= 2.0),
    ("1B end to end: rega >= 1.2x hf-flatten real tokens/s",
     lambda r: _e2e_value(r, "rega", "speedup_vs_hf-flatten"), lambda v: v >= 1.2),
    ("8B layer shape: rega-compile-fp8 >= 1.3x rega-compile (bf16) real tokens/s",
     lambda r: _e2e_value(r, "rega-compile-fp8", "fp8_speedup", "8b-layers"), lambda v: v >= 1.3),
    ("1B end to end: rega-compile-fp8 >= 1.15x rega-compile (bf16) real tokens/s",
     lambda r: _e2e_value(r, "rega-compile-fp8", "fp8_speedup", "1b"), lambda v: v >= 1.15),
    # After the benchmark's few steps only; the "few hundred steps" is a longer run:
    # bench_train.py --shapes 1b --systems rega-compile,rega-compile-fp8 --steps 300
    ("1B end to end: FP8 loss at the last timed step within 1% of bf16's",
     lambda r: _e2e_value(r, "rega-compile-fp8", "fp8_loss_gap_last_step", "1b"),
     lambda v: abs(v) <= 0.01),
)


# --------------------------------------------------------------------------------------------
# Stages: each returns a dict with "status" ("ok" | "failed") and what it found.


def stage_env(args) -> dict:
    build = {"needed": False}
    if not _extension_imports() and not args.no_build:
        build = {"needed": True, "command": [sys.executable, "-m", "pip", "install", "--no-deps",
                                             "--no-build-isolation", "-e", str(REPO)]}
        proc = _run(build["command"], timeout=STAGE_TIMEOUT_S["env"])
        build.update(returncode=proc.returncode, log_tail=proc.stdout[-2000:])
    imports = _extension_imports()
    return {"status": "ok" if imports else "failed", "build": build,
            "extension_imports": imports, "versions": versions()}


def stage_tests(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *shlex.split(args.pytest_args)]
        proc = _run(command, timeout=args.timeouts["tests"], cwd=REPO)
        outcomes = read_junit(junit) if junit.is_file() else []
    counts = {kind: sum(o["outcome"] == kind for o in outcomes)
              for kind in ("passed", "failed", "error", "skipped")}
    # pytest exits 5 when nothing is collected: no GPU test at all is a broken suite, not a pass
    ok = proc.returncode == 0 and not counts["failed"] and not counts["error"]
    return {"status": "ok" if ok else "failed", "command": " ".join(command),
            "returncode": proc.returncode, "counts": counts, "outcomes": outcomes,
            "output_tail": proc.stdout[-3000:]}


def stage_kernels(args) -> dict:
    rows = _worker("kernels", args)
    broken = [r for r in rows if r["impl"] in ("rega", "rega_fused") and r["status"] != "ok"]
    return {"status": "failed" if broken else "ok", "rows": rows,
            "broken": [f"{r['impl']} {r.get('mode', '')} {r['status']}" for r in broken]}


def stage_e2e(args) -> dict:
    """bench_train once per run of the shapes table (the 1B comparison, then FP8 against bf16 on
    the 1B and 8B layer shapes), each within the stage's timeout; their rows, problems (per
    shape) and settings together."""
    shapes = REHEARSAL_SHAPES if args.rehearsal else GPU_SHAPES
    rtol = FIRST_LOSS_RTOL["rehearsal" if args.rehearsal else "gpu"]
    result = {"commands": [], "returncodes": [], "rows": [], "problems": [], "settings": {}}
    runs = [shapes["e2e"], *(shapes["e2e_fp8"] or [])]
    if shapes["e2e_fp8"] is None:
        result["skipped"] = ("FP8 against bf16 compiled on the 1B and 8B layer shapes: on GPUs "
                             "only (minutes per step on a CPU)")
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), *run,
                       "--out-dir", tmp, "--timeout", str(args.timeouts["e2e"])]
            proc = _run(command, timeout=args.timeouts["e2e"] + 30, cwd=REPO)
            reports = sorted(Path(tmp).glob("bench_train_*.json"))
            report = json.loads(reports[0].read_text()) if reports else None
        result["commands"].append(" ".join(command))
        result["returncodes"].append(proc.returncode)
        if report is None:
            result["problems"].append(f"bench_train {' '.join(run)}: wrote no report")
            result.setdefault("output_tails", []).append(proc.stdout[-3000:])
            continue
        for name, shape in report["shapes"].items():
            rows = [dict(row, shape=name) for row in shape["rows"]]
            _speedups(rows)
            result["rows"] += rows
            result["problems"] += [
                f"{name} {r['system']}: {r['status']} {r.get('reason', '')}".strip()
                for r in rows if r["status"] not in ("ok", "skipped")]
            result["problems"] += first_loss_disagreements(rows, rtol)
            result["settings"][name] = shape["settings"]
    failed = result["problems"] or any(result["returncodes"])
    return {"status": "failed" if failed else "ok", **result}


def _speedups(rows: list[dict]) -> None:
    """rega's real tokens/s over each Hugging Face baseline (rows of one shape), as
    `speedup_vs_<baseline>` (the targets read them); bench_train gives the FP8 systems their
    `fp8_speedup` over the same system in bf16 itself."""
    ok = {r["system"]: r for r in rows if r["status"] == "ok"}
    if "rega" in ok:
        for base in ("hf-padded", "hf-flatten", "hf-flatten-liger"):
            if base in ok:
                speedup = ok["rega"]["tokens_per_s"] / ok[base]["tokens_per_s"]
                ok["rega"][f"speedup_vs_{base}"] = speedup


def first_loss_disagreements(rows: list[dict], rtol: float) -> list[str]:
    """Systems whose first-step loss differs from rega's (else rega-compile's) by more than
    `rtol` (relative); the rows are those of one shape."""
    losses = {r["system"]: r["loss_first_step"] for r in rows
              if r["status"] == "ok" and r.get("loss_first_step") is not None}
    name = "rega" if "rega" in losses else "rega-compile"
    reference = losses.get(name)
    if reference is None:
        return []
    return [f"{system}: first-step loss {loss:.5f} vs {name}'s {reference:.5f} "
            f"(more than {rtol:.0e} apart: not the same objective)"
            for system, loss in losses.items() if abs(loss - reference) > rtol * abs(reference)]


STAGE_FUNCTIONS = {"env": stage_env, "tests": stage_tests, "kernels": stage_kernels,
                   "e2e": stage_e2e}


# --------------------------------------------------------------------------------------------
# The kernel benchmarks run in a worker process: a CUDA fault there cannot take the driver down.


def run_kernel_benchmarks(rehearsal: bool) -> list[dict]:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _bench_cross_entropy import bench_cross_entropy
    from bench_kernels import bench_attention

    shapes = REHEARSAL_SHAPES if rehearsal else GPU_SHAPES
    device = "cpu" if rehearsal else "cuda"
    attention = dict(shapes["attention"], dtype=getattr(torch, shapes["attention"]["dtype"]))
    cross_entropy = dict(shapes["cross_entropy"],
                         dtype=getattr(torch, shapes["cross_entropy"]["dtype"]))
    return (bench_attention(device=device, **attention)
            + bench_cross_entropy(device=device, **cross_entropy))


def _worker(name: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, "--worker", name, "--result", str(result)]
        if args.rehearsal:
            command.append("--rehearsal")
        proc = _run(command, timeout=args.timeouts[name], cwd=REPO)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{name} worker exited {proc.returncode}:\n{proc.stdout[-3000:]}")
        return json.loads(result.read_text())


# --------------------------------------------------------------------------------------------
# Facts about the machine


def versions() -> dict:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "triton", "transformers", "numpy", "pybind11", "flash_attn",
                    "liger_kernel"):
        try:
            module = __import__(package)
            found[package] = getattr(module, "__version__", "installed")
        except ImportError:
            found[package] = None
    import torch
    found["cuda"] = torch.version.cuda
    found["device"] = device_name()
    if torch.cuda.is_available():
        found["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                   timeout=30)
        found["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    return found


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _extension_imports() -> bool:
    probe = "import rega_engine._C, rega_engine.kernels"
    return _run([sys.executable, "-c", probe], timeout=120, cwd=REPO).returncode == 0


def _run(command: list[str], timeout: float, cwd: Path | None = None):
    try:
        return subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        return subprocess.CompletedProcess(command, 124, f"{output or ''}\n[timed out after "
                                                         f"{timeout:.0f} s]", None)
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(command, 127, str(e), None)


def read_junit(path: Path) -> list[dict]:
    """[{"test", "outcome" (passed|failed|error|skipped), "seconds", "message"}] of a JUnit XML."""
    outcomes = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (node.get("message") or node.text or "").strip().splitlines()
                message = message[0][:300] if message else ""
                break
        where = "::".join(p for p in (case.get("classname"), case.get("name")) if p)
        outcomes.append({"test": where,
                         "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                         "message": message})
    return outcomes


# --------------------------------------------------------------------------------------------
# Targets and the report


def _attention_tflops(report, head_dim, doc_len, mode):
    for row in _stage_rows(report, "kernels"):
        if (row.get("op") == "attention" and row["impl"] == "rega" and row["status"] == "ok"
                and row["head_dim"] == head_dim and row["doc_len"] == doc_len
                and row["mode"] == mode):
            return row["tflops"]
    return None


def _ce_ratio(report, n_tokens, key):
    for row in _stage_rows(report, "kernels"):
        if (row.get("op") == "linear_cross_entropy" and row["impl"] == "rega_fused"
                and row["n_tokens"] == n_tokens and row["status"] == "ok"):
            return row.get(key)
    return None


def _e2e_value(report, system, key, shape=None):
    for row in _stage_rows(report, "e2e"):
        if row["system"] == system and row["status"] == "ok" and shape in (None, row["shape"]):
            return row.get(key)
    return None


def _stage_rows(report, stage):
    return report["stages"].get(stage, {}).get("rows", [])


def evaluate_targets(report: dict) -> list[dict]:
    results = []
    for text, measure, met in TARGETS:
        value = measure(report)
        results.append({"target": text, "value": value,
                        "met": None if value is None else bool(met(value))})
    return results


def markdown(report: dict) -> str:
    lines = [f"# gpu-check on {report['device']}{' (rehearsal)' if report['rehearsal'] else ''}",
             "", f"{report['started']}, {report['wall_s']:.0f} s; result: "
             f"**{'ok' if report['ok'] else 'FAILED'}**", "", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["stages"]["env"].get("versions", {}).items()]
    lines += ["", "## Stages", "", "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, stage in report["stages"].items():
        notes = "; ".join(stage.get("problems", []) + stage.get("broken", [])
                          + ([stage["skipped"]] if stage.get("skipped") else []))
        if name == "tests" and "counts" in stage:
            notes = ", ".join(f"{v} {k}" for k, v in stage["counts"].items()) + (
                f"; {notes}" if notes else "")
        if "error" in stage:
            notes = stage["error"].strip().splitlines()[-1][:200]
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', 0):.0f} | {notes} |")
    failed_tests = [o for o in report["stages"].get("tests", {}).get("outcomes", [])
                    if o["outcome"] in ("failed", "error")]
    if failed_tests:
        lines += ["", "## Failed tests", ""]
        lines += [f"- `{o['test']}`: {o['message']}" for o in failed_tests]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['value']} | {met} |")
    for name in ("kernels", "e2e"):
        rows = _stage_rows(report, name)
        groups = {}
        for row in rows:  # one table per op: attention and cross-entropy rows share few columns
            groups.setdefault(row.get("op", name), []).append(row)
        for group, group_rows in groups.items():
            title = name if group == name else f"{name}: {group}"
            lines += ["", f"## {title}", "", _table(group_rows)]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> str:
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns and not isinstance(row[c], (list, dict))]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(out)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = " ".join(str(value).split())   # tracebacks and logs stay in the JSON
    return text if len(text) <= 80 else text[:77] + "..."


def device_slug(name: str, rehearsal: bool) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name.split("(")[0]).strip("-").lower()
    return f"rehearsal-{slug}" if rehearsal else slug


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STAGES),
                        help=f"comma-separated stages to run after env: {', '.join(STAGES)}")
    parser.add_argument("--rehearsal", action="store_true",
                        help="CPU rehearsal: tiny shapes and torch backends (run by make test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments for tests")
    parser.add_argument("--no-build", action="store_true", help="never build the extension")
    for stage, seconds in STAGE_TIMEOUT_S.items():
        if stage != "env":
            parser.add_argument(f"--{stage}-timeout", type=float, default=seconds,
                                help=f"seconds before the {stage} stage is given up")
    parser.add_argument("--worker", choices=("kernels",), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    args.timeouts = {s: getattr(args, f"{s}_timeout") for s in STAGES}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(run_kernel_benchmarks(args.rehearsal)))
        return 0
    import torch

    if not args.rehearsal and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device; on a CPU run `python benchmarks/gpu_check.py "
              "--rehearsal` (what make test does) to check the command itself", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = {"device": device_name(), "rehearsal": args.rehearsal,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}
    for name in ["env", *args.stages]:
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        stage_start = time.perf_counter()
        try:
            stage = STAGE_FUNCTIONS[name](args)
        except Exception:  # one broken stage must not silence the ones after it
            stage = {"status": "failed", "error": traceback.format_exc()[-3000:]}
        stage["seconds"] = round(time.perf_counter() - stage_start, 1)
        report["stages"][name] = stage
        print(f"gpu-check: {name} {stage['status']} ({stage['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
    report["targets"] = evaluate_targets(report)
    report["ok"] = all(s["status"] == "ok" for s in report["stages"].values())
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"gpu_check_{device_slug(report['device'], args.rehearsal)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu-check: wrote {stem}.json and .md", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
