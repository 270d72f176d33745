"""Kernel benchmarks, side by side in one run: one `bench_<op>(...)` function per op, each returning
a list of row dicts (one per implementation and shape); `main()` runs every op present.

Attention (`bench_attention`): causal varlen attention, bf16, head dims 64 and 128 (32 query and 8
key/value heads, the Llama-3 1B / 8B layouts), rows of 8k to 64k tokens packed with documents of
512 to 8k tokens (log-uniform lengths, fixed seed). Implementations:
  * rega          rega_engine.kernels.varlen_attention (Triton);
  * sdpa-flash    torch's scaled_dot_product_attention, flash backend, one call per document;
  * flash-attn    flash_attn.flash_attn_varlen_func, where the package is installed.
TFLOP/s count the causal work of the actual documents: forward 4 * sum(len^2) / 2 * Hq * D;
forward+backward 3.5x that (the backward counted as 2.5 forwards, flash-attn's convention).
Times: CUDA events, median of `reps` runs after warm-up (the first call autotunes). Ratios are
against the other implementations in the same run; absolute numbers only mean something on the
device printed with them.

Output: one JSON object on stdout (device, versions, shapes, rows) and a markdown table in
benchmarks/results/kernels_<device>.md (plus the JSON next to it).

    python benchmarks/bench_kernels.py                 # everything, on a CUDA machine
    python benchmarks/bench_kernels.py --quick         # 8k and 16k tokens, head dim 128
    python benchmarks/bench_kernels.py --ops attention --tokens 65536 --head-dims 128
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import time_ms  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FWD_BWD_FLOP_FACTOR = 3.5


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

def document_lengths(tokens: int, min_len: int = 512, max_len: int = 8192, seed: int = 0):
    """Log-uniform document lengths filling exactly `tokens` (the last one takes the rest)."""
    gen = torch.Generator().manual_seed(seed)
    lens, left = [], tokens
    while left > 0:
        u = torch.rand((), generator=gen).item()
        log_len = math.log(min_len) + u * (math.log(max_len) - math.log(min_len))
        length = int(round(math.exp(log_len)))
        length = min(length, left)
        lens.append(length)
        left -= length
    return lens


def attention_flops(lens, num_heads: int, head_dim: int, mode: str) -> float:
    fwd = 4.0 * sum(n * n for n in lens) / 2 * num_heads * head_dim
    return fwd if mode == "fwd" else FWD_BWD_FLOP_FACTOR * fwd


def equal_documents(tokens: int, doc_len: int) -> list[int]:
    """A row of `tokens` tokens holding documents of exactly `doc_len` tokens (the last may be
    shorter): the gpu-check shapes, where the TFLOP/s of one document length is the question."""
    lens = [doc_len] * (tokens // doc_len)
    return lens + ([tokens % doc_len] if tokens % doc_len else [])


def _attention_impls(device: torch.device):
    """rega, SDPA on the same documents (flash backend on CUDA, math on CPU) and flash-attn where
    installed; each takes (q, k, v, cu_seqlens, max_len, offsets)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rega_engine.kernels import varlen_attention

    backend = "triton" if device.type == "cuda" else "torch"
    sdpa_backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def rega(q, k, v, cu, max_len, offsets):
        return varlen_attention(q, k, v, cu, max_len, causal=True, backend=backend)

    def sdpa(q, k, v, cu, max_len, offsets):
        group = q.shape[1] // k.shape[1]
        outs = []
        with sdpa_kernel(sdpa_backend):
            for start, end in zip(offsets, offsets[1:]):
                qd, kd, vd = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
                if group > 1:  # the flash backend takes no GQA: expand K/V as a user would
                    kd = kd.repeat_interleave(group, dim=1)
                    vd = vd.repeat_interleave(group, dim=1)
                outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)[0]
                            .transpose(0, 1))
        return torch.cat(outs)

    impls = {"rega": rega, "sdpa-flash" if device.type == "cuda" else "sdpa-math": sdpa}
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            pass
        else:
            impls["flash-attn"] = lambda q, k, v, cu, max_len, offsets: flash_attn_varlen_func(
                q, k, v, cu, cu, max_len, max_len, causal=True)
    return impls


