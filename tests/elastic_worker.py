"""`rega-engine train` with every micro-batch the loop takes recorded, for tests/test_elastic.py.

Records, per rank and per run, each real row of each batch handed to the training loop (not those
the prefetch thread made ahead) as (epoch, token ids), to $REGA_ROWS_DIR/rows_<tag>_rank<r>.jsonl.
"""
from __future__ import annotations

import json
import os
import sys


def record_rows(path: str):
    """Patches the loader's iterator to record; returns the original __next__ (to restore)."""
    from rega_engine.data import loader as loader_module

    original = loader_module._BatchIterator.__next__

    def taken(self):
        epoch = self._plan.epoch
        batch = original(self)
        ids = batch.input_ids.numpy()
        with open(path, "a") as f:
            for row, kinds in zip(ids, batch.kind_ids.numpy()):
                real = row[kinds >= 0].tolist()
                if real:
                    f.write(json.dumps([epoch, real]) + "\n")
        return batch

    loader_module._BatchIterator.__next__ = taken
    return original


if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    record_rows(os.path.join(os.environ["REGA_ROWS_DIR"],
                             f"rows_{os.environ['REGA_RUN_TAG']}_rank{rank}.jsonl"))
    from rega_engine.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
