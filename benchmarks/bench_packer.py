"""Packer benchmark: fill ratio, planning and materialising speed, side by side with baselines.

SFT-like sample lengths (log-normal, median ~350 tokens, capped at 8192) are packed into rows of
4096 tokens. In the same run we time
  * our C++ planner (rega_engine.data.plan_bins), windowed as the loader runs it and as one window;
  * a straightforward pure-Python best-fit-decreasing (bisect over a sorted list of free
  capacities),
    on a subset when the full set would take minutes: its cost per sample grows with the number of
    open bins, so the subset flatters it, and the ratio is taken on the same subset;
  * TRL's pack_dataset(strategy="bfd") when `trl` is importable (not a project dependency);
  * materialising rows from a memory-mapped prepared dataset on one core.
Prints one JSON object and writes it under benchmarks/results/ with the machine it ran on.

    python benchmarks/bench_packer.py               # 1,000,000 samples
    python benchmarks/bench_packer.py --samples 100000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from bisect import bisect_left, insort
from pathlib import Path

import numpy as np

from rega_engine.data import PackedLoader, TokenDatasetWriter, plan_bins

SEQ_LEN = 4096
WINDOW = 65536
MAX_LEN = 8192


def sft_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(350), 1.0, n), 1, MAX_LEN).astype(np.int64)


def python_bfd(lengths, seq_len: int) -> list[int]:
    """Best-fit-decreasing as one would write it in plain Python."""
    bin_of = [-1] * len(lengths)
    free: list[int] = []              # free capacities of the open bins, sorted
    bins_with: dict[int, list] = {}   # free capacity -> bins that have exactly that much room
    num_bins = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[i]
        if length > seq_len:
            continue
        k = bisect_left(free, length)
        if k == len(free):
            b, rest = num_bins, seq_len - length
            num_bins += 1
        else:
            room = free.pop(k)
            b, rest = bins_with[room].pop(), room - length
        bin_of[i] = b
        if rest > 0:
            insort(free, rest)
            bins_with.setdefault(rest, []).append(b)
    return bin_of


def timed(fn, repeats: int = 1):
    """Best wall-clock and best CPU seconds (this process) over `repeats` runs, and fn's last
    result.

    On a shared machine the wall clock also counts time this process spent waiting for a core; CPU
    time does not, so ratios are taken on CPU time (every contender here runs on one thread).
    """
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(wall), max(min(cpu), 1e-9), result


def fill_ratio(lengths: np.ndarray, bins: np.ndarray, seq_len: int) -> float:
    kept = bins >= 0
    return float(lengths[kept].sum() / ((int(bins.max()) + 1) * seq_len))


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__, "load_average_at_start": load}


def bench_planning(lengths: np.ndarray, python_subset: int, repeats: int) -> dict:
    n = len(lengths)
    wall_windowed, t_windowed, windowed = timed(lambda: plan_bins(lengths, SEQ_LEN, window=WINDOW),
                                                repeats)
    _, t_one, one_window = timed(lambda: plan_bins(lengths, SEQ_LEN), repeats)

    subset = lengths[: min(python_subset, n)]
    subset_list = subset.tolist()
    wall_python, t_python, py_bins = timed(lambda: np.asarray(python_bfd(subset_list, SEQ_LEN)))
    _, t_ours_subset, ours_subset = timed(lambda: plan_bins(subset, SEQ_LEN), repeats)
    assert ours_subset.max() == py_bins.max(), "both are best-fit-decreasing: same number of bins"
    return {
        "samples": n,
        "dropped_longer_than_seq_len": int((windowed < 0).sum()),
        "fill_ratio": fill_ratio(lengths, windowed, SEQ_LEN),
        "fill_ratio_one_window": fill_ratio(lengths, one_window, SEQ_LEN),
        "rows": int(windowed.max()) + 1,
        "plan_cpu_seconds": t_windowed,
        "plan_wall_seconds": wall_windowed,
        "plan_samples_per_s": n / t_windowed,
        "plan_one_window_samples_per_s": n / t_one,
        "python_bfd": {
            "samples": len(subset),
            "note": ("timed on a subset: pure Python is too slow for the full set; ratio taken "
                     "against our "
                     "one-window plan of the same subset" if len(subset) < n else "full set"),
            "cpu_seconds": t_python,
            "wall_seconds": wall_python,
            "samples_per_s": len(subset) / t_python,
            "ours_same_subset_samples_per_s": len(subset) / t_ours_subset,
            "speedup_same_subset": t_python / t_ours_subset,
            "speedup_vs_our_full_windowed_rate": (n / t_windowed) / (len(subset) / t_python),
        },
    }


def bench_trl(lengths: np.ndarray, subset: int, plan_rate: float) -> dict:
    try:
        import datasets
        import pyarrow as pa
        import trl
        from trl import pack_dataset
    except ImportError as e:
        return {"available": False,
                "reason": f"trl not importable ({e}); `pip install trl` to compare"}
    datasets.disable_progress_bars()
    lengths = lengths[: min(subset, len(lengths))]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)})
    # Explicit fingerprints: datasets would otherwise hash the whole table and the packing function.
    dataset = datasets.Dataset(table, fingerprint="bench-packer-input")
    result = {"available": True, "version": trl.__version__, "samples": len(lengths),
              "note": ("pack_dataset also rearranges the token column (Arrow take) and truncates "
                       "samples longer than seq_len instead of dropping them; its BFD runs per "
                       "datasets.map batch")}
    batchings = (("default_map_batch_1000", {}), (f"map_batch_{WINDOW}", {"batch_size": WINDOW}))
    for label, batch in batchings:
        map_kwargs = {"new_fingerprint": f"bench-packer-{label}", "keep_in_memory": True, **batch}
        wall, seconds, packed = timed(lambda: pack_dataset(dataset, SEQ_LEN, strategy="bfd",
                                                           map_kwargs=map_kwargs))
        real = int(np.minimum(lengths, SEQ_LEN).sum())
        result[label] = {"cpu_seconds": seconds, "wall_seconds": wall,
                         "samples_per_s": len(lengths) / seconds,
                         "fill_ratio": real / (len(packed) * SEQ_LEN),
                         "our_plan_speedup": plan_rate / (len(lengths) / seconds)}
    return result


def bench_materialise(lengths: np.ndarray, batch_size: int, subset: int, repeats: int) -> dict:
    """Rows of a shuffled epoch, memory-mapped from a prepared dataset (page cache warm)."""
    lengths = lengths[: min(subset, len(lengths))]
    rng = np.random.default_rng(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_packer_"))
    try:
        with TokenDatasetWriter(tmp / "ds", domains=["general", "law"], kind_weights={"role": 2.0},
                                pad_id=0,
                                vocab_size=32000, seq_len=SEQ_LEN) as writer:
            chunk = rng.integers(1, 32000, MAX_LEN * 64, dtype=np.int32)
            mask = rng.random(MAX_LEN * 64) < 0.6
            for i, n in enumerate(lengths.tolist()):
                at = (i * 7919) % (len(chunk) - n)
                writer.add(chunk[at:at + n], mask[at:at + n], i % 3, i % 2)
        loader = PackedLoader(tmp / "ds", batch_size=batch_size, prefetch=0, pin_memory=False)
        # The loader's own epoch plan and C++ store, to time the fill alone, without tensor
        # allocation.
        plan = loader._epoch_plan()
        store = loader._store
        B, L = batch_size, SEQ_LEN
        bufs = {name: np.empty((B, L), np.int64)
                for name in ("input_ids", "labels", "position_ids", "kind_ids", "domain_ids")}
        bufs["loss_weights"] = np.empty((B, L), np.float32)
        cu = np.empty(B * L + 1, np.int32)
        num_batches = len(plan.batches)

        def fill_all():
            for rows in plan.batches:
                store.fill_batch(plan.bin_splits, plan.bin_samples, rows, 0, cu_seqlens=cu, **bufs)

        _, t_epoch_plan, _ = timed(lambda: loader._make_plan(1), repeats)
        _, t_fill, _ = timed(fill_all, repeats)
        wall_loader, t_loader, _ = timed(lambda: sum(1 for _ in loader), 1)
        threaded = PackedLoader(tmp / "ds", batch_size=batch_size, prefetch=4, pin_memory=False)
        len(threaded)  # plan the epoch before the clock starts, as for the inline loader
        wall_threaded, t_threaded, _ = timed(lambda: sum(1 for _ in threaded), 1)
        real = loader.tokens_per_epoch
        slots = num_batches * B * L
        return {
            "samples": len(lengths), "batch_size": B, "seq_len": L, "micro_batches": num_batches,
            "real_tokens": real,
            "epoch_plan_cpu_seconds": t_epoch_plan,  # shuffle, plan, group rows, deal to ranks
            "fill_one_core_real_tokens_per_s": real / t_fill,
            "fill_one_core_slots_per_s": slots / t_fill,
            "loader_inline_real_tokens_per_s": {"cpu": real / t_loader, "wall": real / wall_loader},
            "loader_prefetch_thread_real_tokens_per_s": {"cpu": real / t_threaded,
                                                         "wall": real / wall_threaded},
            "note": ("fill: C++ fill_batch into reused buffers, one thread, CPU time; loader: "
                     "PackedLoader end to end (fresh torch tensors per batch, PackedBatch), "
                     "inline and with its prefetch thread; wall-clock figures count time spent "
                     "waiting for a core on a shared machine"),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_sparse_dataset(path: Path, lengths: np.ndarray) -> None:
    """A format-1 dataset of `lengths` whose token and mask files are sparse (all zeros, no disk):
    the loader's planning and memory at a scale whose tokens would not fit this disk."""
    path.mkdir(parents=True)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(path / "offsets.npy", offsets)
    np.save(path / "kinds.npy", (np.arange(len(lengths)) % 3).astype(np.uint8))
    np.save(path / "domains.npy", np.zeros(len(lengths), np.int16))
    tokens = int(offsets[-1])
    for name, size in (("tokens.bin", 4 * tokens), ("loss_mask.bin", tokens)):
        with open(path / name, "wb") as f:
            f.truncate(size)
    (path / "meta.json").write_text(json.dumps({
        "format": 1, "num_samples": len(lengths), "num_tokens": tokens, "domains": ["general"],
        "kinds": ["distilled", "role", "integration", "pretrain"],
        "kind_weights": {"distilled": 1.0, "role": 1.0, "integration": 1.0, "pretrain": 1.0},
        "pad_id": 0, "vocab_size": 32000, "seq_len": SEQ_LEN, "report": {}}))