def bench_attention(tokens=(8192, 16384, 32768, 65536), head_dims=(64, 128), num_heads=32,
                    num_kv_heads=8, dtype=torch.bfloat16, warmup=3, reps=10, doc_lens=None,
                    device=None) -> list[dict]:
    """One dict per (implementation, head dim, row, mode) with ms, TFLOP/s and the ratio of
    rega's speed to each other implementation's (>1: rega is faster). Rows hold log-uniform
    documents, or documents of exactly each length in `doc_lens` (one row per length)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = _attention_impls(device)
    layouts = ([(total, equal_documents(total, n)) for total in tokens for n in doc_lens]
               if doc_lens else [(total, document_lengths(total)) for total in tokens])
    rows = []
    for head_dim in head_dims:
        for total, lens in layouts:
            rows += _bench_attention_row(impls, lens, head_dim, num_heads, num_kv_heads, dtype,
                                         warmup, reps, device, equal=bool(doc_lens))
    return rows


def _bench_attention_row(impls, lens, head_dim, num_heads, num_kv_heads, dtype, warmup, reps,
                         device, equal) -> list[dict]:
    total = sum(lens)
    offsets = [0, *torch.tensor(lens).cumsum(0).tolist()]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(total, h, head_dim, device=device, generator=gen, dtype=dtype)
               .requires_grad_() for h in (num_heads, num_kv_heads, num_kv_heads))
    grad_out = torch.randn(total, num_heads, head_dim, device=device, generator=gen, dtype=dtype)
    shape = {"op": "attention", "head_dim": head_dim, "tokens": total, "documents": len(lens),
             "doc_len": max(lens) if equal else "log-uniform", "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "dtype": str(dtype).split(".")[-1]}
    rows, per_mode = [], {}
    for name, fn in impls.items():
        run = lambda fn=fn: fn(q, k, v, cu, max(lens), offsets)  # noqa: E731

        def fwd(run=run):
            with torch.no_grad():
                run()

        def fwd_bwd(run=run):
            torch.autograd.grad(run(), (q, k, v), grad_out)

        for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            row = {**shape, "impl": name, "mode": mode}
            try:
                ms = time_ms(step, device, warmup, reps)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                continue
            tflops = attention_flops(lens, num_heads, head_dim, mode) / ms / 1e9
            row.update(status="ok", ms=round(ms, 3), tflops=round(tflops, 3))
            per_mode.setdefault(mode, {})[name] = row
            rows.append(row)
    for by_impl in per_mode.values():
        ours = by_impl.get("rega")
        for name, row in by_impl.items():
            if ours is not None and name != "rega":
                ours[f"speedup_vs_{name}"] = round(row["ms"] / ours["ms"], 3)
    return rows


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

def _benches() -> dict:
    """Every op benchmark available: those defined here, and the cross-entropy one from its own
    module beside this file if it is there."""
    benches = {"attention": bench_attention}
    cross_entropy = globals().get("bench_cross_entropy")
    if cross_entropy is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            from _bench_cross_entropy import bench_cross_entropy as cross_entropy
        except ImportError:
            cross_entropy = None
    if cross_entropy is not None:
        benches["cross_entropy"] = cross_entropy
    return benches


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    for package in ("triton", "flash_attn"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return versions


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns and c != "device"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="all", help="comma-separated: attention,cross_entropy")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                        help="attention: tokens per packed row")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="attention at 8k/16k tokens, d=128")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        message = ("bench_kernels: no CUDA device here; these benchmarks time GPU kernels, "
                   "nothing to do.")
        print(message, file=sys.stderr)
        print(json.dumps({"device": None, "skipped": message}))
        return 0
    benches = _benches()
    wanted = list(benches) if args.ops == "all" else args.ops.split(",")
    unknown = [op for op in wanted if op not in benches]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; available: {list(benches)}")
    if args.quick:
        args.tokens, args.head_dims = [8192, 16384], [128]
    device = torch.cuda.get_device_name()
    report = {"device": device, "versions": _versions(), "ops": {}}
    for op in wanted:
        if op == "attention":
            rows = bench_attention(tuple(args.tokens), tuple(args.head_dims), warmup=args.warmup,
                                   reps=args.reps)
            report["flop_convention"] = ("causal: 4 * sum(len^2) / 2 * Hq * D forward; "
                                         f"fwd+bwd = {FWD_BWD_FLOP_FACTOR} x forward")
        else:
            rows = benches[op](warmup=args.warmup, reps=args.reps)
        report["ops"][op] = rows
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# Kernel benchmarks on {device}\n", f"Versions: {report['versions']}\n"]
    if "flop_convention" in report:
        md.append(f"FLOPs: {report['flop_convention']}\n")
    for op, rows in report["ops"].items():
        md += [f"\n## {op}\n\n", markdown_table(rows)]
    (args.out_dir / f"kernels_{slug}.md").write_text("".join(md))
    (args.out_dir / f"kernels_{slug}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
