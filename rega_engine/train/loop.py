"""The training loop: `rega-engine train --config run.toml` (or torchrun ... for several processes).

Before anything is written, rank 0 claims the run's folder (train/run_dir.py): an exclusive lock
naming this run (a second run into the same train.out_dir is refused, naming the holder), and a
folder holding a finished run (hf/, eval.json, a completed log) is refused unless
train.overwrite = true replaces it or --resume continues it.

A run, in the four steps `_train` reads as:
  1. set up: the seeded RNGs, the prepared dataset and this rank's loaders, the model (built and
     parallelised by train/parallel.py) and AdamW, held together by one `Run`;
  2. resume: the run's `Checkpointer` (train/checkpoint.py) refuses to start afresh over an earlier
     run's checkpoints, and with checkpoint.resume restores the newest one rank 0 finds (model,
     optimizer, loader positions, RNG states); the metrics log then opens at that step;
  3. train: `optimizer_step` after `optimizer_step` up to train.steps, with a log record every
     train.log_every steps and a checkpoint when the Checkpointer says one is due or a SIGTERM asks
     the run to stop (then it stops after that step, writes <out_dir>/preempted.json and exits
     143); with checkpoint.async a save is written in the background while the next steps train
     (the stop, the end of training and the next save wait for it); the log's data_wait_s and
     checkpoint_s time the host's wait for the loader and the saves (perf_counter on the host,
     no device sync added), and train.profile_steps traces a few steps with the torch profiler
     (`_StepProfiler`);
  4. export: <out_dir>/hf in the compute dtype with the tokenizer files (model/hf_io.py), loadable
     by transformers, when the run finished; a run resumed at its last step only exports. Then
     the summary line and the loss plot (a plot that fails is a warning: the model is safe).

A StallWatchdog (train/watchdog.py) names the ranks a stalled step waits for, and a collective
that times out (train.collective_timeout_s) or loses its peer ends the run in one line naming
the step and the last complete checkpoint.

One optimizer step (`optimizer_step`, forward and backward in `forward_backward`; the training
benchmark, benchmarks/bench_train.py, calls the very same function):
  1. the step's grad_accum micro-batches (PackedBatch) from this rank's loaders;
  2. sum their loss weights and all-reduce that one scalar: W, the weight of every label token the
     step trains on, over all micro-batches and all ranks (one collective per step);
  3. per micro-batch: loss = sum(w * token_loss) / W ("sum" reduction with weights w / W), then
     backward. Summed over micro-batches and ranks this is exactly the global weighted mean, however
     the documents were packed or dealt; gradients accumulate in .grad. Under FSDP2 the
     micro-batches before the last cross no replica group (parallel.accumulate = "sharded", the
     default: reduce-scatter within the dp_shard group, the all-reduce across replica groups
     only in the last) or reduce nothing at all ("unsharded": each rank sums its unsharded
     gradients, reduced once in the last backward);
  4. gradient norm (global, also over DTensor shards), clipping, AdamW with the scheduled lr.
Metrics stay on the device and are read once per logged step; the host synchronises once per step
to check the loss is finite before the update is applied (so a NaN never reaches the weights, let
alone a checkpoint) and to learn whether a SIGTERM asks it to stop.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from rega_engine.batch import PackedBatch
from rega_engine.config import ConfigError, RunConfig, TrainConfig, validate_config
from rega_engine.errors import RegaError, TrainingError
from rega_engine.kinds import check_kind_weights
from rega_engine.log import get_logger
from rega_engine.model import hf_io
from rega_engine.train import run_dir
from rega_engine.train.checkpoint import Checkpointer, latest_checkpoint
from rega_engine.train.context_parallel import ContextShard, shard_batch
from rega_engine.train.fp8 import after_optimizer_step as fp8_after_optimizer_step
from rega_engine.train.metrics import (
    DeviceSums,
    MetricsLogger,
    device_peak_flops,
    document_lengths,
    peak_memory_bytes,
)
from rega_engine.train.parallel import Runtime, build_model, setup_runtime, teardown_runtime
from rega_engine.train.schedule import lr_at, one_pass_text, steps_for_epochs
from rega_engine.train.watchdog import StallWatchdog, default_store

if TYPE_CHECKING:   # imported when the run starts, so that importing the loop stays light
    from rega_engine.data.dataset import TokenDataset
    from rega_engine.data.loader import PackedLoader

log = get_logger(__name__)

# The exit status of a run that a SIGTERM stopped after saving a checkpoint: 128 + SIGTERM (15),
# what a shell reports for a process the signal killed, so `train && eval` does not go on to
# evaluate a model that does not exist yet, and what schedulers that requeue pre-empted jobs
# look for (Slurm's --requeue, a Kubernetes Job's podFailurePolicy on exit code 143). torchrun
# exits 1 whatever its workers' status, so the run also leaves <out_dir>/preempted.json
# (run_dir.PREEMPTED_FILE) for a requeue script to read.
PREEMPTED_EXIT_CODE = 143


def train(config: RunConfig, *, loader_deals: Sequence[tuple[int, int]] | None = None) -> int:
    """Runs a training job; returns 0 when it reached train.steps, PREEMPTED_EXIT_CODE (143)
    when a SIGTERM stopped it after saving a checkpoint (resume with --resume).

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
    if config.train.threads:   # before anything runs: a shared machine's cores (train.threads)
        torch.set_num_threads(config.train.threads)
    runtime = setup_runtime(config.train.device, config.model.dtype,
                            timeout_s=config.train.collective_timeout_s, parallel=config.parallel)
    finished = False
    try:
        lock = run_dir.claim(config.train.out_dir, resume=config.checkpoint.resume,
                             overwrite=config.train.overwrite)
        try:
            status = _train(config, runtime, loader_deals)
            finished = True
            return status
        finally:
            if lock is not None:
                lock.release()
    finally:
        teardown_runtime(runtime, finished=finished)


