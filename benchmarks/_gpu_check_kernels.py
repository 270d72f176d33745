"""The kernels stage of `make gpu-check`, in a process of its own (a CUDA fault here cannot take the
driver down): benchmark units in order of value, each row appended to a JSON-lines file the moment
it is measured, so that a worker ended by the deadline or by a crash leaves every row before.

    python benchmarks/_gpu_check_kernels.py --units units.json --rows rows.jsonl
        --deadline-at EPOCH [--device cuda|cpu]

A unit is {"name", "bench": "module:function" (a module beside this file, or a path to a .py),
"kwargs", "estimate_s"}; the function is called with the kwargs, `device` and `on_row` and
returns its rows. A unit that would end past the deadline is not started. Lines written:
{"plan": [unit names], "pid"} first; per unit {"unit", "event": "start"}, {"unit", "row"} per row (a
row may come again, completed: the last one counts), {"unit", "error"} if it failed outside its
rows, {"unit", "event": "done"}; {"unit", "skipped"} for one not started; {"info": {...}} last.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _load(spec: str):
    module_name, _, function = spec.rpartition(":")
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        module = importlib.import_module(module_name)
    return getattr(module, function)


def _kwargs(unit: dict) -> dict:
    kwargs = dict(unit.get("kwargs", {}))
    if isinstance(kwargs.get("dtype"), str):
        import torch

        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    for key, value in kwargs.items():   # JSON has no tuples; the bench functions take them
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    return kwargs


def cross_entropy_weight_grad_path(device: str) -> str:
    """Which way the fused cross-entropy accumulated its weight gradient in this process: the
    memory target depends on it (kernels/cross_entropy.py, _accumulate_weight_grad)."""
    from rega_engine.kernels import cross_entropy as ce

    works = ce._FP32_OUT_ADDMM.get(device)
    if device != "cuda":
        return "PyTorch backend on CPU (the rehearsal): no Triton path, no figure"
    if works is None:
        return "not reached (no fused cross-entropy row ran)"
    if works:
        return ("torch.addmm(out_dtype=torch.float32) straight into the fp32 weight-gradient "
                "buffer (no (V, H) temporary per chunk)")
    import torch

    return (f"fallback: torch {torch.__version__} refused addmm(out_dtype=torch.float32), so "
            "each chunk's (V, H) product is a temporary added into the buffer (slower, more "
            "memory)")


def bench_cross_entropy_fallback_path(device=None, on_row=None, **kwargs) -> list[dict]:
    """The fused cross-entropy once more with the weight-gradient fallback forced, beside eager:
    what the fallback costs where the fast path runs. Nothing to measure where the fast path is
    already unavailable (the main rows are the fallback then)."""
    import torch

    sys.path.insert(0, str(HERE))
    from _bench_cross_entropy import bench_cross_entropy
    from rega_engine.kernels import cross_entropy as ce

    if device != "cuda" or not ce._fp32_out_addmm_works(torch.device("cuda")):
        return []
    forced = dict(ce._FP32_OUT_ADDMM)
    ce._FP32_OUT_ADDMM["cuda"] = False     # the cached check, so the fallback runs, quietly

    def relabel(row):
        if row["impl"] == "rega_fused":
            row["impl"] = "rega_fused_fallback_path"
        if on_row is not None:
            on_row(row)

    try:
        return bench_cross_entropy(device=device, include_compile=False, on_row=relabel,
                                   **kwargs)
    finally:
        ce._FP32_OUT_ADDMM.clear()
        ce._FP32_OUT_ADDMM.update(forced)


def run(units: list[dict], rows_path: Path, deadline_at: float, device: str) -> None:
    _append(rows_path, {"plan": [u["name"] for u in units], "pid": os.getpid()})
    for unit in units:
        left = deadline_at - time.time()
        if left < unit.get("estimate_s", 0):
            _append(rows_path, {"unit": unit["name"], "skipped":
                                f"deadline: {max(left, 0):.0f} s left, the unit takes about "
                                f"{unit.get('estimate_s', 0):.0f} s"})
            continue

        def on_row(row, name=unit["name"]):
            _append(rows_path, {"unit": name, "row": row})

        _append(rows_path, {"unit": unit["name"], "event": "start"})
        try:
            rows = _load(unit["bench"])(**_kwargs(unit), device=device, on_row=on_row)
            for row in rows:   # the completed rows (ratios are added once a unit is done)
                on_row(row)
        except Exception:  # a unit's set-up (inputs, imports): its rows catch their own errors
            _append(rows_path, {"unit": unit["name"], "error": traceback.format_exc()[-2000:]})
        _append(rows_path, {"unit": unit["name"], "event": "done"})
    info = {}
    if any("cross_entropy" in u["bench"] for u in units):
        try:
            info["ce_weight_grad_path"] = cross_entropy_weight_grad_path(device)
        except Exception as error:  # the report says why, the rows are what matters
            info["ce_weight_grad_path"] = f"unknown: {type(error).__name__}: {error}"
    _append(rows_path, {"info": info})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=Path, required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--deadline-at", type=float, required=True, help="time.time() to stop at")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    run(json.loads(args.units.read_text()), args.rows, args.deadline_at, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
