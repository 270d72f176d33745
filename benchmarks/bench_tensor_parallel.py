"""Tensor-parallel (TP) training throughput against the FSDP-only baseline, side by side in one run.

Every configuration is one torchrun launch of the same N = `--nproc` processes:

  fsdp   parallel.dp_shard = N, parallel.tp = 1: plain FSDP2, the baseline
  tpK    parallel.tp = K, parallel.dp_shard = N / K (2-D FSDP2 + TP, train/tensor_parallel.py),
         for each K of `--tp` (a K that does not divide N is recorded as skipped), with
         sequence parallelism unless `--no-sequence-parallel`

Each runs full training steps, the training loop's own `optimizer_step` (forward with labels and
loss weights, the fused loss, backward, gradient clipping, AdamW; rega_engine/train/loop.py), on
a model built by `build_model` from a random-init config.json of bench_train's shape (fp32 on
CPU; bf16 compute with fp32 master weights under FSDP2 on CUDA, as the loop does): `--warmup`
untimed steps, then `--steps` timed ones. The ranks of a tp group read the same rows and the
data-parallel ranks different ones, so configurations are compared per *global* batch: every step
trains on the same `--rows` packed rows of `--seq-len` tokens (documents of bench_long_context's
long-tailed "mix", the same in every row, random tokens of a fixed seed), each data-parallel rank
taking rows / dp of them. Reported per configuration:

  step_time_s           median over the timed steps of the slowest rank's time (CUDA synchronised)
  tokens_per_s          the global batch's real tokens / step time; tokens_per_s_per_gpu: / N
  mfu                   (flops_per_token() x real tokens + attention_flops(documents)) /
                        (step time x N x the device's bf16 peak), as bench_train: null where the
                        peak is unknown (CPU)
  peak_memory_bytes     torch.cuda.max_memory_allocated per rank (from the first step on) on GPU;
                        on CPU the process's peak RSS (informational only)
  loss_first_step       the first step's loss over the global batch (the data-parallel ranks'
                        shares summed); every configuration starts from the same weights on the
                        same rows, so the driver checks it agrees with fsdp's within 1e-4
                        relative (loss_matches_fsdp)
  *_vs_fsdp             tokens/s, step time and peak memory against fsdp's

A configuration that fails (out of memory, an error, the `--timeout`) is a status record with its
log's tail; the others still run. Results go to benchmarks/results/tensor_parallel_<device>.json
and .md.

    # 8 GPUs: Llama 3.1 8B's layers (bench_train's "8b-layers"), 8 rows of 8192 tokens a step
    python benchmarks/bench_tensor_parallel.py --shape 8b-layers --nproc 8 --tp 2,4,8
    # CPU (the plumbing only): tiny shape, 2 gloo processes, fsdp against tp2 (~1 minute)
    python benchmarks/bench_tensor_parallel.py

On CPU the times are no TP speed figure: gloo's collectives are memory copies, the two processes
share two cores (one thread each) and the tiny shape's matmuls are too small for splitting them to
pay; the CPU run checks that every configuration trains the same thing and that the report is
complete. What a GPU run has to show: tokens/s of tpK against fsdp on the same GPUs and the same
global batch, i.e. the cost of TP's two all-reduces per block forward and two backward (NVLink)
against FSDP's all-gathers and reduce-scatters, and the memory TP saves per GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The helpers beside this file (bench_train, bench_long_context, _procs), also with
# PYTHONSAFEPATH=1.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_long_context import _fmt, packed_row, row_documents, write_report  # noqa: E402
from bench_train import (  # noqa: E402
    LR,
    MAX_GRAD_NORM,
    RESULTS_DIR,
    RUN_SETTINGS,
    SHAPES,
    _adamw,
    _device_description,
    _versions,
)

MODEL_SEED = 0
DATA_SEED = 0
LOSS_RTOL = 1e-4
CPU_THREADS = 1      # one intra-op thread per rank, as bench_long_context (2 ranks on 2 cores)


# --------------------------------------------------------------------------------------------
# Worker: one rank of one configuration (under torchrun)


def dp_rows(seq_len: int, rows: int, vocab: int, dp_rank: int, dp: int):
    """Data-parallel rank `dp_rank`'s share (rows / dp consecutive rows) of the global batch, one
    PackedBatch: every row holds the documents of row_documents("mix"), its tokens drawn from one
    generator for the whole global batch, so any split of it reads the very same rows."""
    import torch

    from rega_engine.batch import IGNORE_INDEX, PackedBatch
    row = packed_row(row_documents("mix", seq_len), seq_len, vocab)   # the layout of one row
    per = rows // dp
    ids = torch.randint(1, vocab, (rows, seq_len),
                        generator=torch.Generator().manual_seed(DATA_SEED))
    ids = ids[dp_rank * per:(dp_rank + 1) * per].masked_fill(row.kind_ids < 0, 0)
    labels = ids.masked_fill(row.labels == IGNORE_INDEX, IGNORE_INDEX)
    cu = torch.cat([row.cu_seqlens[:-1] + r * seq_len for r in range(per)]
                   + [torch.tensor([per * seq_len], dtype=torch.int32)])
    return PackedBatch(input_ids=ids, labels=labels, position_ids=row.position_ids.repeat(per, 1),
                       cu_seqlens=cu, max_seqlen=row.max_seqlen,
                       kind_ids=row.kind_ids.repeat(per, 1),
                       domain_ids=row.domain_ids.repeat(per, 1),
                       loss_weights=(labels != IGNORE_INDEX).float(),
                       num_real_tokens=per * row.num_real_tokens)


def run_worker(args) -> None:
    import torch

    from rega_engine.config import ModelConfig, ParallelConfig
    from rega_engine.train.loop import optimizer_step
    from rega_engine.train.metrics import device_peak_flops, peak_memory_bytes
    from rega_engine.train.parallel import build_model, setup_runtime, teardown_runtime

    world = int(os.environ["WORLD_SIZE"])
    runtime = setup_runtime(args.device, timeout_s=args.timeout,
                            parallel=ParallelConfig(dp_shard=world // args.tp, tp=args.tp,
                                                    sequence_parallel=args.sequence_parallel))
    cuda = runtime.device.type == "cuda"
    if not cuda:
        torch.set_num_threads(CPU_THREADS)
    model, dtype = build_model(ModelConfig(init_config=args.model_config), runtime,
                               seed=MODEL_SEED)
    optimizer = _adamw(model, runtime.device)
    batch = dp_rows(args.seq_len, args.rows, model.args.vocab_size, runtime.dp_rank,
                    runtime.dp_size).to(runtime.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    times, losses = [], []
    for index in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(runtime.device)
        started = time.perf_counter()
        result = optimizer_step(model, optimizer, [batch], lr=LR, grad_clip=MAX_GRAD_NORM,
                                step=index + 1, world_size=runtime.grad_ranks,
                                distributed=runtime.distributed,
                                tp_leader=runtime.tp_rank == 0)   # its host sync: the loss
        if cuda:
            torch.cuda.synchronize(runtime.device)
        times.append(time.perf_counter() - started)
        losses.append(result.loss_value)
    result = {
        "rank": runtime.rank, "tp_rank": runtime.tp_rank, "dp_rank": runtime.dp_rank,
        "step_times_s": times[args.warmup:], "warmup_s": sum(times[:args.warmup]),
        "losses": losses, "rows_local": batch.input_ids.shape[0],
        "peak_memory_bytes": peak_memory_bytes(runtime.device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(runtime.device) if cuda else None,
        "peak_flops": device_peak_flops(runtime.device),
    }
    Path(args.result_dir, f"rank{runtime.rank}.json").write_text(json.dumps(result))
    teardown_runtime(runtime, finished=True)


# --------------------------------------------------------------------------------------------
# Driver


def launch(args, name: str, tp: int, work_dir: Path) -> list[dict] | dict:
    """Runs one configuration under torchrun; each rank's result, or a failure record."""
    from _procs import run_bounded
    out = work_dir / name
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve()), "--worker",
               "--result-dir", str(out), "--model-config", str(work_dir / "config.json"),
               "--shape", args.shape, "--tp", str(tp), "--seq-len", str(args.seq_len),
               "--rows", str(args.rows), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--device", args.device,
               "--timeout", str(args.timeout),
               *([] if args.sequence_parallel else ["--no-sequence-parallel"])]
    env = dict(os.environ, OMP_NUM_THREADS=str(CPU_THREADS), PYTHONUNBUFFERED="1")
    finished = run_bounded(command, args.timeout, out / "log.txt", env=env)
    ranks = [out / f"rank{r}.json" for r in range(args.nproc)]
    if finished.returncode or not all(p.exists() for p in ranks):
        return failure(finished, args.timeout)
    return [json.loads(p.read_text()) for p in ranks]


