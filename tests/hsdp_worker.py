"""`rega-engine train` with what tests/test_hsdp.py checks recorded, per rank, to
$REGA_TRACE_DIR/<$REGA_RUN_TAG>_rank<r>.jsonl, one JSON object a line:

  {"mesh": [dp_replicate, dp_shard], "rank": r, "dp_rank": d, "placements": [...], ...}
      once, at the first step: the mesh, this rank's data-parallel coordinate and how FSDP2 placed
      the first parameter (HSDP: Replicate over dp_replicate, Shard(0) over dp_shard) and the
      timeout of each mesh dim's process group;
  {"batch": [epoch, [rows]]}
      each micro-batch the loop takes (not those the prefetch thread made ahead), its real rows;
  {"step": n, "events": [...]}
      each optimizer step, in order: "micro" / "micro last" (the loop about to run a micro-batch)
      and every torch.distributed collective the training thread called, as
      "<kind>/<group size>".
$REGA_SLOW_CHECKPOINT_WRITE (seconds) slows DCP's file writer by that much per checkpoint.

FSDP2 calls the collectives as `dist.<name>(...)` at run time, so wrapping the attributes of
torch.distributed sees every one it issues; on CPU nothing is asynchronous, so the order of the
events is the order of the work.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time

# The kinds counted: FSDP2's reduce-scatter (of gradients) and all-gather (of parameters), its
# HSDP all-reduce across replica groups, and the loop's own scalars.
_COLLECTIVES = {"all_reduce": "all_reduce", "reduce_scatter_single": "reduce_scatter",
                "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter": "reduce_scatter",
                "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
                "all_gather": "all_gather", "broadcast": "broadcast"}


def record(path: str, patch=setattr) -> None:
    """Patches torch.distributed, the loop and the loader to write the records above to `path`;
    `patch` does the setting (pytest's monkeypatch.setattr, to undo it after an in-process run)."""
    import torch
    import torch.distributed as dist

    from rega_engine.data import loader as loader_module
    from rega_engine.train import loop

    events: list[str] = []

    def write(entry: dict) -> None:
        with open(path, "a") as out:
            out.write(json.dumps(entry) + "\n")

    for name, kind in _COLLECTIVES.items():
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _kind=kind, **kwargs):
            # Training's collectives: a checkpoint written in the background (checkpoint.async)
            # communicates from its own thread, over its own group, while steps go on.
            if threading.current_thread() is threading.main_thread():
                group = kwargs.get("group")
                size = dist.get_world_size(group) if dist.is_initialized() else 1
                events.append(f"{_kind}/{size}")
            return _original(*args, **kwargs)

        patch(dist, name, functools.wraps(original)(counted))

    original_sync = loop._gradient_sync

    def gradient_sync(model, *, last, accumulate):
        events.append("micro last" if last else "micro")
        return original_sync(model, last=last, accumulate=accumulate)

    patch(loop, "_gradient_sync", gradient_sync)

    original_step = loop.optimizer_step
    runtime_seen = {}
    original_setup = loop.setup_runtime

    def setup_runtime(*args, **kwargs):
        runtime = original_setup(*args, **kwargs)
        runtime_seen["runtime"] = runtime
        return runtime

    patch(loop, "setup_runtime", setup_runtime)

    def optimizer_step(model, optimizer, micro_batches, **kwargs):
        if "described" not in runtime_seen:
            runtime_seen["described"] = True
            runtime = runtime_seen["runtime"]
            param = next(model.parameters())
            # How long each of the mesh's own groups waits (train.collective_timeout_s?).
            timeouts = {name: runtime.mesh.get_group(name)._get_backend(
                            torch.device("cpu")).options._timeout.total_seconds()
                        for name in (runtime.mesh.mesh_dim_names if runtime.mesh else ())}
            write({"mesh": [runtime.dp_replicate, runtime.dp_shard], "rank": runtime.rank,
                   "dp_rank": runtime.dp_rank,
                   "mesh_dims": list(getattr(getattr(param, "device_mesh", None),
                                             "mesh_dim_names", None) or []),
                   "placements": [str(p) for p in getattr(param, "placements", ())],
                   "timeouts": timeouts})
        events.clear()
        result = original_step(model, optimizer, micro_batches, **kwargs)
        write({"step": kwargs["step"], "events": list(events)})
        return result

    patch(loop, "optimizer_step", optimizer_step)

    original_next = loader_module._BatchIterator.__next__

    def taken(self):
        epoch = self._plan.epoch
        batch = original_next(self)
        rows = [row[kinds >= 0].tolist()
                for row, kinds in zip(batch.input_ids.numpy(), batch.kind_ids.numpy())]
        write({"batch": [epoch, [r for r in rows if r]]})
        return batch

    patch(loader_module._BatchIterator, "__next__", taken)

    slow = float(os.environ.get("REGA_SLOW_CHECKPOINT_WRITE", 0))
    if slow:   # a storage writer slowed on purpose, to see training go on while it writes
        import torch.distributed.checkpoint as dcp
        original_write = dcp.FileSystemWriter.write_data

        def write_data(self, plan, planner):
            time.sleep(slow)
            return original_write(self, plan, planner)

        patch(dcp.FileSystemWriter, "write_data", write_data)


if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    record(os.path.join(os.environ["REGA_TRACE_DIR"],
                        f"{os.environ['REGA_RUN_TAG']}_rank{rank}.jsonl"))
    from rega_engine.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
