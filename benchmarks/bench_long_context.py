"""Long-context training with and without context parallelism (CP), side by side in one run.

One packed row of `--seq-len` tokens goes forward (labels, loss weights, reduction "sum") and
backward through a plain, unsharded model (the same seeded weights on every rank) for each CP
degree of `--cp`; cp = 1 runs the whole row in one process, cp > 1 runs the row split over a
torchrun group (`shard_batch` + `CausalLM.forward(..., context=shard)`, rega_engine/train/
context_parallel.py). Two rows: "one" (one document filling the row) and "mix" (documents of a
long-tailed length mix, fixed seed, packed from the row's start, the rest padding). No optimizer
step is timed: CP changes the forward and backward only. Reported per docs mode and cp degree:

  step_time_s           median over the timed steps of the slowest rank (CUDA synchronised)
  tokens_per_s_row      real tokens of the row / step time; per rank: / cp
  mfu                   (flops_per_token() x real tokens + attention_flops(real documents)) /
                        (step time x cp x the device's bf16 peak): null where the peak is
                        unknown (CPU); attention is counted per document, padding not at all
  activation_bytes      autograd-saved tensors of one forward on the most loaded rank, each
                        storage counted once, parameters left out (torch.autograd.graph.
                        saved_tensors_hooks); with --checkpointing also every checkpointed
                        block's input, which the checkpoint keeps outside autograd's hooks. On
                        CPU this is the honest activation-memory figure
  peak_memory_bytes     torch.cuda.max_memory_allocated per rank on GPU; on CPU the process's
                        peak RSS (weights, allocator slack and all: informational only)
  *_vs_cp1              each figure's ratio to cp = 1 of the same docs mode
  imbalance             imbalance(attention_work(documents, seq_len, cp)): max / mean - 1 of
                        the ranks' causal attention work for the row
  loss_sum / loss_rel_diff_vs_cp1
                        the "sum" loss all-reduced over the group, and its relative distance to
                        cp = 1's (a sanity check; within 1e-4 expected on CPU fp32)

`--estimate` (no torchrun) instead estimates memory per GPU for the Llama 3.1 8B shape (32 of
bench_train's "8b-layers" layers) on a 131072-token row at cp 1, 2, 4, 8, from the bytes one
real 8B DecoderLayer saves per token (measured on CPU in bf16 at two token counts, linear fit),
with and without block checkpointing, plus the model state sharded by FSDP2 over 8 GPUs and the
fused cross-entropy's working set; every assumption is listed in the JSON.

Results go to benchmarks/results/long_context_<device>.json and .md (the estimate to
long_context_estimate.json and .md: it does not depend on the device it runs on).

    python benchmarks/bench_long_context.py                 # CPU: tiny shape, 4096 tokens,
                                                            # cp 1,2,4 (~5 minutes on 2 cores)
    python benchmarks/bench_long_context.py --estimate      # the 8B table (1-3 minutes, ~1 GB RSS)
    # 8 GPUs: Llama 3.2 1B shape, a 128k row split 8 ways, against cp = 1 on a row holding one
    # 16k-token document (the issue's baseline), both with block checkpointing:
    python benchmarks/bench_long_context.py --shape 1b --seq-len 131072 --cp 1,8 \\
        --seq-len-cp1 16384 --checkpointing
    # and cp = 1 on the full 128k row, where it fits one GPU (not measured yet: a rough count
    # from the --estimate method gives ~25 GB with checkpointing, far over 80 GB without):
    python benchmarks/bench_long_context.py --shape 1b --seq-len 131072 --cp 1 --checkpointing

On a GPU the model is plain bf16 (bf16 weights and gradients, no fp32 master weights, no FSDP,
no optimizer): the figures isolate what CP changes. MFU leaves out the recomputed forward of
checkpointing, so checkpointed runs read lower than the hardware's utilisation; compare
checkpointed with checkpointed.

On CPU the step times are no CP speed figure: the ranks share two cores (cp = 4 oversubscribes
them) and gloo's all-gather is a memory copy. What GPU numbers have to confirm: (1) the exposed
cost of the per-layer all-gather of K/V (and the reduce-scatter of their gradients) against the
layer's compute at 128k tokens (NCCL in the profile, or the step time of cp = 8 against 8 x the
work of one rank); (2) the issue's target: CP = 8 on rows holding 128k-token documents keeps
>= 70% of the MFU the same model reaches on 16k-token documents without CP, i.e. in the 8-GPU
run above mfu_vs_cp1 >= 0.70 for docs "one" (cp = 1's row is then one 16k document).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The helpers beside this file (bench_train, _procs), also when run with PYTHONSAFEPATH=1.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import RESULTS_DIR, SHAPES, _device_description, _versions  # noqa: E402

# The long-tailed mix: log-normal lengths around seq_len / MIX_MEDIAN_DIVISOR (so several
# documents share a row and a few reach a large share of it), packed until the row is this full.
MIX_MEDIAN_DIVISOR = 12
MIX_SIGMA = 1.2
MIX_MIN_LENGTH = 32
MIX_FILL = 0.9
MIX_SEED = 0
MODEL_SEED = 0
LOSS_RTOL = 1e-4
# One intra-op thread per rank on CPU, whatever cp: the ranks then differ only in their work, and
# on the 2-core VM this was measured on a tiny-shape step ran 4x slower with 2 threads than with 1
# (0.54 s against 2.3 s at 512 tokens), so that cp = 1 with "all the cores" would look worse than
# it is.
CPU_THREADS = 1

# --estimate: Llama 3.1 8B is bench_train's "8b-layers" shape with all 32 layers.
ESTIMATE_SHAPE = {**SHAPES["8b-layers"], "num_hidden_layers": 32}
ESTIMATE_SEQ_LEN = 131072
ESTIMATE_CP = (1, 2, 4, 8)
ESTIMATE_TOKENS = (256, 512)     # the two token counts of the linear fit
ESTIMATE_CHECK_TOKENS = 384      # a third count, to show the fit is linear
FSDP_GPUS = 8
BF16 = 2                          # bytes


# --------------------------------------------------------------------------------------------
# The row


def row_documents(docs: str, seq_len: int) -> list[int]:
    """The real documents' lengths of the benchmark's row; the rest of the row is padding."""
    if docs == "one":
        return [seq_len]
    import numpy as np
    rng = np.random.default_rng(MIX_SEED)
    lengths, used = [], 0
    # Draw until the row is MIX_FILL full, skipping documents that do not fit what is left (a
    # packer would put them in another row); bounded, so an unlucky draw cannot loop forever.
    for _ in range(10_000):
        n = int(np.clip(rng.lognormal(math.log(seq_len / MIX_MEDIAN_DIVISOR), MIX_SIGMA),
                        MIX_MIN_LENGTH, seq_len))
        if used + n <= seq_len:
            lengths.append(n)
            used += n
        if used >= MIX_FILL * seq_len:
            break
    return lengths


def packed_row(doc_lengths: list[int], seq_len: int, vocab: int):
    """A one-row PackedBatch as the loader builds it (rega_engine/batch.py): labels unshifted,
    -100 on every document's first token and on padding, the padding run one more segment."""
    import torch

    from rega_engine.batch import IGNORE_INDEX, PackedBatch
    generator = torch.Generator().manual_seed(MODEL_SEED)
    ids = torch.randint(1, vocab, (1, seq_len), generator=generator)
    labels, positions = ids.clone(), torch.zeros_like(ids)
    kinds = torch.zeros_like(ids)
    used = sum(doc_lengths)
    segments = [*doc_lengths, *([seq_len - used] if used < seq_len else [])]
    cu, start = [0], 0
    for n in segments:
        positions[0, start:start + n] = torch.arange(n)
        labels[0, start] = IGNORE_INDEX
        start += n
        cu.append(start)
    labels[0, used:] = IGNORE_INDEX
    ids[0, used:] = 0
    kinds[0, used:] = -1
    return PackedBatch(input_ids=ids, labels=labels, position_ids=positions,
                       cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(segments),
                       kind_ids=kinds, domain_ids=kinds.clone(),
                       loss_weights=(labels != IGNORE_INDEX).float(), num_real_tokens=used)


