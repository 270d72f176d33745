"""The training loop: `rega-engine train --config run.toml` (or torchrun ... for several processes).

One optimizer step (the loop in `_train`, forward and backward in `train_step`):
  1. fetch the step's grad_accum micro-batches (PackedBatch) from this rank's loader;
  2. sum their loss weights and all-reduce that one scalar: W, the weight of every label token the
     step trains on, over all micro-batches and all ranks (one collective per step);
  3. per micro-batch: loss = sum(w * token_loss) / W ("sum" reduction with weights w / W), then
     backward. Summed over micro-batches and ranks this is exactly the global weighted mean, however
     the documents were packed or dealt; gradients accumulate in .grad;
  4. gradient norm (global, also over DTensor shards), clipping, AdamW with the scheduled lr.
Metrics stay on the device and are read once per logged step; the host synchronises once per step
to check the loss is finite before the update is applied (so a NaN never reaches the weights, let
alone a checkpoint) and to learn whether a SIGTERM asks it to stop.
"""
from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from rega_engine.batch import PackedBatch
from rega_engine.config import ConfigError, RunConfig, validate_config
from rega_engine.train import checkpoint as ckpt
from rega_engine.train.metrics import (DeviceSums, MetricsLogger, device_peak_flops,
                                       document_lengths, peak_memory_bytes)
from rega_engine.train.parallel import Runtime, build_model, setup_runtime, teardown_runtime
from rega_engine.errors import TrainingError
from rega_engine.train.schedule import lr_at

# Files that make a tokenizer directory loadable by transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def train(config: RunConfig, *, loader_deals: Sequence[tuple[int, int]] | None = None) -> int:
    """Runs a training job; returns 0 (also after a SIGTERM-triggered checkpoint).

    loader_deals: which (rank, world_size) deals of the dataset this process reads, round-robin
    over its micro-batches; default: its own rank's. One process given [(0, 2), (1, 2)] with
    grad_accum=2 reads exactly the rows two processes would, which lets the tests compare a
    multi-process run against a single process on the same global batch.
    """
    validate_config(config)
    prepared = Path(config.data.prepared)
    if not (prepared / "meta.json").is_file():
        raise FileNotFoundError(
            f"data.prepared = {prepared}: no prepared dataset there ({prepared / 'meta.json'} not "
            "found); run `rega-engine prepare --config <the same run.toml>` first, or point "
            "--data.prepared=... at its output")
    runtime = setup_runtime(config.train.device, config.model.dtype)
    try:
        return _train(config, runtime, prepared, loader_deals)
    finally:
        teardown_runtime(runtime)


# --------------------------------------------------------------------------------------------
# Set-up


def _make_loaders(config: RunConfig, dataset, runtime: Runtime,
                  loader_deals: Sequence[tuple[int, int]] | None) -> list:
    from rega_engine.data.loader import PackedLoader
    if loader_deals is None:
        deals = [(runtime.rank, runtime.world_size)]
    else:
        deals = [(int(r), int(w)) for r, w in loader_deals]
        if runtime.world_size != 1:
            raise ValueError("loader_deals is for a single process standing in for several")
        if config.train.grad_accum % len(deals):
            raise ConfigError(f"train.grad_accum = {config.train.grad_accum} must be a multiple of "
                              f"the {len(deals)} loader deals, so that each is read equally")
    # data.kind_weights of the training config win over those prepare stored, so a weight can be
    # retuned without re-tokenizing; say so when they differ, since the run's TOML may not show it.
    if dict(dataset.kind_weights) != dict(config.data.kind_weights) and runtime.rank == 0:
        print(f"note: data.kind_weights = {dict(config.data.kind_weights)} replace the weights "
              f"{dict(dataset.kind_weights)} stored in {dataset.path}/meta.json", flush=True)
    loaders = [PackedLoader(dataset, seq_len=config.data.seq_len,
                            batch_size=config.train.micro_batch_size, rank=r, world_size=w,
                            seed=config.train.seed, kind_weights=config.data.kind_weights)
               for r, w in deals]
    if len(loaders[0]) == 0:
        raise TrainingError(f"data.prepared = {dataset.path}: no micro-batch fits an epoch "
                            f"({len(dataset)} samples for {deals[0][1]} rank(s) x "
                            f"{config.train.micro_batch_size} rows); prepare more data or use "
                            "fewer processes / rows")
    return loaders


