"""Prepare benchmark: throughput per core against the tokenizer's own batch encoding, peak memory
as the input grows, and two processes against one. Side by side in one run, repeated in turns.

Input: chat samples made from the bundled sample (rega_engine/demo/sample), each row made unique,
split over general / law / medicine as the demo's; the bundled tokenizer, plain template.
  * encode: the tokenizer's own batch encoding (`tokenizer(texts)`, Rust, one thread:
    RAYON_NUM_THREADS=1) of exactly the texts prepare renders, timed alone (rendering untimed);
  * prepare-1: `rega-engine prepare` in one process, data.workers = 1 (one core), wall time of
    the whole job: reading, mixture, rendering, tokenizing with offsets, writing shards and index;
  * prepare-2: `torchrun --nproc_per_node 2 -m rega_engine.cli prepare`, data.workers = 1 each;
  * prepare-2-shards: two plain processes, `prepare --shard 0/2` and `--shard 1/2` (a job array);
  * prepare-workers-2: one `rega-engine prepare` with data.workers = 2, two worker processes
    forked after the mixture is planned (the default on a 2-core machine: workers = cores);
  * torchrun-start: torchrun starting two processes that do nothing, its own fixed cost;
  * encode-pair: two encode runs at once; their summed rate over one's alone is what this
    machine allows two processes of pure tokenizing (the ceiling for prepare-2);
  * peak memory (max RSS) of prepare-1 at --samples / 10 and --samples.
Wall-clock rates, and CPU seconds (user + sys) beside them: on a machine other programs load,
the CPU-second ratios are the ones that hold.
Every measurement runs in its own process; the systems take turns, --repeats times, and the
figures are medians with min..max. Writes benchmarks/results/prepare_<machine>.json.

Planning at scale (--plan-samples, default 100M; 0 skips it): the mixture's sample table drawn
from synthetic row tables (general 30%, two domains 35% each, integration 0.1), once with
data.memory_gb = 1 and once with 8, each in its own process: seconds, and peak anonymous memory
(what the budget bounds; pages of the mapped tables are file-backed, the kernel's to drop).

    python benchmarks/bench_prepare.py --samples 135000
    python benchmarks/bench_prepare.py --samples 20000 --repeats 2     # a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "rega_engine" / "demo" / "sample"
ROLES = {"law": "You are an expert in the law of Arden.",
         "medicine": "You are a physician who knows the pharmacopoeia of Arden."}


def make_inputs(directory: Path, samples: int) -> dict:
    """JSONL sources holding `samples` rows in all, each row unique (its number in the question)."""
    sources = {}
    rows = {name: [json.loads(line) for line in open(SAMPLE / f"{name}.jsonl") if line.strip()]
            for name in ("general", "law", "medicine")}
    total = sum(len(r) for r in rows.values())
    for name, base in rows.items():
        n = max(1, round(samples * len(base) / total))
        path = directory / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                row = json.loads(json.dumps(base[i % len(base)]))
                row["messages"][0]["content"] += f" (case {i})"
                f.write(json.dumps(row) + "\n")
        sources[name] = str(path)
    return sources


def write_config(directory: Path, sources: dict, prepared: Path, shard_samples: int,
                 workers: int = 1) -> Path:
    toml = directory / f"{prepared.name}.toml"
    lines = ["[roles]", 'central_prompt = "You are a helpful assistant."', "[roles.prompts]",
             *(f'{k} = "{v}"' for k, v in ROLES.items()), "[data]",
             f'tokenizer = "{SAMPLE / "tokenizer"}"',
             f'general = "{sources["general"]}"', "seq_len = 512", f"workers = {workers}",
             f"shard_samples = {shard_samples}", f'prepared = "{prepared}"', "[data.domains]",
             f'law = "{sources["law"]}"', f'medicine = "{sources["medicine"]}"', ""]
    toml.write_text("\n".join(lines))
    return toml


def _env() -> dict:
    return dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)   # waited-for descendants included
    return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of the largest process, stdout) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    # the largest child so far
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return seconds, peak, out


def peak_rss_of(command: list[str]) -> tuple[float, int]:
    """(seconds, max RSS of this one child) via wait4."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def _anonymous_peak():
    """A thread sampling this process's anonymous resident memory (RssAnon); returns a function
    giving the peak so far in bytes."""
    import threading
    peak = [0]

    def sample():
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: peak[0]


