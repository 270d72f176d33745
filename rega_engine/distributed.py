"""Rank, world size, barrier and broadcast from rank 0: written once for the whole package.

Every helper works with and without a process group: without one this process is rank 0 of a
world of one, a barrier returns at once and a broadcast hands back its argument, so callers need
no `if distributed:` of their own. Which process group exists, and when, is decided elsewhere:
by train/parallel.py for training, by `join_torchrun_group` for jobs that only need to coordinate
(distill).
"""
from __future__ import annotations

import os
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_distributed() -> bool:
    """A process group exists, so collectives must be used (also in a group of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# `group`: a process group spanning every rank, for a thread that must not share the default
# group with the main thread (a background checkpoint); None is the default group.

def barrier(group=None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def broadcast_from_rank0(value: T, group=None) -> T:
    """Rank 0's `value` (any picklable object) on every rank: one decision, taken once."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather_objects(value: T, group=None) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def join_torchrun_group(backend: str = "gloo") -> bool:
    """Joins torchrun's process group when this process is one of several and no group exists
    yet. Returns whether this call created the group; then the caller ends it with
    `leave_group()`."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1 or is_distributed():
        return False
    dist.init_process_group(backend)
    return True


def leave_group() -> None:
    """Ends the process group, every rank together: one rank tearing it down while another is
    still in the last collective can abort that collective."""
    dist.barrier()
    dist.destroy_process_group()