def _micro_batches(loaders: list) -> Iterator[PackedBatch]:
    """Endless micro-batches, epoch after epoch, taking the loaders in turn."""
    iterators = [iter(loader) for loader in loaders]
    while True:
        for i, loader in enumerate(loaders):
            try:
                yield next(iterators[i])
            except StopIteration:   # the loader moved to its next epoch
                iterators[i] = iter(loader)
                yield next(iterators[i])


def _make_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device):
    t = config.train
    # No weight decay on gains and biases (1-D): decaying a norm's gain towards 0 is not
    # regularisation, it changes the function.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **kind)


class _StopRequest:
    """SIGTERM (a scheduler's pre-emption notice) sets a flag; the loop checkpoints and exits at
    the end of a step, never in the middle of one."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        if _in_main_thread():   # signal handlers can only be set from the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------
# One step


def train_step(model: torch.nn.Module, batches: list[PackedBatch], *, world_size: int,
               distributed: bool, sums: DeviceSums | None = None,
               stop_flag: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches (already on the device).

    Leaves in .grad the gradient of  sum(w * token_loss) / W  over every micro-batch of every rank,
    W being the global sum of the loss weights. Returns (this rank's share of that loss, the stop
    flag summed over ranks), both on the device.
    """
    device = batches[0].input_ids.device
    # torch.full launches a fill kernel; torch.tensor would copy from the host and wait for the GPU.
    local = torch.stack([sum(b.loss_weights.sum(dtype=torch.float64) for b in batches),
                         torch.full((), float(stop_flag), dtype=torch.float64, device=device)])
    if distributed:
        dist.all_reduce(local)
    # A step whose every label is ignored has W = 0 and all weights 0: its loss is 0, not 0/0.
    total_weight = local[0].clamp(min=1e-30).to(torch.float32)
    step_loss = torch.zeros((), dtype=torch.float32, device=local.device)
    for b in batches:
        out = model(b.input_ids, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                    max_seqlen=b.max_seqlen, labels=b.labels,
                    loss_weights=b.loss_weights / total_weight, reduction="sum",
                    return_token_losses=sums is not None)
        # FSDP averages gradients over ranks; the objective is their sum, so scale by the world
        # size (exact for powers of two, and independent of torch's reduce-op defaults).
        (out.loss * world_size if world_size > 1 else out.loss).backward()
        step_loss += out.loss.detach().float()
        if sums is not None:
            sums.add_tokens(out.token_losses, b.labels, b.kind_ids, b.domain_ids)
    return step_loss, local[1]


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (a plain tensor, also under FSDP), clipped when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    if hasattr(torch.nn.utils, "get_total_norm"):
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        full_tensor = getattr(norm, "full_tensor", None)
        if full_tensor is not None:   # a DTensor: the norm over every rank's shards
            norm = full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
    # torch < 2.6
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# --------------------------------------------------------------------------------------------
# The run


