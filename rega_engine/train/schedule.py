"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio.

A pure function of the step, so that a resumed run needs nothing but the step number to be back on
the same curve (no scheduler object whose state could drift from the checkpoint).
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int,
          min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (1-based: the first update is step 1)."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    min_lr = lr * min_lr_ratio
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_for_epochs(epochs: float, micro_batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps for `epochs` passes over the data (train.epochs), at least 1: a pass is
    `micro_batches_per_epoch` micro-batches per rank (PackedLoader's len), grad_accum per step."""
    # The small allowance keeps 0.1 x 30 (3.0000000000000004 in floats) at 3 steps, not 4.
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum - 1e-9))


def one_pass_text(micro_batches_per_epoch: int, *, micro_batch_size: int, grad_accum: int,
                  world_size: int) -> str:
    """What one pass over the data holds, as train and prepare print it."""
    steps = math.ceil(micro_batches_per_epoch / grad_accum)
    return (f"one pass over the data = {micro_batches_per_epoch} micro-batches per rank = {steps} "
            f"optimizer steps (micro_batch_size {micro_batch_size} x grad_accum {grad_accum} x "
            f"{world_size} rank{'s' if world_size != 1 else ''})")