# --------------------------------------------------------------------------------------------
# Set-up


def _make_loaders(config: RunConfig, dataset, runtime: Runtime,
                  loader_deals: Sequence[tuple[int, int]] | None) -> list:
    from rega_engine.data.loader import PackedLoader, PlanSharing
    share_plan = None
    if loader_deals is None:
        deals = [(runtime.dp_rank, runtime.dp_size)]   # CP / TP peers would read the same rows
        # Under torchrun with several processes on this node, local rank 0 plans each epoch and
        # the node's other processes map its plan (rega_engine/data/shared_plan.py): one copy per
        # node, not one per process. None otherwise, or with REGA_SHARED_PLAN=0.
        share_plan = PlanSharing.from_env() if runtime.world_size > 1 else None
    else:
        deals = [(int(r), int(w)) for r, w in loader_deals]
        if runtime.world_size != 1:
            raise ValueError("loader_deals is for a single process standing in for several")
        if config.train.grad_accum % len(deals):
            raise ConfigError(f"train.grad_accum = {config.train.grad_accum} must be a multiple of "
                              f"the {len(deals)} loader deals, so that each is read equally")
    # data.kind_weights of the training config win over those prepare stored, so a weight can be
    # retuned without re-tokenizing; say so when they differ, since the run's TOML may not show it.
    if dict(dataset.kind_weights) != check_kind_weights(config.data.kind_weights):
        log.info(f"note: data.kind_weights = {dict(config.data.kind_weights)} replace the weights "
                 f"{dict(dataset.kind_weights)} stored in {dataset.path}/meta.json")
    loaders = [PackedLoader(dataset, seq_len=config.data.seq_len,
                            batch_size=config.train.micro_batch_size, rank=r, world_size=w,
                            seed=config.train.seed, kind_weights=config.data.kind_weights,
                            share_plan=share_plan)
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


def _make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device):
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


