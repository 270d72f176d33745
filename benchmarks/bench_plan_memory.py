"""Per-node memory of planning one epoch: P processes on a node, each its own plan or one shared.

Each process is a real `PackedLoader` (rank i of P, batch_size 8, seq_len 4096, window 65536) over
a format-1 dataset of N samples with SFT-like lengths (bench_packer's log-normal) whose token files
are sparse (zeros, no disk): planning needs only the lengths, and the figures are then the loader's
own. Unshared, every process builds its `_EpochRows` (today's behaviour for every rank); shared,
local rank 0 builds and writes them to a file in /dev/shm and the others map it
(rega_engine/data/shared_plan.py). Per configuration we measure

  * the sum over the P processes of their proportional set size (Pss of /proc/<pid>/smaps_rollup:
    a page mapped by k processes counts 1/k in each, so the sum is the node's memory for them),
    once every loader is open (before planning) and again at the moment all P hold the plan; each
    process has by then read every page of its plan arrays (as an epoch's batches do), so a shared
    file is counted in full, split between the processes;
  * each process's peak RSS (VmHWM of /proc/<pid>/status, read at that same moment), and what its
    RSS is made of then (RssAnon: its own; RssFile, RssShmem: pages it shares, counted in full in
    every process that maps them, so peak RSS summed over processes overstates the node);
  * the wall time until every process holds the plan, and the plan file's size.

The processes plan all at once, as ranks do at the start of a run. A configuration that would not
fit in the memory this machine has free (8 unshared processes at 100M samples need about 8 x 6
GiB) is measured at the largest N that fits instead, and said so; an estimate at full N is given
beside it, marked as one.

    python benchmarks/bench_plan_memory.py                    # 100,000,000 samples, P = 1 and 8
    python benchmarks/bench_plan_memory.py --samples 2000000 --out /tmp/plan_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_packer import machine, sft_lengths, write_sparse_dataset  # noqa: E402

GIB = 2 ** 30
BATCH_SIZE = 8
SAFETY = 0.65   # fraction of MemAvailable a configuration may be expected to use (--safety)


# -- one process --------------------------------------------------------------------------------

def _child(path: str, rank: int, procs: int, shared: bool, plan_dir: str, job: str) -> None:
    """One rank: opens its loader, then plans on the parent's word and holds the plan until told
    to exit. Talks JSON lines on stdout, listens on stdin."""
    from rega_engine.data.loader import PackedLoader
    from rega_engine.data.shared_plan import PlanSharing
    sharing = PlanSharing(rank, procs, job, plan_dir, timeout_s=3600) if shared else None
    built = []
    original = PackedLoader._build_rows
    PackedLoader._build_rows = lambda self, epoch: built.append(epoch) or original(self, epoch)
    loader = PackedLoader(path, batch_size=BATCH_SIZE, rank=rank, world_size=procs, prefetch=0,
                          pin_memory=False, share_plan=sharing)
    print(json.dumps({"opened": True}), flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    batches = len(loader)
    rows = loader._rows
    # Read every page of the plan, as an epoch's batches do (fill_batch reads bin_samples all
    # over, the deal read row_bins and bin_tokens in full).
    touched = sum(int(getattr(rows, name).sum()) for name in
                  ("bin_splits", "bin_samples", "bin_segments", "bin_tokens", "row_bins"))
    print(json.dumps({"planned": True, "seconds": time.perf_counter() - start,
                      "micro_batches": batches, "rows": rows.num_rows, "builds": len(built),
                      "plan_read_only": not rows.bin_samples.flags.writeable,
                      "checksum": touched}), flush=True)
    sys.stdin.readline()


# -- measuring ----------------------------------------------------------------------------------

def _rollup(pid: int) -> dict:
    """Pss and its parts, in bytes, from /proc/<pid>/smaps_rollup, and VmHWM / VmRSS."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            out[key.lower()] = int(rest.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _sums(rollups: list[dict]) -> dict:
    keys = ("pss", "pss_anon", "pss_file", "pss_shmem", "rss")
    return {f"{k}_sum_gib": sum(r.get(k, 0) for r in rollups) / GIB for k in keys}


