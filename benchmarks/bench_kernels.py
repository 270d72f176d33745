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

RMSNorm with the residual add, RoPE and SwiGLU (`bench_small_ops`): bf16 at Llama-3 8B widths
(hidden 4096, intermediate 14336, 32/8 heads of 128), 8k and 32k tokens, forward and
forward+backward. Implementations: rega (Triton), eager PyTorch (the model's plain path),
torch.compile of the same function, Liger where installed. Each row has GB/s over the bytes a
fused kernel must move (one read of every input, one write of every output; the same count
for every implementation) and, on a GPU, that as a percentage of the device's DRAM bandwidth
(DEVICE_BANDWIDTH; these kernels aim at >= 85%). Without CUDA, `--ops rms_norm,rope,swiglu`
compares the PyTorch backend with eager and compiled PyTorch on the CPU (fp32, smaller).

Output: one JSON object on stdout (device, versions, shapes, rows) and a markdown table in
benchmarks/results/kernels_<device>.md (plus the JSON next to it).

    python benchmarks/bench_kernels.py                 # everything, on a CUDA machine
    python benchmarks/bench_kernels.py --quick         # 8k and 16k tokens, head dim 128
    python benchmarks/bench_kernels.py --ops attention --tokens 65536 --head-dims 128
    python benchmarks/bench_kernels.py --ops rms_norm,rope,swiglu --small-tokens 16384
"""
from __future__ import annotations

import argparse
import contextlib
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
    from rega_engine.kernels import varlen_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

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
        except Exception:  # missing, or built for another torch: a comparison fewer, no failure
            pass
        else:
            impls["flash-attn"] = lambda q, k, v, cu, max_len, offsets: flash_attn_varlen_func(
                q, k, v, cu, cu, max_len, max_len, causal=True)
    return impls


def _add_speedups(per_mode: dict) -> None:
    # Each mode's rega row gains speedup_vs_<impl>: the other implementation's time over ours.
    for by_impl in per_mode.values():
        ours = by_impl.get("rega")
        for name, row in by_impl.items():
            if ours is not None and name != "rega":
                ours[f"speedup_vs_{name}"] = round(row["ms"] / ours["ms"], 3)


def bench_attention(tokens=(8192, 16384, 32768, 65536), head_dims=(64, 128), num_heads=32,
                    num_kv_heads=8, dtype=torch.bfloat16, warmup=3, reps=10, doc_lens=None,
                    device=None, on_row=None) -> list[dict]:
    """One dict per (implementation, head dim, row, mode) with ms, TFLOP/s and the ratio of
    rega's speed to each other implementation's (>1: rega is faster). Rows hold log-uniform
    documents, or documents of exactly each length in `doc_lens` (one row per length).
    `on_row(row)` is called with each row as soon as it is measured (gpu_check saves it then),
    and again with rega's rows once their ratios are known."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = _attention_impls(device)
    layouts = ([(total, equal_documents(total, n)) for total in tokens for n in doc_lens]
               if doc_lens else [(total, document_lengths(total)) for total in tokens])
    rows = []
    for head_dim in head_dims:
        for _, lens in layouts:
            rows += _bench_attention_row(impls, lens, head_dim, num_heads, num_kv_heads, dtype,
                                         warmup, reps, device, equal=bool(doc_lens),
                                         on_row=on_row or (lambda row: None))
    return rows


def _bench_attention_row(impls, lens, head_dim, num_heads, num_kv_heads, dtype, warmup, reps,
                         device, equal, on_row) -> list[dict]:
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
            except Exception as e:  # Triton's compile and out-of-resources errors included
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                on_row(row)
                if device.type == "cuda":
                    with contextlib.suppress(Exception):  # fails too after a device fault
                        torch.cuda.empty_cache()
                continue
            tflops = attention_flops(lens, num_heads, head_dim, mode) / ms / 1e9
            row.update(status="ok", ms=round(ms, 3), tflops=round(tflops, 3))
            per_mode.setdefault(mode, {})[name] = row
            rows.append(row)
            on_row(row)
    _add_speedups(per_mode)
    for row in rows:
        if row["impl"] == "rega" and row["status"] == "ok":
            on_row(row)   # now with its speed-ups
    return rows


# ----------------------------------------------------------------------------------------------
# RMSNorm (+ residual), RoPE, SwiGLU: memory-bound kernels, timed against eager and compiled
# PyTorch (and Liger where installed), with the achieved bandwidth on a GPU
# ----------------------------------------------------------------------------------------------

# Peak DRAM bandwidth (bytes/s) by device-name fragment, most specific first: the figure the
# bandwidth percentage divides by (vendor datasheets; SXM parts unless the name says PCIe).
DEVICE_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                    ("A100-PCIE-40GB", 1.555e12), ("A100-SXM4-40GB", 1.555e12),
                    ("A100", 2.039e12), ("L40S", 0.864e12), ("A10G", 0.6e12),
                    ("RTX 4090", 1.008e12))