class SavedBytes:
    """Bytes of the tensors autograd saves while active (each storage once, parameters left
    out); `keep(t)` adds a tensor kept alive outside autograd's hooks (a checkpoint's input)."""

    def __init__(self, parameters):
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, int] = {}
        self.described: list[list] = []   # [shape, dtype, storage bytes] of each storage

    def keep(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.skip and storage.nbytes() and key not in self.storages:
            self.storages[key] = storage.nbytes()
            self.described.append([list(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                                   storage.nbytes()])
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        import torch
        # Returning the tensor itself keeps its storage alive until backward, so no address is
        # reused by another storage while counting.
        return torch.autograd.graph.saved_tensors_hooks(self.keep, lambda t: t)


# --------------------------------------------------------------------------------------------
# Worker: one rank of one cp degree (under torchrun)


def run_worker(args) -> None:
    import torch
    import torch.distributed as dist

    from rega_engine.model import from_config
    from rega_engine.train.context_parallel import shard_batch
    from rega_engine.train.metrics import peak_memory_bytes
    from rega_engine.train.parallel import checkpoint_block

    cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(CPU_THREADS)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = from_config({**SHAPES[args.shape], "model_type": "llama"}, dtype=dtype,
                        seed=MODEL_SEED).to(device)
    if args.checkpointing:
        for layer in model.model.layers:
            checkpoint_block(layer)
    docs = row_documents(args.docs, args.seq_len)
    batch = packed_row(docs, args.seq_len, model.args.vocab_size)
    shard = shard_batch(batch, cp, rank, dist.group.WORLD, device) if cp > 1 else None
    batch = batch.to(device)

    def step(counter: SavedBytes | None = None):
        model.zero_grad(set_to_none=True)
        kwargs = dict(position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                      max_seqlen=batch.max_seqlen, labels=batch.labels,
                      loss_weights=batch.loss_weights, reduction="sum", context=shard)
        if counter is None:
            loss = model(batch.input_ids, **kwargs).loss
        else:
            def keep_input(_module, inputs):
                counter.keep(inputs[0])   # returns None: a pre-hook's result replaces the inputs

            handles = [layer.register_forward_pre_hook(keep_input)
                       for layer in model.model.layers] if args.checkpointing else []
            with counter.hooks():
                loss = model(batch.input_ids, **kwargs).loss
            for handle in handles:
                handle.remove()
        loss.backward()
        return loss.detach()

    # The first step counts the saved tensors (hooks cost a little: it is a warm-up step).
    counter = SavedBytes(model.parameters())
    loss = step(counter)
    total_loss = loss.clone().double()
    dist.all_reduce(total_loss)
    for _ in range(args.warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    result = {
        "rank": rank, "cp": cp, "docs": args.docs, "seq_len": args.seq_len,
        "step_times_s": times, "step_time_s": statistics.median(times),
        "activation_bytes": counter.total, "loss_sum": float(total_loss),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "max allocated (CUDA)" if cuda else "peak RSS of the process",
        "tokens_local": args.seq_len if shard is None else int(shard.index.numel()),
        "doc_lengths": docs, "real_tokens": sum(docs),
        "flops_per_token": model.flops_per_token(),
        "attention_flops": model.attention_flops(docs),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }
    if cuda:
        from rega_engine.train.metrics import device_peak_flops
        result["peak_flops"] = device_peak_flops(device)
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Driver


def launch(args, cp: int, docs: str, seq_len: int, work_dir: Path) -> list[dict] | dict:
    """Runs one cp degree under torchrun; each rank's result, or a failure record."""
    from _procs import run_bounded
    out = work_dir / f"{docs}_cp{cp}"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cp}", str(Path(__file__).resolve()), "--worker",
               "--result-dir", str(out), "--shape", args.shape, "--seq-len", str(seq_len),
               "--docs", docs, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--device", args.device, *(["--checkpointing"] if args.checkpointing else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(CPU_THREADS), PYTHONUNBUFFERED="1")
    finished = run_bounded(command, args.timeout, out / "log.txt", env=env)
    ranks = [out / f"rank{r}.json" for r in range(cp)]
    if finished.returncode or not all(p.exists() for p in ranks):
        status = "timeout" if finished.timed_out else "error"
        return {"status": status, "seconds": finished.seconds, "log_tail": finished.tail(2000)}
    return [json.loads(p.read_text()) for p in ranks]


def summarise(cp: int, ranks: list[dict], seq_len: int) -> dict:
    from rega_engine.train.context_parallel import attention_work, imbalance
    from rega_engine.train.metrics import mfu
    first = ranks[0]
    step_time = max(r["step_time_s"] for r in ranks)   # the group waits for its slowest rank
    flops = first["flops_per_token"] * first["real_tokens"] + first["attention_flops"]
    tokens_per_s = first["real_tokens"] / step_time
    work = attention_work(first["doc_lengths"], seq_len, cp)
    return {
        "cp": cp, "status": "ok", "seq_len": seq_len, "dtype": first["dtype"],
        "threads_per_rank": first["threads"],
        "step_time_s": step_time,
        "step_times_s_by_rank": [r["step_time_s"] for r in ranks],
        "step_times_s_rank0": first["step_times_s"],
        "tokens_per_s_row": tokens_per_s, "tokens_per_s_rank": tokens_per_s / cp,
        "flops_per_step": flops,
        "mfu": mfu(flops, step_time, first.get("peak_flops"), cp),
        "activation_bytes": max(r["activation_bytes"] for r in ranks),
        "activation_bytes_by_rank": [r["activation_bytes"] for r in ranks],
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_kind": first["peak_memory_kind"],
        "tokens_per_rank": [r["tokens_local"] for r in ranks],
        "attention_work": work, "imbalance": imbalance(work),
        "loss_sum": first["loss_sum"],
    }


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["cp"] == 1 and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok" or base is None:
            continue
        for key in ("step_time_s", "tokens_per_s_row", "tokens_per_s_rank", "activation_bytes",
                    "peak_memory_bytes", "mfu"):
            row[f"{key}_vs_cp1"] = (None if row[key] is None or not base[key]
                                    else row[key] / base[key])
        if row["seq_len"] == base["seq_len"]:
            diff = abs(row["loss_sum"] - base["loss_sum"]) / abs(base["loss_sum"])
            row["loss_rel_diff_vs_cp1"] = diff
            row["loss_matches_cp1"] = diff <= LOSS_RTOL
        else:   # cp = 1 ran a shorter row: its loss is of another row
            row["loss_rel_diff_vs_cp1"] = row["loss_matches_cp1"] = None


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# Long context, CP off and on: {report['device']}", "",
             f"Shape {report['config']['shape']}, checkpointing "
             f"{report['config']['checkpointing']}, {report['config']['steps']} timed steps "
             "(median), forward + backward of one packed row, no optimizer step. Activation "
             "bytes: autograd-saved tensors of one forward, most loaded rank.", ""]
    for docs, mode in report["docs"].items():
        lines += [f"## docs = {docs}: {len(mode['doc_lengths'])} documents, "
                  f"{sum(mode['doc_lengths'])} real tokens", "",
                  "| cp | row | step (s) | x cp1 | tokens/s row | tokens/s rank | MFU | "
                  "activations (MiB) | x cp1 | peak mem (MiB) | imbalance | loss rel. diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in mode["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {row['cp']} | {row['status']} |" + " |" * 10)
                continue
            lines.append(
                f"| {row['cp']} | {row['seq_len']} | {row['step_time_s']:.3f} | "
                f"{_fmt(row.get('step_time_s_vs_cp1'), '.2f')} | "
                f"{row['tokens_per_s_row']:.0f} | {row['tokens_per_s_rank']:.0f} | "
                f"{_fmt(row['mfu'], '.1%')} | {row['activation_bytes'] / 2**20:.1f} | "
                f"{_fmt(row.get('activation_bytes_vs_cp1'), '.3f')} | "
                f"{row['peak_memory_bytes'] / 2**20:.0f} | {row['imbalance']:.4f} | "
                f"{_fmt(row.get('loss_rel_diff_vs_cp1'), '.1e')} |")
        lines.append("")
    lines.append("Peak memory: " + ("CUDA max allocated." if report["config"]["device"] ==
                                    "cuda" else "peak RSS of each rank's process (weights, "
                                    "allocator and Python included): informational only."))
    load = report["load_average_1min"]
    lines.append(f"Load average (1 min) before / after the run: {load['before']:.1f} / "
                 f"{load['after']:.1f} on {load['cores']} cores.")
    if report["config"]["note"]:
        lines.append(report["config"]["note"] + ".")
    return "\n".join(lines) + "\n"


def run_driver(args) -> int:
    import torch
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    device_name, slug = _device_description(device)
    cps = [int(c) for c in args.cp.split(",")]
    print(f"bench_long_context on {device_name}: shape {args.shape}, {args.seq_len} tokens, "
          f"cp {cps}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    report_docs = {}
    with tempfile.TemporaryDirectory(prefix="rega-long-context-") as work:
        for docs in args.docs.split(","):
            rows = []
            for cp in cps:
                seq_len = args.seq_len_cp1 if cp == 1 and args.seq_len_cp1 else args.seq_len
                t0 = time.perf_counter()
                ranks = launch(args, cp, docs, seq_len, Path(work))
                if isinstance(ranks, dict):
                    rows.append({"cp": cp, "seq_len": seq_len, **ranks})
                else:
                    rows.append(summarise(cp, ranks, seq_len))
                print(f"  docs={docs} cp={cp}: {rows[-1]['status']} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            add_ratios(rows)
            report_docs[docs] = {"doc_lengths": row_documents(docs, args.seq_len), "rows": rows}
    report = {
        "device": device_name, "versions": _versions(),
        "config": {"device": device, "shape": args.shape, "shape_dims": SHAPES[args.shape],
                   "seq_len": args.seq_len, "seq_len_cp1": args.seq_len_cp1 or args.seq_len,
                   "cp": cps, "warmup": args.warmup, "steps": args.steps,
                   "checkpointing": args.checkpointing, "model_seed": MODEL_SEED,
                   "mix": {"median": f"seq_len / {MIX_MEDIAN_DIVISOR}", "sigma": MIX_SIGMA,
                           "min_length": MIX_MIN_LENGTH, "fill": MIX_FILL, "seed": MIX_SEED},
                   "loss_rtol": LOSS_RTOL,
                   "note": "CPU step times are no CP speed figure: one thread per rank, the ranks "
                           "share the cores (cp > cores oversubscribes them) and gloo "
                           "all-gathers by copying"
                           if device == "cpu" else None},
        "docs": report_docs, "wall_s": time.perf_counter() - started,
        # Other work on the machine skews CPU step times: the 1-minute load average before and
        # after the run, against the cores there are.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0],
                              "cores": os.cpu_count()},
    }
    write_report(report, args.out_dir / f"long_context_{slug}", markdown(report))
    failed = [r for m in report_docs.values() for r in m["rows"] if r["status"] != "ok"]
    return 1 if failed else 0


def write_report(report: dict, stem: Path, table: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{stem}.md").write_text(table)
    print(json.dumps(report, indent=2))
    print(f"wrote {stem}.json and .md ({report['wall_s']:.0f} s)", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# --estimate: memory per GPU of Llama 3.1 8B at 128k


def layer_saved_bytes(tokens: int, layer, args) -> SavedBytes:
    """Autograd-saved tensors of one forward of `layer` over one document of `tokens` tokens."""
    import torch

    from rega_engine.model.llama import Rope, rope_inv_freq
    positions = torch.arange(tokens)
    inv_freq = rope_inv_freq(args.rope, args.head_dim, positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]
    rope = Rope(positions, inv_freq, angles.cos(), angles.sin())
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    # The block's input needs a gradient, as in training (it comes from the embeddings).
    x = torch.randn(tokens, args.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    counter = SavedBytes(layer.parameters())
    with counter.hooks():
        out = layer(x, rope, cu, tokens)
    del out
    return counter


def run_estimate(args) -> int:
    import torch
    from rega_engine.kernels.cross_entropy import LOGITS_CHUNK_BYTES

    from rega_engine.model import from_config
    from rega_engine.model.args import ModelArgs
    from rega_engine.model.llama import DecoderLayer
    started = time.perf_counter()
    margs = ModelArgs.from_hf_config({**ESTIMATE_SHAPE, "model_type": "llama"})
    torch.manual_seed(MODEL_SEED)
    layer = DecoderLayer(margs, dtype=torch.bfloat16)
    layer_params = sum(p.numel() for p in layer.parameters())
    counters = {n: layer_saved_bytes(n, layer, margs)
                for n in (*ESTIMATE_TOKENS, ESTIMATE_CHECK_TOKENS)}
    measured = {n: c.total for n, c in counters.items()}
    (n0, n1) = ESTIMATE_TOKENS
    per_token = (measured[n1] - measured[n0]) / (n1 - n0)
    fixed = measured[n0] - per_token * n0
    predicted_check = fixed + per_token * ESTIMATE_CHECK_TOKENS
    del layer
    # Parameter counts from a meta-device model: no memory.
    meta = from_config({**ESTIMATE_SHAPE, "model_type": "llama"}, device="meta")
    params = meta.num_parameters(exclude_embeddings=False)
    root_params = params - layer_params * margs.num_hidden_layers

    T, layers = ESTIMATE_SEQ_LEN, margs.num_hidden_layers
    h, kv, hd, vocab = margs.hidden_size, margs.num_key_value_heads, margs.head_dim, \
        margs.vocab_size
    gathered_kv = 2 * T * kv * hd * BF16               # one layer's whole-row K and V
    state = {
        "sharded_fp32_master_grads_adam": 16 * params / FSDP_GPUS,
        "unsharded_root_bf16": root_params * BF16,
        "unsharded_layers_bf16": 2 * layer_params * BF16,
    }
    state_total = sum(state.values())
    rows = []
    for cp in ESTIMATE_CP:
        local = T // cp
        no_ckpt = layers * (per_token * local + gathered_kv)
        ckpt = layers * local * h * BF16 + (per_token * local + gathered_kv)
        cross_entropy = (LOGITS_CHUNK_BYTES          # one chunk of logits
                         + vocab * h * 4             # fp32 (V, H) weight-gradient buffer
                         + 2 * local * h * BF16)     # final hidden states and their gradient
        row = {"cp": cp, "tokens_per_rank": local,
               "activations_no_checkpointing": no_ckpt,
               "activations_block_checkpointing": ckpt,
               "gathered_kv_per_layer": gathered_kv,
               "cross_entropy_working_set": cross_entropy,
               "model_state": state_total}
        row["total_no_checkpointing"] = no_ckpt + cross_entropy + state_total
        row["total_block_checkpointing"] = ckpt + cross_entropy + state_total
        for key in ("total_no_checkpointing", "total_block_checkpointing"):
            row[f"{key}_gib"] = row[key] / 2**30
        rows.append(row)
    report = {
        "device": "estimate (measured on CPU, applies to any 8-GPU node)",
        "versions": _versions(),
        "shape": ESTIMATE_SHAPE, "seq_len": T, "parameters": params,
        "layer_parameters": layer_params,
        "measured_saved_bytes_one_layer": {str(k): v for k, v in measured.items()},
        "saved_bytes_per_token_per_layer": per_token,
        "saved_bytes_fixed_per_layer": fixed,
        "saved_tensors_one_layer": {
            "tokens": ESTIMATE_TOKENS[1],
            "tensors [shape, dtype, bytes]": counters[ESTIMATE_TOKENS[1]].described},
        "linear_fit_check": {"tokens": ESTIMATE_CHECK_TOKENS, "predicted": predicted_check,
                             "measured": measured[ESTIMATE_CHECK_TOKENS]},
        "model_state_bytes": state,
        "rows": rows,
        "assumptions": [
            "Llama 3.1 8B = bench_train's '8b-layers' dims with 32 layers, untied LM head, "
            "one packed row of 131072 tokens (one document: attention's saved tensors are O(T) "
            "whatever the documents).",
            "Bytes saved per token per layer: autograd-saved tensors (storages counted once, "
            "parameters excluded) of one real DecoderLayer forward in bf16 on CPU at "
            f"{n0} and {n1} tokens, linear fit; the fixed part ({fixed:.0f} bytes) is left out "
            "of the per-rank sums. The CPU runs the PyTorch path of RMSNorm, RoPE and SwiGLU, "
            "which saves fp32 and intermediate tensors the fused Triton kernels on a GPU may "
            "not (saved_tensors_one_layer lists them: the fp32 copies of both RMSNorm inputs, and "
            "silu(gate) and silu(gate) x up next to gate and up): an upper bound for the GPU "
            "path, which saves roughly half as much per token.",
            "Attention saves q, k, v, out, lse (O(T), flash-style); no O(T^2) scores.",
            "Without checkpointing, per rank: layers x (bytes/token x T/cp + the gathered row's "
            "K and V, 2 x T x kv_heads x head_dim x 2 bytes, which CP does not divide). This "
            "counts the rank's own K and V twice (in bytes/token and in the gathered row): an "
            f"over-estimate of 4 x kv_heads x head_dim x T/cp bytes per layer "
            f"({4 * kv * hd} bytes/token, "
            f"{100 * 4 * kv * hd / per_token:.1f}% of bytes/token).",
            "With block checkpointing: layers x T/cp x hidden x 2 bytes (each block's bf16 "
            "input) + one layer's full activations during its recompute (bytes/token x T/cp + "
            "the gathered K/V); the gradients flowing between blocks (T/cp x hidden x 2 bytes, "
            "a few) are left out.",
            f"Model state under FSDP2 over {FSDP_GPUS} GPUs: fp32 master weights + fp32 grads + "
            f"two fp32 Adam moments = 16 bytes/parameter / {FSDP_GPUS}; plus the root's bf16 "
            "unsharded weights (embeddings, final norm, LM head: FSDP2 keeps the root "
            "unsharded through forward and backward) and two decoder layers' bf16 unsharded "
            "weights (the current one and the prefetched next one). bf16 gradients before their "
            "reduce-scatter and the CP group's copies are left out.",
            "Fused cross-entropy (kernels/cross_entropy.py, reduction 'sum': gradients computed "
            "in the forward): one chunk of logits (LOGITS_CHUNK_BYTES = "
            f"{LOGITS_CHUNK_BYTES} bytes) + the fp32 (V, H) weight-gradient buffer + the "
            "(T/cp, H) final hidden states and their gradient in bf16.",
            "Not counted: CUDA allocator fragmentation and caching, NCCL buffers, the CUDA "
            "context (~0.5-1 GiB), the all-gather's transient rank-order copy of K/V and "
            "its reduce-scatter buffers in backward (one layer's gathered K/V each), "
            "temporary buffers inside the attention kernels, the batch itself.",
        ],
        "wall_s": time.perf_counter() - started,
    }
    write_report(report, args.out_dir / "long_context_estimate", estimate_markdown(report))
    return 0


def estimate_markdown(report: dict) -> str:
    g = 2**30
    lines = ["# Llama 3.1 8B, one 131072-token row: memory per GPU (estimate)", "",
             f"Saved per token per layer: {report['saved_bytes_per_token_per_layer']:.0f} bytes "
             "(one real bf16 DecoderLayer on CPU, linear fit). Model state per GPU (FSDP2 "
             f"over {FSDP_GPUS}): "
             f"{report['rows'][0]['model_state'] / g:.1f} GiB.", "",
             "| cp | tokens/rank | activations, no ckpt (GiB) | activations, block ckpt (GiB) "
             "| gathered K/V per layer (GiB) | cross-entropy (GiB) | total no ckpt (GiB) | "
             "total block ckpt (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['cp']} | {r['tokens_per_rank']} | "
                     f"{r['activations_no_checkpointing'] / g:.1f} | "
                     f"{r['activations_block_checkpointing'] / g:.1f} | "
                     f"{r['gathered_kv_per_layer'] / g:.3f} | "
                     f"{r['cross_entropy_working_set'] / g:.2f} | "
                     f"{r['total_no_checkpointing_gib']:.1f} | "
                     f"{r['total_block_checkpointing_gib']:.1f} |")
    lines += ["", "Assumptions:", ""] + [f"- {a}" for a in report["assumptions"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--seq-len-cp1", type=int, default=None,
                        help="row length for cp = 1 where the full row does not fit one device")
    parser.add_argument("--cp", default="1,2,4", help="comma-separated cp degrees")
    parser.add_argument("--docs", default="one,mix", help="'one', 'mix' or both")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true",
                        help="checkpoint_block on every decoder layer")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--timeout", type=float, default=600.0, help="per torchrun launch (s)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--estimate", action="store_true",
                        help="the 8B memory table instead of the measured run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step counts the activations)")
    for docs in args.docs.split(","):
        if docs not in ("one", "mix"):
            parser.error(f"--docs: unknown {docs!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.estimate:
        return run_estimate(args)
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