# -- the child roles -----------------------------------------------------------------------------
def plan_role(samples: int, memory_gb: float, scratch: str) -> None:
    """Draws a mixture of `samples` samples from synthetic row tables within `memory_gb`."""
    import numpy as np

    from rega_engine.data.mixture import MEMORY_SLACK, ROW, Samples, count_samples, draw_samples
    from rega_engine.data.tables import TableStore
    from rega_engine.kinds import KIND_ID

    peak = _anonymous_peak()
    store = TableStore(memory_gb * 2**30 * MEMORY_SLACK, scratch)
    start = time.perf_counter()
    rows = {"general": int(samples * 0.3), "law": int(samples * 0.35 / 1.1),
            "medicine": int(samples * 0.35 / 1.1)}
    plan = []
    for domain, (name, n) in enumerate(rows.items()):
        table = store.empty(ROW, n)
        for first in range(0, n, 1 << 22):
            block = table[first:first + (1 << 22)]
            line = np.arange(first, first + len(block))
            block["file"], block["line"], block["offset"] = domain, line + 1, line * 120
            block["length"], block["text"], block["domain"], block["prompt"] = 120, False, 0, 0
        kind = KIND_ID["distilled" if name == "general" else "role"]
        plan.append((name, table, kind, domain, domain))
    made = time.perf_counter() - start
    counts = dict(rows)
    integration = {name: (round(0.1 * n) if name != "general" else 0) for name, n in rows.items()}
    start = time.perf_counter()
    table = draw_samples(plan, counts, integration, 0, store, 0)
    drawn = time.perf_counter() - start
    by_kind = count_samples(Samples(table, [t for _, t, *_ in plan], ["a", "b", "c"], ["", "", ""]),
                            ["general", "law", "medicine"])["kind"]
    print(json.dumps({"samples": int(len(table)), "memory_gb": memory_gb,
                      "seconds_rows": made, "seconds_draw": drawn,
                      "samples_per_s": len(table) / drawn, "peak_anonymous_gib": peak() / 2**30,
                      "tables_in_memory_gib": store.in_memory / 2**30,
                      "tables_mapped_gib": store.spilled / 2**30, "by_kind": by_kind}))


