"""Host memory of filling a sharded model: per-rank peak memory of build_model under FSDP2 with 4
gloo processes on CPU (torchrun), the new way (no rank holds the whole model) against the old.

  load-slices     model.path: each rank reads only the rows of its shards from the safetensors
                  files (hf_io.load_state_dict_into, get_slice), as build_model does now;
  load-full       the old loader, re-implemented here: every rank reads each full tensor
                  (get_tensor), casts it and keeps its shard (distribute_tensor, src_data_rank
                  None);
  init-sharded    model.init_config: every rank draws the single process's tensors one at a time
                  on the CPU and keeps its shard (parallel._sharded_random_init);
  init-broadcast  the old init, re-implemented here: rank 0 builds the whole model on the CPU
                  (from_config(..., seed)) and set_model_state_dict broadcasts it tensor by
                  tensor (full_state_dict, broadcast_from_rank0).

Each variant runs in its own torchrun launch (4 processes, mesh 1 x 4, fp32 master weights,
OMP_NUM_THREADS=1), through train/parallel.py's build_model itself: meta build, fully_shard per
block and at the root, to_empty (each rank allocates its shards: a quarter of the model), fill.
The old ways are swapped in for the fill only.

What is measured, per rank, over build_model (from just before it to just after it), in MiB:
  * peak_anon: the peak of RssAnon (/proc/self/status, sampled every 2 ms by a thread), minus
    its value before: the process's own memory (the shards, full tensors, casts, buffers);
  * peak_file: the peak of RssFile, minus before: pages of mapped files the process touched.
    safetensors (0.8) hands out tensors backed by a private memory map of the checkpoint, rows
    from get_slice included, so the bytes a rank reads count here while the file is open, at the
    page cache's folio granularity (somewhat more than the bytes themselves). Page cache: shared
    between the ranks of a node and the kernel's to drop, but resident in each rank's RSS;
  * peak_rss: VmHWM after build_model, reset just before it (clear_refs 5), minus VmRSS before:
    the kernel's own high-water mark of resident memory of both kinds;
  * read: the bytes of the tensors the rank took from the safetensors handles;
  * shard: the bytes of the rank's local shards (fp32), what no fill can avoid;
  * ru_maxrss: resource.getrusage(RUSAGE_SELF).ru_maxrss, the process's lifetime peak (imports
    and process group included), for reference.
The checkpoint is written first (random bf16 weights, as Hugging Face checkpoints ship, split
into files of at most --file-size) to a temporary directory. The variants fill the same values:
`same_weights` compares sums of the first weights' shards.

    python benchmarks/bench_load_memory.py                                   # ~0.6B, ~3 min
    python benchmarks/bench_load_memory.py --layers 4 --hidden 512 --vocab 8000   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _safetensors_reads import SafetensorsReads

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("load-slices", "load-full", "init-sharded", "init-broadcast")
SEED = 1234
MIB = 2 ** 20
MEASURED = ("per rank, over build_model: peak_anon = peak RssAnon - RssAnon before (sampled "
            "every 2 ms); peak_file = peak RssFile - before (mapped checkpoint pages touched); "
            "peak_rss = VmHWM (reset by clear_refs before) - VmRSS before; read = bytes of "
            "tensors taken from the safetensors files; shard = the rank's fp32 shards; MiB")


def llama_config(args) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": args.vocab, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": 4096, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def write_checkpoint(directory: Path, config: dict, file_size: str) -> dict:
    """config.json (also as init.json) and random bf16 safetensors; returns the model's sizes."""
    import torch

    from rega_engine.model import CausalLM, ModelArgs, save_pretrained

    model = CausalLM(ModelArgs.from_hf_config(config), device="meta", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.empty(tuple(p.shape), dtype=torch.bfloat16).normal_(
                   0.0, 0.02, generator=generator) for name, p in model.named_parameters()}
    save_pretrained(model, directory / "checkpoint", state_dict=tensors,
                    max_shard_size=file_size)
    (directory / "init.json").write_text(json.dumps(config))
    sizes = [p.numel() for p in model.parameters()]
    files = sorted((directory / "checkpoint").glob("*.safetensors"))
    return {"parameters": sum(sizes), "fp32_mib": sum(sizes) * 4 / MIB,
            "largest_tensor_fp32_mib": max(sizes) * 4 / MIB,
            "checkpoint_dtype": "bf16", "checkpoint_files": len(files),
            "checkpoint_mib": sum(f.stat().st_size for f in files) / MIB}


# --------------------------------------------------------------------------------------------
# The old ways (the baseline; the library keeps only the new ones)


