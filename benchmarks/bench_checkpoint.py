"""Checkpoint benchmark: how long training stands still for a synchronous save and for
checkpoint.async, side by side in one run, on the same model and optimizer state.

One process (no process group, DCP's no_dist mode, as a single CPU run saves), a Llama of about
300M parameters in fp32 with AdamW's two moments (12 bytes a parameter), saved with the engine's
own `save_checkpoint` to a temporary folder on the local disk:
  * sync:  the whole save (DCP write, sha256 of every file, meta.json, rename) blocks training;
  * async: training is blocked until `save_checkpoint` returns (staging the state to host memory),
           and the write, hashing and rename finish in the background (`result()`).
Each is run --reps times, alternating; prints one JSON object (median, min and max of each) and
writes it to benchmarks/results/checkpoint_<machine>.json. Absolute seconds are this machine's
disk and memory bandwidth; the ratio blocked(async) / blocked(sync) is what carries over.

    python benchmarks/bench_checkpoint.py            # ~300M parameters, 3 reps
    python benchmarks/bench_checkpoint.py --layers 4 --reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rega_engine.model import from_config
from rega_engine.train.checkpoint import PendingCheckpoint, save_checkpoint


def llama_config(layers: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096,
            "rope_theta": 500000.0, "tie_word_embeddings": False}


def model_and_optimizer(layers: int):
    model = from_config(llama_config(layers), dtype=torch.float32, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for p in model.parameters():   # one step gives AdamW its two moments per parameter
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def one_save(out: Path, step: int, model, optimizer, background: bool) -> tuple[float, float]:
    """(seconds training was blocked, seconds until the checkpoint was complete)."""
    started = time.perf_counter()
    saved = save_checkpoint(out, step, model, optimizer, {"step": step}, keep=1,
                            background=background)
    blocked = time.perf_counter() - started
    if isinstance(saved, PendingCheckpoint):
        saved.result()
    return blocked, time.perf_counter() - started


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
            "runs": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    model, optimizer = model_and_optimizer(args.layers)
    params = sum(p.numel() for p in model.parameters())
    times = {"sync": ([], []), "async": ([], [])}
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        for rep in range(args.reps):
            for name in ("sync", "async"):
                blocked, complete = one_save(Path(tmp), rep * 2 + (name == "async") + 1, model,
                                             optimizer, background=name == "async")
                times[name][0].append(blocked)
                times[name][1].append(complete)
    result = {
        "benchmark": "checkpoint",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
                   f"torch threads ({platform.node() or 'unnamed host'})",
        "torch": torch.__version__,
        "parameters": params,
        "state_bytes": params * 12,
        "what": "one process, fp32 model + AdamW moments, local disk; blocked = training stands "
                "still; complete = the step_<N> folder exists (write, sha256, meta.json, rename)",
        "sync": {"blocked": summary(times["sync"][0]), "complete": summary(times["sync"][1])},
        "async": {"blocked": summary(times["async"][0]), "complete": summary(times["async"][1])},
    }
    result["blocked_ratio_async_over_sync"] = (result["async"]["blocked"]["median_s"]
                                               / result["sync"]["blocked"]["median_s"])
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else (Path(__file__).parent / "results"
                                           / "checkpoint_cpu-2core.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
