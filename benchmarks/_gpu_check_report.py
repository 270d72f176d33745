"""The report of `make gpu-check`: the speed targets, and the JSON and markdown files, rewritten
whole after every stage and every benchmark row (through a temporary file and a rename, so that a
run ended at any moment leaves the last complete version, never half a file).

The JSON: device, rehearsal, started, deadline_s, wall_s, finished (false while the run is still
going or if it was ended from outside), ok (no correctness failure), complete (nothing skipped),
skipped (every part not run, with why), stages (per stage: status "running", "ok", "failed",
"cut" (stopped by the deadline, its results so far kept) or "skipped", seconds, and its findings)
and targets.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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
     lambda r: _e2e_value(r, "rega", "mfu", "1b"), lambda v: v >= 0.5),
    ("1B end to end: rega >= 2x hf-padded real tokens/s",
     lambda r: _e2e_value(r, "rega", "speedup_vs_hf-padded", "1b"), lambda v: v >= 2.0),
    ("1B end to end: rega >= 1.2x hf-flatten real tokens/s",
     lambda r: _e2e_value(r, "rega", "speedup_vs_hf-flatten", "1b"),
     lambda v: v >= 1.2),
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


def stage_rows(report: dict, *stages: str) -> list[dict]:
    return [row for stage in stages for row in report["stages"].get(stage, {}).get("rows", [])]


def _attention_tflops(report, head_dim, doc_len, mode):
    for row in stage_rows(report, "kernels"):
        if (row.get("op") == "attention" and row["impl"] == "rega" and row["status"] == "ok"
                and row["head_dim"] == head_dim and row["doc_len"] == doc_len
                and row["mode"] == mode):
            return row["tflops"]
    return None


def _ce_ratio(report, n_tokens, key):
    for row in stage_rows(report, "kernels"):
        if (row.get("op") == "linear_cross_entropy" and row["impl"] == "rega_fused"
                and row["n_tokens"] == n_tokens and row["status"] == "ok"):
            return row.get(key)
    return None


def _e2e_value(report, system, key, shape=None):
    for row in stage_rows(report, "e2e", "fp8"):
        if row["system"] == system and row["status"] == "ok" and shape in (None, row["shape"]):
            if row.get(key) is not None:
                return row[key]
    return None


def evaluate_targets(report: dict) -> list[dict]:
    results = []
    for text, measure, met in TARGETS:
        value = measure(report)
        results.append({"target": text, "value": value,
                        "met": None if value is None else bool(met(value))})
    return results


def finish_fields(report: dict) -> None:
    """The summary fields, from the stages as they stand."""
    stages = report["stages"].values()
    report["ok"] = not any(s["status"] == "failed" for s in stages)
    report["skipped"] = [part for name, s in report["stages"].items()
                         for part in ([f"{name}: {s['reason']}"] if s["status"] == "skipped"
                                      else [f"{name}: {p}" for p in s.get("skipped", [])])]
    report["complete"] = (report.get("finished", False) and not report["skipped"]
                          and all(s["status"] in ("ok", "failed") for s in stages))
    report["targets"] = evaluate_targets(report)


def write(report: dict, stem: Path) -> None:
    """stem.json and stem.md, each replaced in one rename."""
    finish_fields(report)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"),
                         (".md", markdown(report))):
        path = stem.with_suffix(suffix)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# Markdown


def markdown(report: dict) -> str:
    if not report.get("finished"):
        result = "**running** (or ended from outside: what follows is all that was measured)"
    else:
        result = f"**{'ok' if report['ok'] else 'FAILED'}**" + (
            "" if report["complete"] else ", incomplete (see Skipped)")
    lines = [f"# gpu-check on {report['device']}{' (rehearsal)' if report['rehearsal'] else ''}",
             "", f"{report['started']}, {report.get('wall_s', 0):.0f} s of a "
             f"{report['deadline_s']:.0f} s deadline; result: {result}", ""]
    if report.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {part}" for part in report["skipped"]] + [""]
    env = report["stages"].get("env", {})
    if env.get("versions"):
        lines += ["## Versions", ""] + [f"- {k}: {v}" for k, v in env["versions"].items()] + [""]
    if env.get("build"):
        lines += ["## Build", "", f"- how: {env['build'].get('how') or 'nothing worked'}"]
        for attempt in env["build"].get("attempts", []):
            said = {k: v for k, v in attempt.items() if k not in ("log_tail",)}
            lines.append(f"- {_cell(json.dumps(said), 300)}")
        lines.append("")
    lines += ["## Stages", "", "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, stage in report["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', 0):.0f} | "
                     f"{_cell(_stage_notes(name, stage), 400)} |")
    failed_tests = [o for o in report["stages"].get("tests", {}).get("outcomes", [])
                    if o["outcome"] in ("failed", "error", "crashed")]
    if failed_tests:
        lines += ["", "## Failed tests", ""]
        lines += [f"- `{o['test']}` ({o['outcome']}): {o['message']}" for o in failed_tests]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report.get("targets", []):
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {_cell(t['value'])} | {met} |")
    for name in ("kernels", "e2e", "fp8"):
        groups = {}
        for row in stage_rows(report, name):  # one table per op: their columns differ
            groups.setdefault(row.get("op", name), []).append(row)
        for group, rows in groups.items():
            title = name if group == name else f"{name}: {group}"
            lines += ["", f"## {title}", "", _table(rows)]
    return "\n".join(lines) + "\n"


def _stage_notes(name: str, stage: dict) -> str:
    notes = []
    if stage.get("reason"):
        notes.append(stage["reason"])
    if name == "tests" and "counts" in stage:
        notes.append(", ".join(f"{v} {k}" for k, v in stage["counts"].items() if v))
    notes += stage.get("problems", []) + stage.get("broken", []) + stage.get("notes", [])
    notes += [f"skipped {part}" for part in stage.get("skipped", [])]
    if "error" in stage:
        notes.append(stage["error"].strip().splitlines()[-1])
    return "; ".join(n for n in notes if n)


def _table(rows: list[dict]) -> str:
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns and not isinstance(row[c], (list, dict))]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(out)


def _cell(value, width: int = 80) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = " ".join(str(value).split()).replace("|", "/")  # tracebacks and logs stay in the JSON
    return text if len(text) <= width else text[:width - 3] + "..."