def encode_role(toml: str) -> None:
    """Renders the mixture's texts (untimed), then times the tokenizer's batch encoding of them."""
    from rega_engine.config import load_config
    from rega_engine.data.mixture import build_mixture
    from rega_engine.data.render import ChatRenderer
    from rega_engine.tokenizer import load_tokenizer

    config = load_config(toml)
    tokenizer = load_tokenizer(config.data.tokenizer)
    renderer = ChatRenderer(tokenizer, config.data.chat_template)
    texts = [renderer.text(s.messages, s.system)[0] for s in build_mixture(config).samples]
    start, cpu = time.perf_counter(), time.process_time()
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": sum(map(len, encoded)),
                      "samples": len(texts)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=135000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-samples", type=int, default=0)
    parser.add_argument("--plan-samples", type=int, default=100_000_000)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--memory-gb", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.role == "encode":
        return encode_role(args.config)
    if args.role == "plan":
        return plan_role(args.plan_samples, args.memory_gb, args.config)

    work = Path(tempfile.mkdtemp(prefix="rega-bench-prepare-"))
    big = make_inputs(work, args.samples)
    small_dir = work / "small"
    small_dir.mkdir()
    small = make_inputs(small_dir, args.samples // 10)
    python = sys.executable
    one_toml = write_config(work, big, work / "one", args.shard_samples)
    two_toml = write_config(work, big, work / "two", args.shard_samples)
    workers_toml = write_config(work, big, work / "workers", args.shard_samples, workers=2)
    small_toml = write_config(small_dir, small, small_dir / "small", args.shard_samples)
    prepare = [python, "-m", "rega_engine.cli", "prepare", "--config"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "rega_engine.cli", "prepare", "--config"]

    noop = work / "noop.py"
    noop.write_text("pass\n")
    runs = {"encode": [], "prepare-1": [], "prepare-2": [], "prepare-2-shards": [],
            "prepare-workers-2": [], "rss-small": [], "rss-big": []}
    torchrun_start, encode_pair = [], []
    cpu = {"prepare-1": [], "prepare-2": []}
    load_at_start = os.getloadavg()
    tokens = None
    for repeat in range(args.repeats):
        seconds, out = None, run_timed([python, __file__, "--role", "encode", "--config",
                                        str(one_toml)])[2]
        encode = json.loads(out.strip().splitlines()[-1])
        runs["encode"].append(encode["tokens"] / encode["seconds"])
        cpu.setdefault("encode", []).append(encode["cpu_seconds"])
        # no resuming between repeats
        for directory in (work / "one", work / "two", work / "pair", work / "workers",
                          small_dir / "small"):
            subprocess.run(["rm", "-rf", str(directory)], check=True)
        before = _children_cpu()
        seconds, peak = peak_rss_of([*prepare, str(one_toml)])
        cpu["prepare-1"].append(_children_cpu() - before)
        meta = json.loads((work / "one" / "meta.json").read_text())
        tokens = meta["num_tokens"]
        runs["prepare-1"].append(tokens / seconds)
        runs["rss-big"].append(peak)
        before = _children_cpu()
        seconds = run_timed([*torchrun, str(two_toml)])[0]
        cpu["prepare-2"].append(_children_cpu() - before)
        runs["prepare-2"].append(tokens / seconds)
        pair_toml = write_config(work, big, work / "pair", args.shard_samples)
        start = time.perf_counter()
        pair = [subprocess.Popen([*prepare, str(pair_toml), "--shard", f"{i}/2"], env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for i in range(2)]
        if any(p.wait() for p in pair):
            raise RuntimeError("prepare --shard failed:\n" + pair[0].stderr.read().decode()[-3000:])
        runs["prepare-2-shards"].append(tokens / (time.perf_counter() - start))
        seconds = run_timed([*prepare, str(workers_toml)])[0]
        runs["prepare-workers-2"].append(tokens / seconds)
        torchrun_start.append(run_timed([*torchrun[:5], str(noop)])[0])
        both = [subprocess.Popen([python, __file__, "--role", "encode", "--config", str(one_toml)],
                                 env=_env(), stdout=subprocess.PIPE, text=True) for _ in range(2)]
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in both]
        encode_pair.append(sum(r["tokens"] / r["seconds"] for r in rates) / runs["encode"][-1])
        same = all((work / "one" / p.relative_to(d)).read_bytes() == p.read_bytes()
                   for d in (work / "two", work / "pair", work / "workers") for p in d.rglob("*")
                   if p.is_file())
        runs["rss-small"].append(peak_rss_of([*prepare, str(small_toml)])[1])
        print(f"repeat {repeat + 1}/{args.repeats}: encode {runs['encode'][-1]:,.0f} tok/s, "
              f"prepare-1 {runs['prepare-1'][-1]:,.0f}, prepare-2 {runs['prepare-2'][-1]:,.0f}, "
              f"--shard pair {runs['prepare-2-shards'][-1]:,.0f}, "
              f"workers=2 {runs['prepare-workers-2'][-1]:,.0f}, "
              f"identical {same}",
              file=sys.stderr)

    def summary(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {
        "benchmark": "prepare", "machine": f"{platform.processor() or platform.machine()}, "
                                         f"{os.cpu_count()} cores", "samples": args.samples,
                                         "tokens": tokens,
        "shards": json.loads((work / "one" / "meta.json").read_text())["report"]["shards"],
        "repeats": args.repeats, "tokens_per_s": {k: summary(v) for k, v in runs.items()
                                                  if not k.startswith("rss")},
        "prepare_vs_encode_per_core": summary([p / e for p, e in zip(runs["prepare-1"],
                                                                     runs["encode"])]),
        "two_processes_vs_one": summary([b / a for a, b in zip(runs["prepare-1"],
                                                               runs["prepare-2"])]),
        "two_shard_processes_vs_one": summary([b / a for a, b in zip(runs["prepare-1"],
                                                                     runs["prepare-2-shards"])]),
        "two_workers_vs_one": summary([b / a for a, b in zip(runs["prepare-1"],
                                                             runs["prepare-workers-2"])]),
        "torchrun_start_seconds": summary(torchrun_start),
        "machine_two_encodes_vs_one": summary(encode_pair),
        "torchrun_note": ("prepare-2 runs under torchrun, whose launcher alone (importing torch, "
                          "starting two processes that do nothing) takes torchrun_start_seconds; "
                          "prepare-2-shards is the same two-process work without a launcher"),
        "cpu_seconds": {k: summary(v) for k, v in cpu.items()},
        # CPU seconds are what a loaded machine does not distort: the whole prepare job (start-up,
        # reading, mixture, rendering, tokenizing, writing) against the batch encoding call alone.
        "prepare_vs_encode_per_cpu_second": summary([e / p for e, p in zip(cpu["encode"],
                                                                           cpu["prepare-1"])]),
        "two_processes_cpu_vs_one": summary([b / a for a, b in zip(cpu["prepare-1"],
                                                                   cpu["prepare-2"])]),
        "two_processes_note": ("cpu: user+sys of all processes (torchrun's launcher included); "
                               "'if each had a core': one process's CPU seconds over half the "
                               "two's, an estimate for an unloaded machine"),
        "two_processes_vs_one_if_each_had_a_core": summary(
            [a / (b / 2) for a, b in zip(cpu["prepare-1"], cpu["prepare-2"])]),
        "peak_rss_gib": {"samples/10": summary([x / 2**30 for x in runs["rss-small"]]),
                         "samples": summary([x / 2**30 for x in runs["rss-big"]])},
        "peak_rss_growth_for_10x_input": summary([b / a for a, b in zip(runs["rss-small"],
                                                                        runs["rss-big"])]),
        "two_process_output_identical": same,
        "load_average": {"start": load_at_start, "end": os.getloadavg(),
                         "note": "other programs' load on the same cores; the figures are only as "
                                 "good as this"},
    }
    if args.plan_samples:
        plans = []
        for memory_gb in (1.0, 8.0):
            out = run_timed([python, __file__, "--role", "plan", "--plan-samples",
                             str(args.plan_samples), "--memory-gb", str(memory_gb), "--config",
                             str(work)])[2]
            plans.append(json.loads(out.strip().splitlines()[-1]))
            print(f"planning {plans[-1]['samples']:,} samples in {memory_gb} GB: "
                  f"{plans[-1]['seconds_draw']:.1f} s, peak anonymous "
                  f"{plans[-1]['peak_anonymous_gib']:.2f} GiB", file=sys.stderr)
        result["planning"] = plans
    print(json.dumps(result, indent=2))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"prepare_cpu-{os.cpu_count()}core.json"
    (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