class NonFiniteStep(TrainingError):
    """The step's loss or gradient norm is not finite; raised before the update is applied."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        super().__init__(f"step {step}: non-finite {what} (loss {loss}, grad norm {grad_norm}); "
                         "the update was not applied")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


@dataclass
class StepResult:
    loss: torch.Tensor      # this rank's share of the step's loss, on the device
    loss_value: float       # the same, on the host
    grad_norm: float        # before clipping, over every rank's gradients
    lr: float
    stop_votes: float       # ranks that asked to stop (SIGTERM), summed over ranks


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[PackedBatch], *, lr: float, grad_clip: float, step: int,
                   world_size: int = 1, distributed: bool = False,
                   sums: DeviceSums | None = None, stop_requested: bool = False,
                   accumulate: str = "sharded",
                   contexts: list[ContextShard] | None = None,
                   tp_leader: bool = True) -> StepResult:
    """One optimizer step over micro-batches already on the device: forward and backward, the
    global gradient norm and clipping (grad_clip 0: none), then AdamW at `lr` and zeroed
    gradients. Its one host synchronisation checks loss and norm first: a non-finite step raises
    NonFiniteStep naming `step`, and the update never reaches the weights. world_size: the
    ranks FSDP2 averages gradients over (Runtime.grad_ranks); accumulate: parallel.accumulate;
    contexts: each micro-batch's ContextShard under context parallelism; tp_leader: False on
    the tensor-parallel ranks that compute the same loss as another and must not count it."""
    step_loss, stop_votes = forward_backward(model, micro_batches, world_size=world_size,
                                             distributed=distributed, sums=sums,
                                             stop_flag=float(stop_requested),
                                             accumulate=accumulate, contexts=contexts,
                                             tp_leader=tp_leader)
    norm = grad_norm_and_clip(model, grad_clip)
    loss_value, norm_value, votes = torch.stack(
        [step_loss.double(), norm.double(), stop_votes]).tolist()   # the step's one sync
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise NonFiniteStep(step, loss_value, norm_value)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fp8_after_optimizer_step(model)   # FP8 all-gather under FSDP2: the new weights' scales
    return StepResult(loss=step_loss, loss_value=loss_value, grad_norm=norm_value, lr=lr,
                      stop_votes=votes)


def forward_backward(model: torch.nn.Module, batches: list[PackedBatch], *, world_size: int,
                     distributed: bool, sums: DeviceSums | None = None,
                     stop_flag: float = 0.0, accumulate: str = "sharded",
                     contexts: list[ContextShard] | None = None, tp_leader: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches (already on the device).

    Leaves in .grad the gradient of  sum(w * token_loss) / W  over every micro-batch of every rank,
    W being the global sum of the loss weights. Returns (this rank's share of that loss, the stop
    flag summed over ranks), both on the device. Under context parallelism (`contexts`) the ranks
    of a cp group share each micro-batch: one of them counts its weights in W, and each computes
    and back-propagates the loss of its own tokens. Under tensor parallelism every rank of a tp
    group computes the whole loss; only its leader (`tp_leader`) counts W and the metrics.
    """
    device = batches[0].input_ids.device
    contexts = contexts or [None] * len(batches)
    counted = [b for b, c in zip(batches, contexts)
               if tp_leader and (c is None or c.counts_batch)]
    # torch.full launches a fill kernel; torch.tensor would copy from the host and wait for the GPU.
    local = torch.stack([sum((b.loss_weights.sum(dtype=torch.float64) for b in counted),
                             torch.zeros((), dtype=torch.float64, device=device)),
                         torch.full((), float(stop_flag), dtype=torch.float64, device=device)])
    if distributed:
        dist.all_reduce(local)
    # A step whose every label is ignored has W = 0 and all weights 0: its loss is 0, not 0/0.
    total_weight = local[0].clamp(min=1e-30).to(torch.float32)
    step_loss = torch.zeros((), dtype=torch.float32, device=local.device)
    for i, (b, context) in enumerate(zip(batches, contexts)):
        _gradient_sync(model, last=i == len(batches) - 1, accumulate=accumulate)
        out = model(b.input_ids, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                    max_seqlen=b.max_seqlen, labels=b.labels,
                    loss_weights=b.loss_weights / total_weight, reduction="sum",
                    return_token_losses=sums is not None, context=context)
        # FSDP averages gradients over the data-parallel ranks (HSDP: over dp_shard in the
        # reduce-scatter, then over dp_replicate in the all-reduce; with their cp ranks); the
        # objective is their sum, so scale by their number (exact for powers of two, and
        # independent of torch's reduce-op defaults).
        (out.loss * world_size if world_size > 1 else out.loss).backward()
        step_loss += out.loss.detach().float()
        if sums is not None and tp_leader:
            labels = b.labels if context is None else context.own(b.labels)
            sums.add_tokens(out.token_losses, labels, b.kind_ids, b.domain_ids)
    return step_loss, local[1]