def measure(path: Path, samples: int, procs: int, shared: bool, plan_dir: Path, log: Path) -> dict:
    job = f"bench-plan-memory-{os.getpid()}-{procs}-{int(shared)}-{samples}"
    command = [sys.executable, __file__, "--child", str(path), "{rank}", str(procs),
               str(int(shared)), str(plan_dir), job]
    children = []
    with open(log, "ab") as err:
        for rank in range(procs):
            children.append(subprocess.Popen([c.format(rank=rank) for c in command],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=err, text=True))
    try:
        for child in children:
            _expect(child, "opened", log)
        opened = [_rollup(c.pid) for c in children]
        start = time.perf_counter()
        for child in children:   # all at once, as ranks at the start of a run
            child.stdin.write("plan\n")
            child.stdin.flush()
        reports = [_expect(child, "planned", log) for child in children]
        wall = time.perf_counter() - start
        holding = [_rollup(c.pid) for c in children]
        files = [p for p in plan_dir.iterdir() if p.name.endswith(".plan")]
        plan_file = sum(p.stat().st_size for p in files)
        for child in children:
            child.stdin.write("exit\n")
            child.stdin.flush()
        for child in children:
            child.wait(timeout=120)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    left = sorted(p.name for p in plan_dir.iterdir())
    if len({r["checksum"] for r in reports}) != 1:
        raise RuntimeError(f"the processes' plans differ: {reports}")
    before, after = _sums(opened), _sums(holding)
    return {
        "procs": procs, "shared": shared, "samples": samples,
        "plan_wall_seconds": wall,
        "plan_seconds_per_process": [r["seconds"] for r in reports],
        "builds_per_process": [r["builds"] for r in reports],
        "plan_read_only_per_process": [r["plan_read_only"] for r in reports],
        "rows": reports[0]["rows"], "micro_batches_per_rank": reports[0]["micro_batches"],
        "opened": before,
        "pss_sum_gib_opened": before["pss_sum_gib"],
        "pss_sum_gib_holding_plan": after["pss_sum_gib"],
        "plan_pss_sum_gib": after["pss_sum_gib"] - before["pss_sum_gib"],
        "holding_plan": after,
        "peak_rss_gib_per_process": [r["vmhwm"] / GIB for r in holding],
        "peak_rss_gib_max": max(r["vmhwm"] for r in holding) / GIB,
        # what the peak RSS is made of, per process, at the moment all hold the plan: anonymous
        # memory is the process's own; file and shmem pages are shared with the others
        "rss_anon_gib_per_process": [r["rssanon"] / GIB for r in holding],
        "rss_file_gib_per_process": [r["rssfile"] / GIB for r in holding],
        "rss_shmem_gib_per_process": [r["rssshmem"] / GIB for r in holding],
        "peak_rss_gib_sum": sum(r["vmhwm"] for r in holding) / GIB,
        "plan_file_gib": plan_file / GIB,
        "plan_dir": str(plan_dir) if shared else None,
        "files_left_after_exit": left,
    }


def _expect(child: subprocess.Popen, key: str, log: Path) -> dict:
    line = child.stdout.readline()
    if not line:
        child.wait()
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"a child exited ({child.returncode}) before '{key}':\n{tail}")
    report = json.loads(line)
    assert report.get(key), report
    return report


# -- the benchmark ------------------------------------------------------------------------------

