"""What a user sees of a run: per-step metrics, the JSONL log, progress (a bar on a terminal, a
plain line every train.progress_every_s elsewhere: rega_engine/progress.py), TensorBoard scalars
and, at the end, a one-line summary and a PNG of the loss curves.

Training never waits for the host because of metrics: token losses are summed per sample kind and
per domain on the device (`DeviceSums`), and read back once per logged step.

MFU (model FLOPs utilisation) is reported as PaLM (Chowdhery et al., 2022, appendix B) defines it:

    MFU = (6 * N * T + A) / (t * P * R)

    N  non-embedding parameters including the LM head (model.flops_per_token() = 6 * N): each one
       is a multiply-add per token forward (2 FLOPs) and two in the backward (4 FLOPs);
    T  real tokens trained in the interval on all ranks (padding excluded);
    A  causal attention FLOPs over the actual document lengths (model.attention_flops():
       6 * layers * heads * head_dim * sum(n^2)), so packing short documents is not flattered;
    t  wall time of the interval, P the dense bf16 peak of one device, R the number of devices.

Recomputation under activation checkpointing is not counted: it is work, not progress. A device
whose peak we do not know (any CPU, an unlisted GPU) gets MFU null, never a guessed figure.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rega_engine.batch import IGNORE_INDEX, KINDS
from rega_engine.log import get_logger
from rega_engine.progress import Progress, format_seconds

log = get_logger(__name__)

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s per device.
# Matched in order against torch.cuda.get_device_name(): the specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def device_peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of one device, or None where unknown (CPU, unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def mfu(flops: float, seconds: float, peak_flops: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation (see the module docstring); None when the peak is unknown."""
    if peak_flops is None or seconds <= 0:
        return None
    return flops / (seconds * peak_flops * world_size)


def document_lengths(batch) -> torch.Tensor:
    """Lengths of the real documents of a host-side PackedBatch: the segments of cu_seqlens,
    less the trailing padding runs (kind -1 at their first token)."""
    cu = batch.cu_seqlens.to(torch.int64)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    real = batch.kind_ids.reshape(-1)[starts.clamp(max=batch.kind_ids.numel() - 1)] >= 0
    return lengths[real & (lengths > 0)]


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak memory allocated by tensors. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)   # bytes on macOS, KiB on Linux


class DeviceSums:
    """Loss sums of the current log interval, kept on the device.

    Layout of the one float64 vector (all-reduced with a single collective when read):
    [objective, tokens, flops, kind loss x K, kind count x K, domain loss x D, domain count x D].
    "objective" is the sum of the steps' optimised losses; per kind and per domain we keep the plain
    token cross-entropy (unweighted) over label tokens, so that a kind trained with weight 0.5 still
    shows its true loss.
    """

    def __init__(self, num_domains: int, device: torch.device):
        self.num_kinds = len(KINDS)
        self.num_domains = num_domains
        self.device = device
        self._kind_at = 3
        self._domain_at = 3 + 2 * self.num_kinds
        self.values = torch.zeros(self._domain_at + 2 * num_domains, dtype=torch.float64,
                                  device=device)
        self.steps = 0
        # Host-side counts: known without reading the device.
        self.tokens = 0
        self.flops = 0.0

    def add_tokens(self, token_losses: torch.Tensor, labels: torch.Tensor, kind_ids: torch.Tensor,
                   domain_ids: torch.Tensor) -> None:
        """token_losses are aligned with labels (the model's convention): entry t is the loss of
        predicting labels[t], so kind_ids[t] / domain_ids[t] are already at the label position."""
        valid = (labels != IGNORE_INDEX).reshape(-1)
        losses = token_losses.detach().reshape(-1).to(torch.float64) * valid
        counts = valid.to(torch.float64)
        # Ignored positions go to kind 0 / domain 0 with loss 0 and count 0: no effect, no mask
        # copy.
        kinds = kind_ids.reshape(-1).clamp(min=0)
        domains = domain_ids.reshape(-1).clamp(min=0, max=self.num_domains - 1)
        k, d = self.num_kinds, self.num_domains
        v = self.values
        v[self._kind_at:self._kind_at + k].index_add_(0, kinds, losses)
        v[self._kind_at + k:self._kind_at + 2 * k].index_add_(0, kinds, counts)
        v[self._domain_at:self._domain_at + d].index_add_(0, domains, losses)
        v[self._domain_at + d:self._domain_at + 2 * d].index_add_(0, domains, counts)

    def add_step(self, loss: torch.Tensor, tokens: int, flops: float) -> None:
        self.values[0] += loss.detach().to(torch.float64)
        self.steps += 1
        self.tokens += tokens
        self.flops += flops

    def collect(self, distributed: bool) -> dict:
        """Sums over all ranks, read to the host; resets the interval. One collective."""
        values = self.values.clone()
        values[1] += self.tokens
        values[2] += self.flops
        if distributed:
            dist.all_reduce(values)
        host = values.tolist()
        k, d = self.num_kinds, self.num_domains
        kind_loss = host[self._kind_at:self._kind_at + k]
        kind_count = host[self._kind_at + k:self._kind_at + 2 * k]
        domain_loss = host[self._domain_at:self._domain_at + d]
        domain_count = host[self._domain_at + d:self._domain_at + 2 * d]
        out = {
            "loss": host[0] / max(self.steps, 1),
            "tokens": int(round(host[1])),
            "flops": host[2],
            "kind": [s / c if c > 0 else None for s, c in zip(kind_loss, kind_count)],
            "domain": [s / c if c > 0 else None for s, c in zip(domain_loss, domain_count)],
            "kind_tokens": [int(round(c)) for c in kind_count],
            "domain_tokens": [int(round(c)) for c in domain_count],
            "steps": self.steps,
        }
        self.values.zero_()
        self.steps, self.tokens, self.flops = 0, 0, 0.0
        return out