def _gradient_sync(model: torch.nn.Module, *, last: bool, accumulate: str) -> None:
    """FSDP2's gradient-sync switches on the root module, set before each micro-batch's backward:
    only the last one reduces. Reducing the sum once equals reducing each micro-batch's share (the
    reduction is linear), and the micro-batches before it then cost no communication: "unsharded"
    keeps a full fp32 gradient per rank until the last backward; "sharded" still reduce-scatters
    within the dp_shard group (fast links, gradients stay sharded) and skips only the all-reduce
    across replica groups. A plain model (no FSDP2) accumulates locally and has nothing to skip."""
    if not hasattr(model, "set_requires_gradient_sync"):
        return
    if accumulate == "sharded":
        model.set_requires_all_reduce(last)
    else:
        model.set_requires_gradient_sync(last)


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (a plain tensor, also under FSDP), clipped when max_norm >
    0."""
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


@dataclass
class Run:
    """Everything one training run holds, built once by `_set_up`."""
    config: RunConfig
    runtime: Runtime
    dataset: TokenDataset
    model: torch.nn.Module
    compute_dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    loaders: list[PackedLoader]     # one per loader deal, read in turn
    checkpointer: Checkpointer
    logger: MetricsLogger
    sums: DeviceSums
    out_dir: Path
    step: int                       # the last step whose update has been applied
    flops_per_token: int
    peak_flops: float | None


def _train(config: RunConfig, runtime: Runtime,
           loader_deals: Sequence[tuple[int, int]] | None) -> int:
    timeout_s = config.train.collective_timeout_s
    # Heartbeats often enough that a stall is named well within a short timeout, at most 1/s.
    watchdog = StallWatchdog(rank=runtime.rank, world_size=runtime.world_size,
                             timeout_s=timeout_s, heartbeat_s=min(1.0, timeout_s / 20),
                             store=default_store() if runtime.world_size > 1 else None).start()
    stop = _StopRequest()
    run = None
    finished = False
    try:
        watchdog.begin("set-up", 0)
        run = _set_up(config, runtime, loader_deals)                  # 1. set up, 2. resume
        watchdog.end(typical=False)
        stop.install()
        finished = _train_steps(run, stop, watchdog)                  # 3. train
        if finished:
            _wait_for_checkpoint(run, watchdog)
            _export(run, watchdog)                                    # 4. export
    except Exception as error:
        failure = _collective_failure(error, config, runtime, watchdog)
        if run is not None:   # a checkpoint in flight completes, unless a rank is lost
            run.checkpointer.close(wait=failure is None)
        if failure is None:
            raise
        raise failure from None
    finally:
        watchdog.stop()
        stop.restore()
        if run is not None:
            run.logger.close()
    if finished:
        # After the export: a plot that fails costs a picture, never the model.
        if config.train.plot:
            run.logger.plot()
        run.logger.message(run.logger.summary(run.step))   # also with train.progress = false
    return 0 if finished else PREEMPTED_EXIT_CODE


def _wait_for_checkpoint(run: Run, watchdog: StallWatchdog) -> None:
    """The end of training waits for a checkpoint written in the background (checkpoint.async),
    so that a finished run never leaves one behind half-written."""
    step = run.checkpointer.writing_step
    if step is not None:
        watchdog.begin(f"the checkpoint of step {step}", run.step)
    waiting = time.perf_counter()
    run.checkpointer.wait()   # also raises the failure of a write that has already ended
    if step is not None:
        run.logger.checkpoint_done(time.perf_counter() - waiting, count=False)
        watchdog.end(typical=False)


def _model_meta(config: RunConfig, model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """meta.json's "model" of each checkpoint: what `rega-engine export` rebuilds the model from,
    without the run's config file."""
    from rega_engine.export import model_meta
    return model_meta(config, model.args.hf_config, str(dtype).removeprefix("torch."))