SMALL_OPS = ("rms_norm", "rope", "swiglu")


def device_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in DEVICE_BANDWIDTH if key in name), None)


def _rms_norm_case(tokens, hidden, dtype, device, gen):
    from rega_engine.kernels import rms_norm
    x, res = (torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
              .requires_grad_() for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype, generator=gen)).requires_grad_()
    grads = tuple(torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
                  for _ in range(2))
    backend = "triton" if device.type == "cuda" else "torch"

    def eager(x, res, w):   # the model's plain path: the add, then RMSNorm in fp32
        r = x + res
        rf = r.float()
        return w * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(r.dtype), r

    impls = {"rega": lambda x, res, w: rms_norm(x, w, 1e-6, residual=res, backend=backend),
             "eager": eager}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        pass
    else:
        if device.type == "cuda":
            def liger(x, res, w):   # Liger's norm has no residual input: the add runs apart
                r = x + res
                return LigerRMSNormFunction.apply(r, w, 1e-6), r
            impls["liger"] = liger
    e = torch.empty((), dtype=dtype).element_size()
    # forward: read x, residual, write y, new residual; backward: read dy, d new residual, the
    # saved sum, write dx (= d residual); the gain and the fp32 row statistics are negligible
    return dict(inputs=(x, res, w), grads=grads, impls=impls, eager=eager,
                bytes={"fwd": 4 * tokens * hidden * e, "fwd+bwd": 8 * tokens * hidden * e},
                shape={"tokens": tokens, "hidden": hidden})


def _rope_case(tokens, num_heads, num_kv_heads, head_dim, dtype, device, gen):
    from rega_engine.kernels import rotary_embedding

    from rega_engine.model.llama import apply_rope
    q = torch.randn(tokens, num_heads, head_dim, device=device, dtype=dtype,
                    generator=gen).requires_grad_()
    k = torch.randn(tokens, num_kv_heads, head_dim, device=device, dtype=dtype,
                    generator=gen).requires_grad_()
    # positions restarting per 512-token document, plain rope at theta 500000
    pos = (torch.arange(tokens, device=device) % 512)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    grads = (torch.randn_like(q), torch.randn_like(k))
    backend = "triton" if device.type == "cuda" else "torch"

    def eager(q, k, pos, inv_freq):   # the model's plain path: cos/sin from the positions
        angles = pos.float()[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    impls = {"rega": lambda q, k, pos, inv_freq: rotary_embedding(q, k, pos, inv_freq,
                                                                  backend=backend),
             "eager": eager}
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        pass
    else:
        if device.type == "cuda":
            def liger(q, k, pos, inv_freq):   # (1, heads, T, D) and full-width cos/sin tables
                angles = pos.float()[:, None] * inv_freq[None, :]
                cos = torch.cat([angles.cos()] * 2, -1)[None].to(q.dtype)
                sin = torch.cat([angles.sin()] * 2, -1)[None].to(q.dtype)
                qo, ko = LigerRopeFunction.apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 cos, sin)
                return qo[0].transpose(0, 1), ko[0].transpose(0, 1)
            impls["liger"] = liger
    e = torch.empty((), dtype=dtype).element_size()
    moved = 2 * tokens * (num_heads + num_kv_heads) * head_dim * e   # read q, k; write q, k
    return dict(inputs=(q, k, pos, inv_freq), grads=grads, impls=impls, eager=eager,
                bytes={"fwd": moved, "fwd+bwd": 2 * moved},
                shape={"tokens": tokens, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                       "head_dim": head_dim})


def _swiglu_case(tokens, intermediate, dtype, device, gen):
    from rega_engine.kernels import swiglu
    gate, up = (torch.randn(tokens, intermediate, device=device, dtype=dtype, generator=gen)
                .requires_grad_() for _ in range(2))
    grads = (torch.randn(tokens, intermediate, device=device, dtype=dtype, generator=gen),)
    backend = "triton" if device.type == "cuda" else "torch"

    def eager(gate, up):
        return (F.silu(gate) * up,)

    impls = {"rega": lambda gate, up: (swiglu(gate, up, backend=backend),), "eager": eager}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        pass
    else:
        if device.type == "cuda":
            impls["liger"] = lambda gate, up: (LigerSiLUMulFunction.apply(gate, up),)
    e = torch.empty((), dtype=dtype).element_size()
    # forward: read gate, up, write y; backward: read dy, gate, up, write d gate, d up
    return dict(inputs=(gate, up), grads=grads, impls=impls, eager=eager,
                bytes={"fwd": 3 * tokens * intermediate * e, "fwd+bwd": 8 * tokens * intermediate
                       * e},
                shape={"tokens": tokens, "intermediate": intermediate})