def old_load(model, path) -> list[str]:
    """Every rank reads each full tensor and keeps its shard (the loader before per-slice reads).
    Through hf_io.open_safetensors, as the new loader, so that SafetensorsReads sees both."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    from rega_engine.model import hf_io

    mapping = hf_io.weight_map(path)
    targets = hf_io._expected_tensors(model)
    by_file: dict[str, list[str]] = {}
    for name in sorted(targets):
        by_file.setdefault(mapping[name], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with hf_io.open_safetensors(file) as f:
                for name in names:
                    target = targets[name]
                    full = f.get_tensor(name).to(device=target.device, dtype=target.dtype)
                    target.copy_(distribute_tensor(full, target.device_mesh, target.placements,
                                                   src_data_rank=None))
    return sorted(targets)


def old_init(init_config: Path):
    """Rank 0 builds the whole model on the CPU and broadcasts it (rega-engine before)."""
    def fill(model, seed):
        import torch
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        from rega_engine.model import from_config
        full = {}
        if dist.get_rank() == 0:
            full = from_config(init_config, dtype=torch.float32, device="cpu",
                               seed=seed).state_dict()
        set_model_state_dict(model, full, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=True))
    return fill


# --------------------------------------------------------------------------------------------
# One rank


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(value.split()[0]) * 1024
    return values


class Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile, sampled every `interval` seconds until stop()."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, {"RssAnon": 0, "RssFile": 0}, False

    def run(self):
        while not self._done:
            now = status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._done = True
        self.join()
        now = status()
        return {key: max(value, now[key]) for key, value in self.peak.items()}


def worker(variant: str, directory: Path, out: Path) -> None:
    import gc

    # safetensors, DCP and FSDP2 too: what build_model imports on first use, imported before
    # the measurement starts
    import safetensors  # noqa: F401
    import torch
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from torch.distributed.tensor import DTensor

    from rega_engine import model as model_package
    from rega_engine.config import ModelConfig
    from rega_engine.train import parallel

    torch.set_num_threads(1)
    runtime = parallel.setup_runtime(device="cpu", dtype="fp32")
    if variant == "load-full":
        model_package.load_state_dict_into = old_load   # build_model imports it from here
    elif variant == "init-broadcast":
        parallel._sharded_random_init = old_init(directory / "init.json")
    if variant.startswith("load"):
        config = ModelConfig(path=str(directory / "checkpoint"))
    else:
        config = ModelConfig(init_config=str(directory / "init.json"))
    torch.distributed.barrier()
    gc.collect()
    before = status()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    counter = SafetensorsReads()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    with counter:
        model, _ = parallel.build_model(config, runtime, seed=SEED)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    after = status()
    torch.distributed.barrier()
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters()
                      if isinstance(p, DTensor))
    # A few weights, to check that the variants fill the same values.
    probe = {name: float(p.to_local().double().sum()) for name, p in
             list(model.named_parameters())[:3]}
    row = {"rank": runtime.rank, "seconds": seconds, "hwm_reset": hwm_reset,
           "peak_anon_mib": (peak["RssAnon"] - before["RssAnon"]) / MIB,
           "peak_file_mib": (peak["RssFile"] - before["RssFile"]) / MIB,
           "peak_rss_mib": ((after["VmHWM"] - before["VmRSS"]) / MIB if hwm_reset else None),
           "after_anon_mib": (after["RssAnon"] - before["RssAnon"]) / MIB,
           "shard_mib": shard_bytes / MIB, "read_mib": counter.bytes / MIB,
           "before_rss_mib": before["VmRSS"] / MIB,
           "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
           "probe": probe}
    with open(out.with_name(f"{out.stem}_rank{runtime.rank}.json"), "w") as f:
        json.dump(row, f)
    parallel.teardown_runtime(runtime)


# --------------------------------------------------------------------------------------------
# The driver


def run_variant(variant: str, directory: Path, processes: int, timeout: float) -> list[dict]:
    out = directory / f"{variant}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", __file__, "--worker", variant, str(directory),
               str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise SystemExit(f"{variant} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    rows = [json.loads(out.with_name(f"{out.stem}_rank{r}.json").read_text())
            for r in range(processes)]
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "DIR", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--file-size", default="1GB", help="safetensors files of at most this")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} cores")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "load_memory_cpu.json")
    args = parser.parse_args()
    if args.worker:
        variant, directory, out = args.worker
        worker(variant, Path(directory), Path(out))
        return

    import safetensors
    import torch
    config = llama_config(args)
    result = {"benchmark": "load_memory", "machine": args.machine, "torch": torch.__version__,
              "safetensors": safetensors.__version__, "measured": MEASURED,
              "processes": args.processes,
              "mesh": f"1 x {args.processes} (FSDP2 fully_shard per block and root, gloo, CPU)",
              "weights": "fp32 master weights (model.dtype = fp32)", "config": config}
    with tempfile.TemporaryDirectory(prefix="bench_load_memory_") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        result["model"] = write_checkpoint(directory, config, args.file_size)
        result["model"]["write_seconds"] = time.perf_counter() - started
        print(json.dumps(result["model"]), file=sys.stderr)
        result["variants"] = {}
        for variant in args.variants.split(","):
            rows, seconds = run_variant(variant, directory, args.processes, args.timeout)
            result["variants"][variant] = {"launch_seconds": seconds, "ranks": rows}
            print(variant, json.dumps({k: [round(r[k], 1) if r[k] is not None else None
                                           for r in rows]
                                       for k in ("peak_anon_mib", "peak_file_mib",
                                                 "peak_rss_mib", "shard_mib", "read_mib",
                                                 "seconds")}),
                  file=sys.stderr)
    summary = {}
    for variant, entry in result["variants"].items():
        rows = entry["ranks"]
        summary[variant] = {key: [None if r[key] is None else round(r[key], 1) for r in rows]
                            for key in ("peak_anon_mib", "peak_file_mib", "peak_rss_mib",
                                        "shard_mib", "read_mib", "after_anon_mib", "seconds")}
    result["summary"] = summary
    probes = {variant: [r["probe"] for r in entry["ranks"]]
              for variant, entry in result["variants"].items()}
    pairs = (("load-slices", "load-full"), ("init-sharded", "init-broadcast"))
    result["same_weights"] = {f"{a} == {b}": probes[a] == probes[b] for a, b in pairs
                              if a in probes and b in probes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