def _export(run: Run, watchdog: StallWatchdog) -> None:
    """Step 4: <out_dir>/hf (merged, plus the PEFT adapter for LoRA runs)."""
    config, runtime = run.config, run.runtime
    if not config.checkpoint.export:
        return
    watchdog.begin("the export", run.step)
    if config.lora.rank:
        from rega_engine.model.lora import export_lora
        hf_dir = export_lora(run.model, run.out_dir / "hf", dtype=run.compute_dtype,
                             sharded=runtime.use_fsdp,
                             tokenizer_dir=config.data.tokenizer or config.model.path,
                             base_path=config.model.path)
        run.logger.message(f"exported the trained model to {hf_dir} (LoRA merged) and its "
                           f"adapter to {run.out_dir / 'hf_adapter'}")
    else:
        hf_dir = hf_io.export_pretrained(
            run.model, run.out_dir / "hf", dtype=run.compute_dtype, sharded=runtime.use_fsdp,
            tokenizer_dir=config.data.tokenizer or config.model.path)
        run.logger.message(f"exported the trained model to {hf_dir}")
    watchdog.end(typical=False)


# What gloo (and NCCL, where it raises rather than aborts) says when a peer froze or went away.
_COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection closed by peer",
                        "Connection reset by peer", "Broken pipe")


def _collective_failure(error: Exception, config: RunConfig, runtime: Runtime,
                        watchdog: StallWatchdog) -> TrainingError | None:
    """One line for a collective that timed out or lost a peer (a frozen, killed or unreachable
    rank), naming the step and the last complete checkpoint; None for any other error."""
    if runtime.world_size == 1 or isinstance(error, RegaError):
        return None
    text = str(error)
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(error, dist_error)
            or (isinstance(error, RuntimeError) and any(s in text for s in _COLLECTIVE_FAILURES))):
        return None
    where = watchdog.phase or "the run"
    latest = latest_checkpoint(config.train.out_dir)
    resume = (f"Last complete checkpoint: {latest or 'none'}; run the same command with --resume "
              "once every rank's host is healthy")
    if "imed out" in text:
        seen = f": {watchdog.last_report}" if watchdog.last_report else ""
        return TrainingError(
            f"{where}: rank {runtime.rank} waited train.collective_timeout_s = "
            f"{config.train.collective_timeout_s:g} s for the other ranks and gave up{seen}. "
            f"{resume} (or raise --train.collective_timeout_s if steps are this slow on purpose)")
    # gloo's "[pair.cc:553] Connection closed by peer [10.0.0.2]:41602. This is typically ...":
    # the first sentence, without the source location.
    detail = re.sub(r"^\[[^\]]*\]\s*", "", (text.strip().splitlines() or [""])[-1])
    detail = detail.split(". ")[0][:200] or type(error).__name__
    silent = watchdog.silent_ranks() or {}
    if silent:   # the heartbeats name the dead: the peer's address alone does not say its rank
        who = ", ".join(f"rank {r} ({why})" for r, why in sorted(silent.items()))
        return TrainingError(f"{where}: rank {runtime.rank} lost its connection to {who} "
                             f"[{detail}]. {resume}")
    return TrainingError(f"{where}: rank {runtime.rank} lost its connection to another rank "
                         f"({detail}): a rank died or its host went away. {resume}")


