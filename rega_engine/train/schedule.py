"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio.

A pure function of the step, so that a resumed run needs nothing but the step number to be back on
the same curve (no scheduler object whose state could drift from the checkpoint).
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
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