def _train(config: RunConfig, runtime: Runtime, prepared: Path,
           loader_deals: Sequence[tuple[int, int]] | None) -> int:
    from rega_engine.data.dataset import TokenDataset

    t = config.train
    out_dir = Path(t.out_dir)
    device = runtime.device
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    dataset = TokenDataset(prepared)
    loaders = _make_loaders(config, dataset, runtime, loader_deals)
    model, compute_dtype = build_model(config.model, runtime, seed=t.seed)
    vocab = model.args.vocab_size
    if dataset.vocab_size > vocab:
        raise TrainingError(f"data.prepared = {prepared}: token ids go up to {dataset.vocab_size - 1} "
                            f"but the model's vocab_size is {vocab}; use the model's tokenizer in "
                            "data.tokenizer and prepare again")
    optimizer = _make_optimizer(model, config, device)

    start_step, elapsed_offset = 0, 0.0
    resumed_from = None
    earlier = ckpt.complete_checkpoints(out_dir)
    if earlier and not config.checkpoint.resume:
        # A fresh run would interleave its checkpoints with the old ones and prune the wrong ones.
        raise TrainingError(f"train.out_dir = {out_dir} holds checkpoints of an earlier run (newest: "
                            f"{earlier[-1][1]}); pass --resume to continue it, or use another "
                            "train.out_dir (or remove its checkpoints/) to start afresh")
    if config.checkpoint.resume:
        resumed_from = _newest_checkpoint(out_dir, runtime)
        if resumed_from is not None:
            meta, rank_state = ckpt.load_checkpoint(resumed_from, model, optimizer)
            start_step = int(meta["step"])
            elapsed_offset = float(meta.get("elapsed_s", 0.0))
            for loader, state in zip(loaders, rank_state["loaders"], strict=True):
                loader.load_state_dict(state)
            ckpt.set_rng_state(rank_state["rng"], device)
    if start_step >= t.steps:
        raise TrainingError(f"{resumed_from} is at step {start_step}, train.steps = {t.steps}: "
                            "nothing to do; raise --train.steps to train further")

    flops_per_token = model.flops_per_token()
    peak_flops = device_peak_flops(device)
    logger = MetricsLogger(out_dir, domain_names=dataset.domain_names, total_steps=t.steps,
                           start_step=start_step, enabled=runtime.is_main, progress=t.progress,
                           tensorboard=t.tensorboard, elapsed_offset=elapsed_offset)
    sums = DeviceSums(len(dataset.domain_names), device)
    _print_header(logger, config, model, dataset, runtime, compute_dtype, start_step, resumed_from)

    stop = _StopRequest()
    stop.install()
    batches = _micro_batches(loaders)
    grad_accum = t.grad_accum
    saved_at = None
    finished = False
    try:
        logger.reset_clock()
        for step in range(start_step + 1, t.steps + 1):
            host = [next(batches) for _ in range(grad_accum)]
            tokens = sum(b.num_real_tokens for b in host)
            flops = sum(flops_per_token * b.num_real_tokens + model.attention_flops(document_lengths(b))
                        for b in host)
            micro = [b.to(device) for b in host]
            step_loss, stop_votes = train_step(model, micro, world_size=runtime.world_size,
                                               distributed=runtime.distributed, sums=sums,
                                               stop_flag=float(stop.requested))
            norm = grad_norm_and_clip(model, t.grad_clip)
            loss_value, norm_value, votes = torch.stack(
                [step_loss.double(), norm.double(), stop_votes]).tolist()   # the step's one sync
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                last = ckpt.latest_checkpoint(out_dir)
                raise TrainingError(
                    f"step {step}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} "
                    f"(loss {loss_value}, grad norm {norm_value}); the update was not applied and "
                    f"no checkpoint was written. Last complete checkpoint: {last or 'none'}. "
                    "Lower train.lr, raise train.warmup_steps or check the data, then resume.")
            lr = lr_at(step, lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps,
                       min_lr_ratio=t.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            sums.add_step(step_loss, tokens, flops)
            logger.step_done()
            if step % t.log_every == 0 or step == t.steps:
                logger.log(step, sums.collect(runtime.distributed), grad_norm=norm_value, lr=lr,
                           peak_flops=peak_flops, world_size=runtime.world_size,
                           peak_memory=peak_memory_bytes(device))
            # Under several processes the vote travels with the next step's all-reduce, so every
            # rank stops after the same step; a single process acts on its own flag at once.
            stopping = votes > 0 or (runtime.world_size == 1 and stop.requested)
            every = config.checkpoint.every
            if stopping or (every and (step % every == 0 or step == t.steps)):
                saved_at = _save(out_dir, step, model, optimizer, loaders, runtime, config, logger)
            if stopping:
                logger.message(f"SIGTERM: stopped after step {step}; checkpoint saved to {saved_at}. "
                               "Run again with --resume to continue.")
                return 0
        finished = True
    finally:
        stop.restore()
        logger.close(plot=finished and t.plot)

    if config.checkpoint.export:
        hf_dir = _export(model, config, runtime, compute_dtype, out_dir)
        if runtime.is_main:
            print(f"exported the trained model to {hf_dir}", file=sys.stderr)
    return 0


def _newest_checkpoint(out_dir: Path, runtime: Runtime) -> Path | None:
    """Rank 0 chooses, everyone follows: ranks must never load different steps."""
    path = ckpt.latest_checkpoint(out_dir) if runtime.is_main else None
    if runtime.distributed:
        holder = [str(path) if path is not None else None]
        dist.broadcast_object_list(holder, src=0)
        path = Path(holder[0]) if holder[0] is not None else None
    if path is None and runtime.is_main:
        print(f"--resume: no complete checkpoint in {ckpt.checkpoint_root(out_dir)}; starting "
              "from step 0", file=sys.stderr)
    return path


def _save(out_dir: Path, step: int, model, optimizer, loaders, runtime: Runtime, config: RunConfig,
          logger: MetricsLogger) -> Path:
    rank_state = {"step": step, "loaders": [loader.state_dict() for loader in loaders],
                  "rng": ckpt.rng_state(runtime.device)}
    return ckpt.save_checkpoint(out_dir, step, model, optimizer, rank_state,
                                keep=config.checkpoint.keep,
                                meta={"elapsed_s": logger.elapsed(), "steps": config.train.steps})


def _export(model, config: RunConfig, runtime: Runtime, compute_dtype: torch.dtype,
            out_dir: Path) -> Path:
    """<out_dir>/hf: safetensors in the compute dtype, config.json, and the tokenizer files, so
    that the directory is directly loadable and servable by transformers."""
    hf_dir = out_dir / "hf"
    state_dict = None
    if runtime.use_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # Gathered shard by shard onto rank 0's CPU; the other ranks get an empty dict.
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
    if runtime.is_main:
        model.save_pretrained(hf_dir, state_dict=state_dict, dtype=compute_dtype)
        tokenizer_dir = config.data.tokenizer or config.model.path
        if tokenizer_dir and Path(tokenizer_dir).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, hf_dir / name)
    if runtime.distributed:
        dist.barrier()
    return hf_dir