def _set_up(config: RunConfig, runtime: Runtime,
            loader_deals: Sequence[tuple[int, int]] | None) -> Run:
    """Steps 1 and 2: the run's parts, resumed from a checkpoint when asked to."""
    from rega_engine.data.dataset import TokenDataset

    t = config.train
    _seed_everything(t.seed)
    dataset = TokenDataset(Path(config.data.prepared))
    loaders = _make_loaders(config, dataset, runtime, loader_deals)
    # One pass: this process's micro-batches of the first epoch (the loaders are fresh here).
    per_pass = sum(len(loader) for loader in loaders)
    pass_line = one_pass_text(per_pass, micro_batch_size=t.micro_batch_size,
                              grad_accum=t.grad_accum, world_size=runtime.dp_size)
    if t.epochs > 0:
        steps = steps_for_epochs(t.epochs, per_pass, t.grad_accum)
        pass_line += (f"; train.epochs = {t.epochs:g}: {steps} steps (train.steps derived from "
                      "train.epochs)")
        config = dataclasses.replace(config, train=dataclasses.replace(t, steps=steps))
        t = config.train
    model, compute_dtype = build_model(config.model, runtime, seed=t.seed, precision=t.precision,
                                       fp8_recipe=t.fp8_recipe, lora=config.lora)
    _check_vocab(config, dataset, model)
    optimizer = _make_optimizer(model, t, runtime.device)
    checkpointer = Checkpointer(t.out_dir, config.checkpoint, total_steps=t.steps, model=model,
                                optimizer=optimizer, loaders=loaders, device=runtime.device,
                                verify_data=config.data.verify, timeout_s=t.collective_timeout_s,
                                model_meta=_model_meta(config, model, compute_dtype))
    start = checkpointer.resume()
    # Under FSDP's FP8 all-gather each weight's scale is precomputed after every step; computing
    # it now too (the weights are final) gives the first step the same scale, over the whole
    # weight: left to the all-gather, it would cover this rank's FSDP group only, which under
    # tensor parallelism holds one tp piece of the weight.
    fp8_after_optimizer_step(model)
    logger = MetricsLogger(t.out_dir, domain_names=dataset.domain_names, total_steps=t.steps,
                           start_step=start.step, enabled=runtime.is_main, progress=t.progress,
                           tensorboard=t.tensorboard, elapsed_offset=start.elapsed_s,
                           progress_every_s=t.progress_every_s)
    run = Run(config=config, runtime=runtime, dataset=dataset, model=model,
              compute_dtype=compute_dtype, optimizer=optimizer, loaders=loaders,
              checkpointer=checkpointer, logger=logger,
              sums=DeviceSums(len(dataset.domain_names), runtime.device), out_dir=Path(t.out_dir),
              step=start.step, flops_per_token=model.flops_per_token(),
              peak_flops=device_peak_flops(runtime.device))
    _print_header(run, start.path, pass_line)
    return run


def _train_steps(run: Run, stop: _StopRequest, watchdog: StallWatchdog) -> bool:
    """Step 3: optimizer steps up to train.steps; False when a SIGTERM stopped the run first."""
    t = run.config.train
    if run.step >= t.steps:
        run.logger.message(f"step {run.step} of {t.steps}: nothing left to train, only the "
                           "export (the run stopped before it)")
        return True
    batches = _micro_batches(run.loaders)
    profiler = _StepProfiler.for_run(run)
    run.logger.reset_clock()
    try:
        return _steps(run, stop, watchdog, batches, profiler)
    finally:
        if profiler is not None:
            profiler.close()   # also when a SIGTERM or an error ends the run inside the window


def _steps(run: Run, stop: _StopRequest, watchdog: StallWatchdog,
           batches: Iterator[PackedBatch], profiler: _StepProfiler | None) -> bool:
    """The steps themselves, for `_train_steps`, which stops the profiler however they end."""
    t = run.config.train
    runtime = run.runtime
    while run.step < t.steps:
        step = run.step + 1
        watchdog.begin(f"step {step}", step)
        if profiler is not None:
            profiler.begin(step)
        # The host's wait for this step's micro-batches: the loader's prefetch thread makes them
        # while the device runs the previous step, so anything above ~0 here is the loader not
        # keeping up. Timed on the host only: the batches are host tensors until .to() below.
        waiting = time.perf_counter()
        with profiler.region("data wait") if profiler is not None else nullcontext():
            host = [next(batches) for _ in range(t.grad_accum)]
        data_wait_s = time.perf_counter() - waiting
        lr = lr_at(step, lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps,
                   min_lr_ratio=t.min_lr_ratio)
        try:
            contexts = None if runtime.cp == 1 else [
                shard_batch(b, runtime.cp, runtime.cp_rank, runtime.cp_group, runtime.device)
                for b in host]
            result = optimizer_step(run.model, run.optimizer, [b.to(runtime.device) for b in host],
                                    lr=lr, grad_clip=t.grad_clip, step=step,
                                    world_size=runtime.grad_ranks,
                                    distributed=runtime.distributed, sums=run.sums,
                                    stop_requested=stop.requested,
                                    accumulate=run.config.parallel.accumulate,
                                    contexts=contexts, tp_leader=runtime.tp_rank == 0)
        except NonFiniteStep as error:
            raise TrainingError(
                f"{error} and no checkpoint was written. Last complete checkpoint: "
                f"{run.checkpointer.latest() or 'none'}. Lower train.lr, raise "
                "train.warmup_steps or check the data, then resume.") from None
        run.step = step
        _record(run, host, result, data_wait_s)
        watchdog.end()
        # Under several processes the vote travels with the next step's all-reduce, so every
        # rank stops after the same step; a single process acts on its own flag at once.
        stopping = result.stop_votes > 0 or (runtime.world_size == 1 and stop.requested)
        if stopping or run.checkpointer.due(step):
            watchdog.begin(f"the checkpoint of step {step}", step)
            # The time training stood still: a whole save (it ends with a barrier: the slowest
            # rank's time), or with checkpoint.async the staging plus any wait for the last one.
            saving = time.perf_counter()
            saved_at = run.checkpointer.save(step, elapsed_s=run.logger.elapsed(),
                                             wait=stopping)
            run.logger.checkpoint_done(time.perf_counter() - saving)
            watchdog.end(typical=False)
        if stopping:
            # The save waited for its barrier: every rank's files are complete when rank 0 says so.
            marker = (run_dir.write_preempted(run.out_dir, step=step, total_steps=t.steps,
                                              checkpoint=saved_at) if runtime.is_main else None)
            run.logger.message(f"SIGTERM: stopped after step {step} of {t.steps}; checkpoint "
                               f"saved to {saved_at}. Not finished: exiting with status "
                               f"{PREEMPTED_EXIT_CODE} (and {marker}, for launchers such as "
                               "torchrun that exit 1 whatever the status); run the same command "
                               "again with --resume (checkpoint.resume = true) to continue.")
            return False
        if profiler is not None:
            profiler.end(step)   # after the checkpoint: a save inside the window is traced too
    return True