def failure(finished, timeout: float) -> dict:
    """A failed launch's record: timeout, oom or error, with the workers' own error line as the
    reason (torchrun's summary of the failed ranks comes after it in the log)."""
    text = finished.tail(20000)
    errors = [line.split("]: ", 1)[-1].strip() for line in text.splitlines()
              if re.search(r"(Error|Exception)\b.*:", line) and "ChildFailedError" not in line]
    oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
    status = "timeout" if finished.timed_out else "oom" if oom else "error"
    reason = (f"no result within {timeout:.0f} s" if finished.timed_out
              else errors[-1][:300] if errors else f"exit status {finished.returncode}")
    return {"status": status, "reason": reason, "log_tail": finished.tail(3000),
            "wall_s": finished.seconds}


def summarise(args, ranks: list[dict], flops: float, real_tokens: int) -> dict:
    from rega_engine.train.metrics import mfu
    first = ranks[0]
    # Per timed step the slowest rank's time (the step ends for all with its collectives).
    slowest = [max(r["step_times_s"][i] for r in ranks) for i in range(args.steps)]
    step_time = statistics.median(slowest)
    tokens_per_s = real_tokens / step_time
    return {
        "status": "ok", "dtype": first["dtype"], "threads_per_rank": first["threads"],
        "step_time_s": step_time, "step_times_s_slowest_rank": slowest,
        "warmup_s": max(r["warmup_s"] for r in ranks),
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / args.nproc,
        "mfu": mfu(flops, step_time, first["peak_flops"], args.nproc),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_bytes_by_rank": [r["peak_memory_bytes"] for r in ranks],
        "rows_per_rank": [r["rows_local"] for r in ranks],
        # Each data-parallel rank's share of the loss, counted once per tp group.
        "loss_first_step": sum(r["losses"][0] for r in ranks if r["tp_rank"] == 0),
        "loss_last_step": sum(r["losses"][-1] for r in ranks if r["tp_rank"] == 0),
    }


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["config"] == "fsdp" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok" or base is None:
            continue
        for key in ("tokens_per_s", "step_time_s", "peak_memory_bytes"):
            row[f"{key}_vs_fsdp"] = row[key] / base[key]
        diff = abs(row["loss_first_step"] - base["loss_first_step"]) / abs(base["loss_first_step"])
        row["loss_rel_diff_vs_fsdp"] = diff
        row["loss_matches_fsdp"] = diff <= LOSS_RTOL


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# Tensor parallelism against FSDP: {report['device']}", "",
             f"Shape {c['shape']}, {c['nproc']} processes, global batch {c['rows']} rows x "
             f"{c['seq_len']} tokens ({report['real_tokens_per_step']} real tokens), "
             f"{c['steps']} timed steps (median of the slowest rank) after {c['warmup']} "
             "warm-up; full training steps (forward, fused loss, backward, AdamW).", "",
             "| config | tp | dp_shard | step (s) | tokens/s | tokens/s/GPU | x fsdp | MFU | "
             "peak mem (MiB) | loss step 1 | loss rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        head = f"| {row['config']} | {row['tp']} | {row['dp_shard']} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']}: {row.get('reason', '')} |" + " |" * 7)
            continue
        lines.append(
            f"{head} {row['step_time_s']:.3f} | {row['tokens_per_s']:.0f} | "
            f"{row['tokens_per_s_per_gpu']:.0f} | {_fmt(row.get('tokens_per_s_vs_fsdp'), '.2f')} "
            f"| {_fmt(row['mfu'], '.1%')} | {row['peak_memory_bytes'] / 2**20:.0f} | "
            f"{row['loss_first_step']:.6f} | {_fmt(row.get('loss_rel_diff_vs_fsdp'), '.1e')} |")
    lines += ["", "Peak memory: " + ("CUDA max allocated, most loaded rank." if c["device"] ==
                                     "cuda" else "peak RSS of the largest rank's process "
                                     "(weights, allocator and Python included): informational.")]
    load = report["load_average_1min"]
    lines.append(f"Load average (1 min) before / after the run: {load['before']:.1f} / "
                 f"{load['after']:.1f} on {load['cores']} cores.")
    if c["note"]:
        lines.append(c["note"] + ".")
    return "\n".join(lines) + "\n"