def _print_header(logger: MetricsLogger, config: RunConfig, model, dataset, runtime: Runtime,
                  compute_dtype: torch.dtype, start_step: int, resumed_from) -> None:
    t = config.train
    rows = t.micro_batch_size * t.grad_accum * runtime.world_size
    source = config.model.path or f"random init from {config.model.init_config}"
    lines = [
        f"model: {source} ({model.num_parameters(exclude_embeddings=True) / 1e6:.1f}M non-embedding "
        f"parameters), {str(compute_dtype).replace('torch.', '')} on {runtime.device.type}, "
        f"{runtime.world_size} process(es){', FSDP2' if runtime.use_fsdp else ''}"
        f"{', activation checkpointing' if config.model.activation_checkpointing == 'block' else ''}"
        f"{', torch.compile' if config.model.compile else ''}",
        f"data: {dataset.path} ({len(dataset)} samples, {dataset.num_tokens} tokens, domains "
        f"{', '.join(dataset.domain_names)})",
        f"steps: {t.steps} of {rows} rows x {config.data.seq_len} tokens (micro-batch "
        f"{t.micro_batch_size} x grad_accum {t.grad_accum} x {runtime.world_size} ranks); "
        f"log: {Path(t.out_dir) / 'log.jsonl'}",
    ]
    if resumed_from is not None:
        lines.append(f"resumed from {resumed_from} at step {start_step}")
    for line in lines:
        logger.message(line)