class _StepProfiler:
    """train.profile_steps = [first, last]: a torch.profiler trace of those steps (data wait,
    forward, backward, optimizer, a checkpoint if one falls in the window; CUDA kernels on a GPU)
    written as Chrome trace JSON to <out_dir>/profile/steps<first>-<last>-rank<r>.json, on rank 0
    or, with train.profile_all_ranks, on every rank. Outside the window the loop pays nothing
    but an `is not None` test; inside it, the profiler's own overhead, and writing the trace
    after the window's last step, show in the records' tokens_per_s."""

    def __init__(self, first: int, last: int, path: Path, device: torch.device,
                 logger: MetricsLogger):
        self.first, self.last, self.path = first, last, path
        self._device, self._logger = device, logger
        self._profile = None
        self._step_range = None

    @classmethod
    def for_run(cls, run: Run) -> _StepProfiler | None:
        t = run.config.train
        if not t.profile_steps or not (run.runtime.is_main or t.profile_all_ranks):
            return None
        first, last = t.profile_steps
        if first > t.steps or last <= run.step:
            where = (f"beyond train.steps = {t.steps}" if first > t.steps
                     else f"before step {run.step + 1}, where this run resumes")
            run.logger.message(f"train.profile_steps = {t.profile_steps}: {where}; no trace")
            return None
        first, last = max(first, run.step + 1), min(last, t.steps)
        path = run.out_dir / "profile" / f"steps{first}-{last}-rank{run.runtime.rank}.json"
        return cls(first, last, path, run.runtime.device, run.logger)

    def begin(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU]
            if self._device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            try:
                self._profile = profile(activities=activities, record_shapes=True)
                self._profile.start()
            except Exception as error:   # a profiler that cannot start costs the trace, not the run
                self._profile = None
                log.warning(f"train.profile_steps: the torch profiler did not start "
                            f"({type(error).__name__}: {error}); no trace")
        if self._profile is not None:   # a named range per step, as the log counts them
            self._step_range = torch.profiler.record_function(f"step {step}")
            self._step_range.__enter__()

    def region(self, name: str):
        return torch.profiler.record_function(name) if self._profile is not None \
            else nullcontext()

    def end(self, step: int) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stops the profiler and writes the trace (of the steps traced so far, when the run
        ends inside the window); a trace that cannot be written is a warning, never a failure."""
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        if self._step_range is not None:   # the run stopped in the middle of a step
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        try:
            profile.stop()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            profile.export_chrome_trace(str(self.path))
        except Exception as error:   # a full disk, a profiler that failed to start on a device
            log.warning(f"train.profile_steps: could not write {self.path} "
                        f"({type(error).__name__}: {error})")
            return
        self._logger.message(f"profiled steps {self.first}-{self.last}: {self.path} (open it in "
                             "https://ui.perfetto.dev or chrome://tracing)")


def _record(run: Run, host: list[PackedBatch], result: StepResult,
            data_wait_s: float = 0.0) -> None:
    """Adds the step to the device sums; every train.log_every steps (and at the last), reads
    them back and writes the log record."""
    # The metrics add up over ranks: one rank of each cp or tp group counts the batch its group
    # shares; the loss is each cp rank's share, and the tp ranks' copies of it count once.
    counted = host if run.runtime.counts_batch else []
    tokens = sum(b.num_real_tokens for b in counted)
    flops = sum(run.flops_per_token * b.num_real_tokens
                + run.model.attention_flops(document_lengths(b)) for b in counted)
    run.sums.add_step(result.loss if run.runtime.tp_rank == 0 else torch.zeros_like(result.loss),
                      tokens, flops)
    run.logger.step_done(data_wait_s)
    t = run.config.train
    if run.step % t.log_every == 0 or run.step == t.steps:
        run.logger.log(run.step, run.sums.collect(run.runtime.distributed),
                       grad_norm=result.grad_norm, lr=result.lr, peak_flops=run.peak_flops,
                       world_size=run.runtime.world_size,
                       peak_memory=peak_memory_bytes(run.runtime.device),
                       checkpoint_pending=run.checkpointer.writing_step)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _check_vocab(config: RunConfig, dataset, model) -> None:
    vocab = model.args.vocab_size
    if dataset.vocab_size <= vocab:
        return
    problem = (f"data.prepared = {config.data.prepared}: token ids go up to "
               f"{dataset.vocab_size - 1} but the model's vocab_size is {vocab}")
    if config.model.path:
        # A pretrained model's embedding rows belong to its own tokenizer: the data must change.
        raise TrainingError(f"{problem}; use the model's tokenizer in data.tokenizer and prepare "
                            "again")
    # A random init can have any vocabulary: the config is what is too small.
    raise TrainingError(f"{problem}; raise \"vocab_size\" in model.init_config = "
                        f"{config.model.init_config} to at least {dataset.vocab_size} (the "
                        "tokenizer's vocabulary), or prepare with a tokenizer of at most "
                        f"{vocab} ids")


def _print_header(run: Run, resumed_from: Path | None, pass_line: str = "") -> None:
    config, runtime, model, dataset = run.config, run.runtime, run.model, run.dataset
    t = config.train
    rows = t.micro_batch_size * t.grad_accum * runtime.dp_size
    source = config.model.path or f"random init from {config.model.init_config}"
    checkpointing = config.model.activation_checkpointing
    lines = [
        f"model: {source} ({model.num_parameters(exclude_embeddings=True) / 1e6:.1f}M "
        f"non-embedding parameters), {str(run.compute_dtype).replace('torch.', '')} on "
        f"{runtime.device.type}, {runtime.world_size} process(es)"
        f"{', FSDP2' if runtime.use_fsdp else ''}"
        f"{', activation checkpointing' if checkpointing == 'block' else ''}"
        f"{', torch.compile' if config.model.compile else ''}"
        f"{', ' + model.fp8_summary.describe().splitlines()[0] if model.fp8_summary else ''}",
        f"data: {dataset.path} ({len(dataset)} samples, {dataset.num_tokens} tokens, domains "
        f"{', '.join(dataset.domain_names)})",
        f"steps: {t.steps} of {rows} rows x {config.data.seq_len} tokens (micro-batch "
        f"{t.micro_batch_size} x grad_accum {t.grad_accum} x {runtime.dp_size} data-parallel "
        f"ranks{f', each row split over {runtime.cp} (parallel.cp)' if runtime.cp > 1 else ''}"
        f"{f', each block over {runtime.tp} (parallel.tp)' if runtime.tp > 1 else ''}"
        f"{', its tokens too' if runtime.tp > 1 and runtime.sequence_parallel else ''}); "
        f"log: {Path(t.out_dir) / 'log.jsonl'}",
        *([pass_line] if pass_line else []),
    ]
    if resumed_from is not None:
        lines.append(f"resumed from {resumed_from} at step {run.step}")
    for line in lines:
        run.logger.message(line)
