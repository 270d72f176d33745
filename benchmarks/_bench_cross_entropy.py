"""Linear cross-entropy benchmark: forward+backward time and peak memory, side by side in one run.

At H=4096, V=128256 (Llama-3 head), bf16, N in {4096, 8192, 16384, 32768} tokens (a quarter of
them ignored, as prompt tokens are in SFT), we time
  * eager PyTorch: F.linear, then F.cross_entropy on the logits upcast to fp32 (the usual recipe);
  * torch.compile of the same function;
  * Liger's LigerFusedLinearCrossEntropyLoss when `liger_kernel` is importable (not a dependency);
  * rega_engine.kernels.fused_linear_cross_entropy.
Time: CUDA events around loss + backward, after warm-up, median of several runs. Memory: peak
allocated during one forward+backward above what was allocated before it (the inputs), with the
gradients of hidden and weight counted for every implementation. Ratios are against eager in the
same run; absolute numbers only mean something on the device printed with them.

    python benchmarks/_bench_cross_entropy.py
    python benchmarks/_bench_cross_entropy.py --tokens 8192 --reps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

IGNORE = -100


def _implementations(include_compile: bool = True) -> dict:
    from rega_engine.kernels import fused_linear_cross_entropy

    def eager(hidden, weight, labels):
        return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE)

    impls = {"eager": eager}
    if include_compile:
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        impls["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    impls["rega_fused"] = lambda hidden, weight, labels: fused_linear_cross_entropy(
        hidden, weight, labels, backend="triton")
    return impls


def _inputs(n_tokens, hidden_size, vocab, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen)
              * hidden_size ** -0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    labels[torch.rand(n_tokens, device="cuda", generator=gen) < 0.25] = IGNORE
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _measure(fn, hidden, weight, labels, warmup, reps):
    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hidden.grad = weight.grad = None  # freeing last run's gradients is not part of the op
        start.record()
        fn(hidden, weight, labels).backward()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    hidden.grad = weight.grad = None
    return statistics.median(times), peak


def bench_cross_entropy(tokens=(4096, 8192, 16384, 32768), hidden_size=4096, vocab=128256,
                        dtype=torch.bfloat16, warmup=3, reps=10,
                        include_compile=True) -> list[dict]:
    """One dict per (implementation, N): ms (median fwd+bwd), peak_gib, ratios against eager."""
    if not torch.cuda.is_available():
        return []
    impls = _implementations(include_compile)
    device = torch.cuda.get_device_name()
    rows = []
    for n_tokens in tokens:
        hidden, weight, labels = _inputs(n_tokens, hidden_size, vocab, dtype)
        baseline = None
        for name, fn in impls.items():
            row = {"op": "linear_cross_entropy", "impl": name, "n_tokens": n_tokens,
                   "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype).split(".")[-1],
                   "device": device}
            try:
                ms, peak = _measure(fn, hidden, weight, labels, warmup, reps)
            except torch.cuda.OutOfMemoryError:
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                row["status"] = "out of memory"
                rows.append(row)
                continue
            row.update(status="ok", ms=round(ms, 3), peak_gib=round(peak / 2 ** 30, 3),
                       tokens_per_s=round(n_tokens / ms * 1e3))
            if name == "eager":
                baseline = row
            if baseline is not None:
                row["time_vs_eager"] = round(ms / baseline["ms"], 3)
                row["memory_vs_eager"] = round(peak / 2 ** 30 / baseline["peak_gib"], 3)
            rows.append(row)
        del hidden, weight, labels
        torch.cuda.empty_cache()
    return rows


def _print_table(rows):
    print(f"{'impl':<14}{'N':>7}{'ms':>10}{'peak GiB':>10}{'x eager t':>11}{'x eager mem':>13}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['impl']:<14}{r['n_tokens']:>7}  {r['status']}")
            continue
        print(f"{r['impl']:<14}{r['n_tokens']:>7}{r['ms']:>10.2f}{r['peak_gib']:>10.2f}"
              f"{r.get('time_vs_eager', float('nan')):>11.3f}"
              f"{r.get('memory_vs_eager', float('nan')):>13.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cross_entropy: no CUDA device here; this benchmark times GPU kernels, "
              "nothing to do.")
        return 0
    rows = bench_cross_entropy(tuple(args.tokens), args.hidden, args.vocab, warmup=args.warmup,
                               reps=args.reps, include_compile=not args.no_compile)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