def describe_machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vm = " VM" if " hypervisor" in cpuinfo else ""
    gpu = Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None
    return (f"{os.cpu_count()}-core {platform.machine()}{vm}, {'a GPU' if gpu else 'no GPU'}, "
            f"{_mem_total() / GIB:.0f} GiB memory")


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _dataset(root: Path, lengths: np.ndarray) -> Path:
    path = root / f"ds_{len(lengths)}"
    if not path.exists():
        write_sparse_dataset(path, lengths)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000_000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--plan-dir", type=Path, default=None,
                        help="where shared plans go (default: a fresh folder in /dev/shm, else the "
                             "temp directory)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/plan_memory_cpu.json)")
    parser.add_argument("--safety", type=float, default=SAFETY,
                        help="fraction of MemAvailable a configuration may be estimated to need; "
                             "larger ones are measured at fewer samples")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, rank, procs, shared, plan_dir, job = args.child
        return _child(path, int(rank), int(procs), shared == "1", plan_dir, job)

    shm = Path("/dev/shm")
    base = args.plan_dir or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    plan_dir = Path(tempfile.mkdtemp(prefix="bench_plan_memory_", dir=base))
    work = Path(tempfile.mkdtemp(prefix="bench_plan_memory_data_"))
    log = work / "children.log"
    n = args.samples
    report = {"benchmark": "plan-memory", "machine": {**machine(), "description":
                                                      describe_machine(),
                                                      "mem_available_gib_at_start":
                                                      _mem_available() / GIB},
              "seq_len": 4096, "window": 65536, "batch_size": BATCH_SIZE, "samples": n,
              "lengths": "log-normal, median 350, sigma 1.0, clipped to 1..8192 "
                         "(bench_packer.sft_lengths)",
              "runs": [], "notes": []}
    try:
        lengths = sft_lengths(n)
        full = _dataset(work, lengths)

        def run(path, samples, procs, shared):
            print(f"plan memory: {samples} samples, {procs} process(es), "
                  f"{'shared' if shared else 'not shared'} ...", file=sys.stderr, flush=True)
            result = measure(path, samples, procs, shared, plan_dir, log)
            report["runs"].append(result)
            print(json.dumps({k: result[k] for k in ("procs", "shared", "samples",
                                                     "pss_sum_gib_holding_plan",
                                                     "plan_pss_sum_gib", "peak_rss_gib_max",
                                                     "plan_wall_seconds")}),
                  file=sys.stderr, flush=True)
            return result

        # One process alone: what a process costs, opened and at its peak, per sample.
        safety = args.safety
        single = run(full, n, 1, False)
        per_sample_peak = single["peak_rss_gib_max"] * GIB / n
        # a follower's own (private) memory; the dataset's file pages are shared
        per_sample_private = single["opened"]["pss_anon_sum_gib"] * GIB / n
        plan_file = run(full, n, 1, True)["plan_file_gib"] * GIB
        for procs in [p for p in args.procs if p > 1]:
            # Shared: the leader at its peak, the others opened, the file once.
            need = n * (per_sample_peak + (procs - 1) * per_sample_private) + plan_file
            if need <= safety * _mem_available():
                run(full, n, procs, True)
            else:
                report["notes"].append(f"{procs} shared processes at {n} samples would need about "
                                       f"{need / GIB:.1f} GiB: not run")
            # Unshared: every process at its peak at once.
            need = n * procs * per_sample_peak
            if need <= safety * _mem_available():
                run(full, n, procs, False)
                continue
            fit = int(safety * _mem_available() / (procs * per_sample_peak)) // 1_000_000
            fit *= 1_000_000
            report["notes"].append(
                f"{procs} unshared processes at {n} samples would need about {need / GIB:.1f} GiB "
                f"at their peak ({procs} x {single['peak_rss_gib_max']:.2f} GiB), more than "
                f"{safety:.0%} of the {_mem_available() / GIB:.1f} GiB available: measured at "
                f"{fit} samples instead, beside 1 unshared and {procs} shared processes at that "
                f"size for comparison")
            if fit < 1_000_000:
                continue
            small = _dataset(work, lengths[:fit])
            unshared = run(small, fit, procs, False)
            run(small, fit, 1, False)
            shared_small = run(small, fit, procs, True)
            scale = n / fit
            report.setdefault("estimates", {}).update({
                f"{procs}_unshared_at_{n}": {
                    "pss_sum_gib_holding_plan": unshared["pss_sum_gib_holding_plan"] * scale,
                    "peak_rss_gib_sum": unshared["peak_rss_gib_sum"] * scale,
                    "how": (f"the measured {procs} unshared processes at {fit} samples scaled "
                            f"linearly by {scale:.3f}: an estimate, not a measurement (every "
                            "per-sample array is linear in N)"),
                },
                f"{procs}_pss_sum_ratio_unshared_to_shared_at_{fit}": (
                    unshared["pss_sum_gib_holding_plan"]
                    / shared_small["pss_sum_gib_holding_plan"]),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
        leftover = sorted(p.name for p in plan_dir.iterdir()) if plan_dir.exists() else []
        report["plan_dir_left_after_all_runs"] = leftover
        shutil.rmtree(plan_dir, ignore_errors=True)
    report["notes"].append(
        "peak_rss_gib counts every resident page a process maps, shared ones in full: a follower's "
        "includes the whole shared plan file and the dataset's mapped files; its own memory is "
        "rss_anon_gib; the node's memory is the PSS sum")
    report["notes"].append(
        "pss_sum_gib_opened: every loader open, nothing planned (the dataset's mapped files and "
        "its per-sample kinds and domains; the samples' lengths are made only by the process "
        "that plans, for the build); plan_pss_sum_gib = holding - opened: the plan's own share "
        "of the node")
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or Path(__file__).resolve().parent / "results" / "plan_memory_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
