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
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import is_out_of_memory, peak_bytes, time_ms  # noqa: E402

IGNORE = -100


def _implementations(device: torch.device, include_compile: bool = True) -> dict:
    from rega_engine.kernels import fused_linear_cross_entropy

    def eager(hidden, weight, labels):
        return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE)

    impls = {"eager": eager}
    if include_compile:
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # missing, or built for another torch: a comparison fewer, no failure
        pass
    else:
        if device.type == "cuda":
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
            impls["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    backend = "triton" if device.type == "cuda" else "torch"
    impls["rega_fused"] = lambda hidden, weight, labels: fused_linear_cross_entropy(
        hidden, weight, labels, backend=backend)
    return impls


def _inputs(n_tokens, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen)
              * hidden_size ** -0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    labels[torch.rand(n_tokens, device=device, generator=gen) < 0.25] = IGNORE
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _measure(fn, hidden, weight, labels, warmup, reps, device):
    def drop_grads():  # freeing the last run's gradients is not part of the op
        hidden.grad = weight.grad = None

    ms = time_ms(lambda: fn(hidden, weight, labels).backward(), device, warmup, reps,
                 before=drop_grads)
    drop_grads()
    # the new gradients count: every implementation allocates them
    peak = peak_bytes(lambda: fn(hidden, weight, labels).backward(), device)
    drop_grads()
    return ms, peak


def bench_cross_entropy(tokens=(4096, 8192, 16384, 32768), hidden_size=4096, vocab=128256,
                        dtype=torch.bfloat16, warmup=3, reps=10,
                        include_compile=True, device=None, on_row=None) -> list[dict]:
    """One dict per (implementation, N): ms (median fwd+bwd), peak_gib (CUDA only), ratios
    against eager. `on_row(row)` is called with each row as soon as it is measured."""
    on_row = on_row or (lambda row: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = _implementations(device, include_compile)
    rows = []
    for n_tokens in tokens:
        hidden, weight, labels = _inputs(n_tokens, hidden_size, vocab, dtype, device)
        baseline = None
        for name, fn in impls.items():
            row = {"op": "linear_cross_entropy", "impl": name, "n_tokens": n_tokens,
                   "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype).split(".")[-1]}
            try:
                ms, peak = _measure(fn, hidden, weight, labels, warmup, reps, device)
            except Exception as e:  # Triton's compile and out-of-resources errors included
                hidden.grad = weight.grad = None
                row["status"] = ("out of memory" if is_out_of_memory(e)
                                 else f"failed: {type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                on_row(row)
                if device.type == "cuda":
                    with contextlib.suppress(Exception):  # fails too after a device fault
                        torch.cuda.empty_cache()
                continue
            row.update(status="ok", ms=round(ms, 3),
                       peak_gib=None if peak is None else round(peak / 2 ** 30, 3),
                       tokens_per_s=round(n_tokens / ms * 1e3))
            if name == "eager":
                baseline = row
            if baseline is not None:
                row["time_vs_eager"] = round(ms / baseline["ms"], 3)
                if peak is not None and baseline["peak_gib"]:
                    row["memory_vs_eager"] = round(peak / 2 ** 30 / baseline["peak_gib"], 3)
            rows.append(row)
            on_row(row)
        del hidden, weight, labels
        if device.type == "cuda":
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