def bench_small_ops(tokens=(8192, 32768), hidden_size=4096, intermediate_size=14336, num_heads=32,
                    num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, warmup=3, reps=10,
                    ops=SMALL_OPS, include_compile=True, device=None) -> list[dict]:
    """One dict per (op, implementation, tokens, mode): ms, GB/s moved (the bytes a fused kernel
    must move at least, the same figure for every implementation), % of the device's DRAM
    bandwidth on a GPU, and rega's speed-up over each other implementation (>1: faster).
    Implementations: rega (the Triton kernel on CUDA; its PyTorch backend on CPU), eager
    PyTorch (the model's plain path), torch.compile of that, Liger where installed (CUDA)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = device_bandwidth(device)
    rows = []
    for op in ops:
        for n in tokens:
            gen = torch.Generator(device=device).manual_seed(0)
            if op == "rms_norm":
                case = _rms_norm_case(n, hidden_size, dtype, device, gen)
            elif op == "rope":
                case = _rope_case(n, num_heads, num_kv_heads, head_dim, dtype, device, gen)
            elif op == "swiglu":
                case = _swiglu_case(n, intermediate_size, dtype, device, gen)
            else:
                raise ValueError(f"bench_small_ops: unknown op {op!r}; choose from {SMALL_OPS}")
            impls = dict(case["impls"])
            if include_compile:
                torch._dynamo.reset()
                impls["torch-compile"] = torch.compile(case["eager"])
            rows += _bench_small_row(op, case, impls, dtype, warmup, reps, device, peak)
    return rows


def _bench_small_row(op, case, impls, dtype, warmup, reps, device, peak) -> list[dict]:
    inputs, grads = case["inputs"], case["grads"]
    wrt = tuple(t for t in inputs if t.requires_grad)
    rows, per_mode = [], {}
    for name, fn in impls.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(*inputs), wrt, grads)

        for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            row = {"op": op, **case["shape"], "dtype": str(dtype).split(".")[-1], "impl": name,
                   "mode": mode}
            try:
                ms = time_ms(step, device, warmup, reps)
            except Exception as e:  # Triton's compile and out-of-resources errors included
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                continue
            gbps = case["bytes"][mode] / ms / 1e6
            row.update(status="ok", ms=round(ms, 4), gb_per_s=round(gbps, 1))
            if peak:
                row["bandwidth_pct"] = round(100 * gbps * 1e9 / peak, 1)
            per_mode.setdefault(mode, {})[name] = row
            rows.append(row)
    _add_speedups(per_mode)
    return rows


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

def _benches() -> dict:
    """Every op benchmark available: those defined here, and the cross-entropy one from its own
    module beside this file if it is there."""
    benches = {"attention": bench_attention, **{op: _small_op_bench(op) for op in SMALL_OPS}}
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


def _small_op_bench(op: str):
    def bench(**kwargs):
        return bench_small_ops(ops=(op,), **kwargs)
    return bench


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    for package in ("triton", "flash_attn", "liger_kernel"):
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
    parser.add_argument("--ops", default="all",
                        help="comma-separated: attention,cross_entropy,rms_norm,rope,swiglu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                        help="attention: tokens per packed row")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="attention at 8k/16k tokens, d=128")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--small-tokens", type=int, nargs="+", default=[8192, 32768],
                        help="rms_norm, rope, swiglu: tokens (Llama-3 8B widths)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and args.ops != "all" and set(args.ops.split(",")) <= set(
            SMALL_OPS):
        # the small ops' PyTorch backend against eager and compiled PyTorch, on this CPU: fp32,
        # Llama-3 1B widths (2048 / 8192), 2048 tokens
        rows = bench_small_ops(tokens=(2048,), hidden_size=2048, intermediate_size=8192,
                               head_dim=64, dtype=torch.float32, warmup=args.warmup,
                               reps=args.reps, ops=tuple(args.ops.split(",")), device="cpu")
        print(json.dumps({"device": "cpu", "versions": _versions(), "ops": {"small": rows}}))
        return 0
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
        elif op in SMALL_OPS:
            rows = benches[op](tokens=tuple(args.small_tokens), warmup=args.warmup,
                               reps=args.reps)
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