class MetricsLogger:
    """The JSONL log, progress and TensorBoard of rank 0 (other ranks get a silent one).

    One JSON object per logged step in <out_dir>/log.jsonl:
      step, total_steps (the run's train.steps: a log whose last step is its total_steps is a
      completed run's), loss (the optimised objective, mean over the steps since the last record),
      loss_by_kind {distilled, role, integration, pretrain}, loss_by_domain {name: ...} (mean token
      cross-entropy; null when the interval had no such token), loss_tokens_by_kind and
      loss_tokens_by_domain (the label tokens those losses are over), tokens (real tokens, all
      ranks),
      tokens_per_s, mfu (null when the device peak is unknown), grad_norm (before clipping, of the
      step logged), lr, peak_memory_gib (rank 0), elapsed_s (since the start of this process, plus
      the elapsed time of the run it resumed),
      data_wait_s (rank 0's mean seconds per step spent waiting for its micro-batches from the
      loader's prefetch, over the steps since the last record: near 0 when the loader keeps up),
      checkpoint_s (seconds training stood still for checkpoints since the last record, rank 0's
      wall time including the save's closing barrier, or with checkpoint.async the staging and
      any wait for the previous write; a checkpoint is saved after its step's record, so it shows
      in the next one, and the summary line counts them all),
      checkpoint_pending (the step of a checkpoint still being written in the background when
      the record was taken: training went on meanwhile; null when none is).
    """

    def __init__(self, out_dir: str | os.PathLike, *, domain_names: list[str], total_steps: int,
                 start_step: int, enabled: bool, progress: bool, tensorboard: bool,
                 elapsed_offset: float = 0.0, progress_every_s: float | None = None):
        self.out_dir = Path(out_dir)
        self.domain_names = list(domain_names)
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_path = self.out_dir / "log.jsonl"
        self.elapsed_offset = elapsed_offset
        self._start = time.perf_counter()
        self._last_time = self._start
        self._file = None
        self._bar = None
        self._writer = None
        # For the final summary: this process's training time and tokens, the last record.
        self._trained_s = 0.0
        self._trained_tokens = 0
        # Host-side timings measured by the loop (perf_counter, no device sync): this interval's,
        # and this process's totals for the summary line.
        self._data_wait_s = 0.0
        self._checkpoint_s = 0.0
        self.total_data_wait_s = 0.0
        self.total_checkpoint_s = 0.0
        self.checkpoints = 0
        self.last_record: dict | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(self.log_path, start_step)
        self._file = open(self.log_path, "a", encoding="utf-8")
        if tensorboard:
            self._writer = _summary_writer(self.out_dir / "tensorboard")
        self._bar = Progress(total_steps, desc="train", unit="step", enabled=progress,
                             every_s=progress_every_s, initial=start_step)

    def reset_clock(self) -> None:
        """Start the interval clock now (after model set-up, so that set-up is not throughput)."""
        self._last_time = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_offset + time.perf_counter() - self._start

    def step_done(self, data_wait_s: float = 0.0) -> None:
        """A step was applied; data_wait_s: how long its micro-batches kept the host waiting."""
        self._data_wait_s += data_wait_s
        self.total_data_wait_s += data_wait_s
        if self._bar is not None:
            self._bar.update(1)

    def checkpoint_done(self, seconds: float, count: bool = True) -> None:
        """A checkpoint save kept training waiting `seconds`; reported in the next record and the
        summary. count=False: the wait for a save already counted (checkpoint.async)."""
        self._checkpoint_s += seconds
        self.total_checkpoint_s += seconds
        self.checkpoints += int(count)

    def log(self, step: int, sums: dict, *, grad_norm: float, lr: float, peak_flops: float | None,
            world_size: int, peak_memory: int, checkpoint_pending: int | None = None) -> dict:
        now = time.perf_counter()
        seconds = now - self._last_time
        self._last_time = now
        self._trained_s += seconds
        self._trained_tokens += sums["tokens"]
        record = {
            "step": step,
            "total_steps": self.total_steps,
            "loss": sums["loss"],
            "loss_by_kind": dict(zip(KINDS, sums["kind"])),
            "loss_by_domain": dict(zip(self.domain_names, sums["domain"])),
            # Label tokens seen per source (kind, domain) in the interval, all ranks.
            "loss_tokens_by_kind": dict(zip(KINDS, sums.get("kind_tokens", ()))),
            "loss_tokens_by_domain": dict(zip(self.domain_names, sums.get("domain_tokens", ()))),
            "tokens": sums["tokens"],
            "tokens_per_s": sums["tokens"] / seconds if seconds > 0 else None,
            "mfu": mfu(sums["flops"], seconds, peak_flops, world_size),
            "grad_norm": grad_norm,
            "lr": lr,
            "peak_memory_gib": peak_memory / 2**30,
            "elapsed_s": self.elapsed(),
            "data_wait_s": self._data_wait_s / max(sums.get("steps", 1), 1),
            "checkpoint_s": self._checkpoint_s,
            "checkpoint_pending": checkpoint_pending,
        }
        data_share = self._data_wait_s / seconds if seconds > 0 else None
        self._data_wait_s = self._checkpoint_s = 0.0
        self.last_record = record
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._bar is not None:
            postfix = {"loss": f"{record['loss']:.4f}"}
            if record["tokens_per_s"] is not None:
                postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if record["mfu"] is not None:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            if data_share is not None:   # of the interval's wall time: a loader that lags
                postfix["data wait"] = f"{100 * data_share:.0f}%"
            self._bar.set_postfix(postfix, refresh=False)
        if self._writer is not None:
            self._write_scalars(record)
        return record

    def _write_scalars(self, record: dict) -> None:
        step = record["step"]
        for key in ("loss", "tokens_per_s", "mfu", "grad_norm", "lr", "peak_memory_gib",
                    "data_wait_s", "checkpoint_s"):
            if record[key] is not None:
                self._writer.add_scalar(f"train/{key}", record[key], step)
        for group in ("loss_by_kind", "loss_by_domain"):
            for name, value in record[group].items():
                if value is not None:
                    self._writer.add_scalar(f"{group}/{name}", value, step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and self._bar.is_bar:   # printed above the bar, kept whole
            self._bar.write(text)
        else:
            log.info(text)

    def summary(self, step: int) -> str:
        """The run's last line, printed with or without progress: where it ended, the last
        logged loss and this process's mean throughput."""
        parts = [f"train: finished step {step} of {self.total_steps}"]
        if self.last_record is not None:
            parts.append(f"loss {self.last_record['loss']:.4f}")
        if self._trained_s > 0 and self._trained_tokens:
            parts.append(f"{self._trained_tokens / self._trained_s:.0f} tokens/s")
        parts.append(f"data wait {format_seconds(self.total_data_wait_s)}")
        if self.checkpoints:
            parts.append(f"{self.checkpoints} checkpoint(s) in "
                         f"{format_seconds(self.total_checkpoint_s)}")
        parts.append(f"{format_seconds(self.elapsed())} elapsed")
        return ", ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def plot(self) -> Path | None:
        """The loss curves' PNG; a plot that fails is a warning, never a failed run (the model is
        already exported when this runs)."""
        if not self.enabled:
            return None
        png = self.out_dir / "loss_curves.png"
        try:
            return plot_loss_curves(self.log_path, png)
        except Exception as error:   # matplotlib missing or broken, a full disk, a bad record
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            log.warning(f"could not draw {png} ({type(error).__name__}: {reason}); the run "
                        f"itself is complete (its log is {self.log_path})")
            return None


def _truncate_log(path: Path, start_step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old records so that the log
    reads as one uninterrupted run. A fresh run (start_step 0) starts a fresh log."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= start_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue   # a line cut short by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("train.tensorboard = true needs the tensorboard package: "
                           "pip install tensorboard (or rega-engine[tensorboard]), "
                           "or set --train.tensorboard=false") from None
    return SummaryWriter(log_dir=str(log_dir))


def read_log(path: str | os.PathLike) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def plot_loss_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Loss per sample kind (with the overall objective) and per domain against the step."""
    records = read_log(log_path) if Path(log_path).exists() else []
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    domains = list(records[-1]["loss_by_domain"])
    fig, (by_kind, by_domain) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_kind.plot(steps, [r["loss"] for r in records], color="black", linewidth=1.5,
                 label="objective")
    for name in KINDS:
        _plot_series(by_kind, steps, [r["loss_by_kind"].get(name) for r in records], name)
    for name in domains:
        _plot_series(by_domain, steps, [r["loss_by_domain"].get(name) for r in records], name)
    for ax, title in ((by_kind, "loss per sample kind"), (by_domain, "loss per domain")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("token cross-entropy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _plot_series(ax, steps, values, label) -> None:
    points = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, linewidth=1, label=label)