def run_driver(args) -> int:
    import torch

    from rega_engine.model import from_config
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    device_name, slug = _device_description(device)
    shape = SHAPES[args.shape]
    meta = from_config({**shape, "model_type": "llama"}, device="meta")
    docs = row_documents("mix", args.seq_len)
    real_tokens = args.rows * sum(docs)
    flops = args.rows * (meta.flops_per_token() * sum(docs) + meta.attention_flops(docs))
    configs = [("fsdp", 1)] + [(f"tp{k}", k) for k in args.tp_degrees]
    print(f"bench_tensor_parallel on {device_name}: shape {args.shape}, {args.nproc} processes, "
          f"{args.rows} x {args.seq_len} tokens a step, {[n for n, _ in configs]}",
          file=sys.stderr, flush=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rega-tensor-parallel-") as work:
        (Path(work) / "config.json").write_text(json.dumps(
            {**shape, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
             "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}))
        for name, tp in configs:
            row = {"config": name, "tp": tp, "dp_shard": args.nproc // tp}
            t0 = time.perf_counter()
            if args.nproc % tp:
                row.update(status="skipped", reason=f"tp {tp} does not divide {args.nproc}")
            else:
                ranks = launch(args, name, tp, Path(work))
                row.update(ranks if isinstance(ranks, dict)
                           else summarise(args, ranks, flops, real_tokens))
            rows.append(row)
            print(f"  {name}: {row['status']} ({time.perf_counter() - t0:.0f} s)"
                  + (f" {row['tokens_per_s']:.0f} tokens/s, loss@1 {row['loss_first_step']:.6f}"
                     if row["status"] == "ok" else f" {row.get('reason', '')}"),
                  file=sys.stderr, flush=True)
    add_ratios(rows)
    report = {
        "device": device_name, "versions": _versions(),
        "config": {"device": device, "shape": args.shape, "shape_dims": shape,
                   "nproc": args.nproc, "tp": args.tp_degrees, "seq_len": args.seq_len,
                   "rows": args.rows, "warmup": args.warmup, "steps": args.steps,
                   "model_seed": MODEL_SEED, "data_seed": DATA_SEED, "loss_rtol": LOSS_RTOL,
                   "sequence_parallel": args.sequence_parallel,
                   "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": 0.0,
                                 "max_grad_norm": MAX_GRAD_NORM},
                   "precision": "bf16 compute, fp32 master weights (FSDP2)" if device == "cuda"
                   else "fp32",
                   "note": "CPU step times are no TP speed figure: gloo's collectives are "
                           "memory copies, the processes share the cores (one thread each) "
                           "and the tiny shape's matmuls are too small to gain from a split"
                           if device == "cpu" else None},
        "doc_lengths_per_row": docs, "real_tokens_per_step": real_tokens,
        "flops_per_step": flops, "rows": rows, "wall_s": time.perf_counter() - started,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0],
                              "cores": os.cpu_count()},
    }
    write_report(report, args.out_dir / f"tensor_parallel_{slug}", markdown(report))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")
           or r.get("loss_matches_fsdp") is False]
    return 1 if bad else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="default: tiny on CPU, 8b-layers on CUDA")
    parser.add_argument("--nproc", type=int, default=2, help="processes of every configuration")
    parser.add_argument("--tp", default="2", help="comma-separated tp degrees besides fsdp")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens a row (default: bench_train's for the shape)")
    parser.add_argument("--rows", type=int, default=None,
                        help="global rows a step, a multiple of --nproc (default: --nproc)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--timeout", type=float, default=600.0, help="per torchrun launch (s)")
    parser.add_argument("--no-sequence-parallel", dest="sequence_parallel",
                        action="store_false", help="tpK with parallel.sequence_parallel = false")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shape is None:
        import torch
        args.shape = "8b-layers" if args.device != "cpu" and torch.cuda.is_available() else "tiny"
    args.seq_len = args.seq_len or RUN_SETTINGS[args.shape]["seq_len"]
    args.rows = args.rows or args.nproc
    if args.worker:
        args.tp = int(args.tp)
        return args
    args.tp_degrees = [int(k) for k in args.tp.split(",") if k.strip()]
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step is the loss check)")
    if args.nproc < 1 or args.rows % args.nproc:
        parser.error(f"--rows {args.rows} must be a multiple of --nproc {args.nproc} (each "
                     "data-parallel rank of fsdp takes rows / nproc of them)")
    if any(k < 2 for k in args.tp_degrees):
        parser.error("--tp: degrees of 2 or more (fsdp is the tp = 1 baseline)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