def _scale_child(path: str, world_size: int, batch_size: int) -> None:
    import resource
    start = time.perf_counter()
    loader = PackedLoader(path, batch_size=batch_size, world_size=world_size, rank=0, prefetch=0,
                          pin_memory=False)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    batches = len(loader)   # plans the epoch
    planned = time.perf_counter() - start
    start = time.perf_counter()
    taken = 0
    for _ in loader:
        taken += 1
        if taken == 50:
            break
    fill = (time.perf_counter() - start) / taken
    print(json.dumps({"world_size": world_size, "open_seconds": opened, "plan_seconds": planned,
                      "samples": len(loader.dataset), "micro_batches_per_rank": batches,
                      "seconds_per_micro_batch": fill,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def bench_scale(samples: int, batch_size: int, worlds=(1, 8, 64)) -> dict:
    """Planning an epoch of `samples` and this rank's memory, for several world sizes (rank 0)."""
    import subprocess
    tmp = Path(tempfile.mkdtemp(prefix="bench_packer_scale_"))
    try:
        write_sparse_dataset(tmp / "ds", sft_lengths(samples))
        runs = []
        for world in worlds:
            out = subprocess.run([sys.executable, __file__, "--scale-child", str(tmp / "ds"),
                                  str(world),
                                  str(batch_size)], capture_output=True, text=True,
                                  check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"scale {samples}: world {world}: {runs[-1]}", file=sys.stderr)
        return {"samples": samples, "batch_size": batch_size, "seq_len": SEQ_LEN, "window": WINDOW,
                "runs": runs, "plan_samples_per_s": samples / runs[0]["plan_seconds"],
                "note": ("rank 0 of each world size, its own process; tokens are a sparse file "
                         "(zeros), so the figures are the loader's planning and per-sample "
                         "arrays, not page cache; seconds_per_micro_batch is the first 50 "
                         "batches' first touches of a sparse file (page faults), not the fill "
                         "rate: that is the materialise figure of the main run")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--python-subset", type=int, default=100_000,
                        help="samples for the pure-Python baseline (its cost per sample grows with "
                             "the set)")
    parser.add_argument("--trl-subset", type=int, default=None,
                        help="samples for TRL (default: all)")
    parser.add_argument("--materialise-samples", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/...)")
    parser.add_argument("--scale", type=int, default=0,
                        help="only plan an epoch of this many samples for 1, 8 and 64 ranks: time "
                             "and memory per rank")
    parser.add_argument("--scale-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_child:
        return _scale_child(args.scale_child[0], int(args.scale_child[1]), int(args.scale_child[2]))
    if args.scale:
        report = {"benchmark": "packer-scale", "machine": machine(),
                  "scale": bench_scale(args.scale, args.batch_size)}
        text = json.dumps(report, indent=2)
        print(text)
        results = Path(__file__).resolve().parent / "results"
        out = args.out or results / f"packer_scale_{args.scale}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        return report

    lengths = sft_lengths(args.samples)
    report = {"benchmark": "packer", "machine": machine(), "seq_len": SEQ_LEN, "window": WINDOW,
              "lengths": {"distribution": "log-normal, median 350, sigma 1.0, clipped to 1..8192",
                          "median": float(np.median(lengths)), "mean": float(lengths.mean())}}
    report["planning"] = bench_planning(lengths, args.python_subset, args.repeats)
    report["trl"] = bench_trl(lengths, args.trl_subset or args.samples,
                              report["planning"]["plan_samples_per_s"])
    report["materialise"] = bench_materialise(lengths, args.batch_size, args.materialise_samples,
                                              args.repeats)

    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or Path(__file__).resolve().parent / "results" / (
        "packer.json" if args.samples == 1_000_000 else f"packer_{args.samples}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
