"""The mixture's numpy planning tables: block-wise choices, the bucketed shuffle, and tables
that spill to memory-mapped files past data.memory_gb without changing the mixture."""
import json

import numpy as np
import pytest

from rega_engine.config import RunConfig
from rega_engine.data import tables
from rega_engine.data.mixture import build_mixture
from rega_engine.data.tables import TableStore, choose_sorted, seeded_rng, shuffle_into


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 rows: the multi-block and multi-bucket paths on tiny inputs."""
    monkeypatch.setattr(tables, "BLOCK", 64)


def test_choose_sorted_is_an_exact_uniform_subset_across_blocks(small_blocks):
    picked = np.concatenate(list(choose_sorted(1000, 300, seeded_rng(0, "t"))))
    assert len(picked) == 300 and len(set(picked.tolist())) == 300
    assert (np.diff(picked) > 0).all() and picked.min() >= 0 and picked.max() < 1000
    again = np.concatenate(list(choose_sorted(1000, 300, seeded_rng(0, "t"))))
    assert (picked == again).all()
    # every block gets its share on average: a row's chance to be picked is k / n everywhere
    hits = np.zeros(1000)
    for seed in range(200):
        hits[np.concatenate(list(choose_sorted(1000, 300, seeded_rng(seed, "u"))))] += 1
    per_block = hits.reshape(-1, 8).mean(axis=1) / 200   # 125 groups of 8 rows
    assert abs(per_block.mean() - 0.3) < 1e-9 and per_block.min() > 0.15 and per_block.max() < 0.45
    with pytest.raises(ValueError, match="cannot choose 5 of 4"):
        list(choose_sorted(4, 5, seeded_rng(0)))


def test_bucketed_shuffle_is_a_permutation_and_mixes_everything(small_blocks):
    table = np.arange(1000)
    out = np.empty_like(table)
    shuffle_into(table, out, seeded_rng(1, "s"))
    assert sorted(out.tolist()) == list(range(1000))
    # records from the first block reach the end and vice versa (not block-local)
    assert np.flatnonzero(out < 64).max() > 900 and np.flatnonzero(out >= 936).min() < 100
    # each position takes any value alike: the mean over seeds of the value at a position is
    # about the middle, for the first and the last positions
    firsts = []
    for seed in range(300):
        shuffle_into(table, out, seeded_rng(seed, "s"))
        firsts.append(out[[0, 999]])
    assert abs(np.mean(firsts) - 499.5) < 40


def test_store_spills_past_its_budget_and_leaves_no_files(tmp_path):
    store = TableStore(1000, tmp_path)
    held = store.empty(np.int64, 100)             # 800 bytes: in memory
    mapped = store.empty(np.int64, 100)           # past the budget: a map
    assert not isinstance(held, np.memmap) and isinstance(mapped, np.memmap)
    mapped[:] = np.arange(100)
    appender = store.appender(np.dtype([("a", "<i8")]))
    appender.CHUNK = 10
    for i in range(250):
        appender.append((i,))
    grown = appender.finish()
    assert isinstance(grown, np.memmap) and grown["a"].tolist() == list(range(250))
    store.close()
    assert list(tmp_path.iterdir()) == []         # unlinked once mapped, the directory removed
    assert mapped.sum() == 4950


def _config(tmp_path, rows: int) -> RunConfig:
    c = RunConfig()
    c.roles.prompts = {"law": "You are a lawyer."}
    for name in ("general", "law"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(rows):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{name} {i}"},
                                                 {"role": "assistant", "content": str(i)}]}) + "\n")
    c.data.general = str(tmp_path / "general.jsonl")
    c.data.domains = {"law": str(tmp_path / "law.jsonl")}
    c.data.sizes = {"general": 150, "law": 500}    # a sample without replacement; 2.5 passes
    c.data.integration_fraction = 0.3
    return c


def test_the_mixture_is_the_same_planned_in_memory_or_on_disk(tmp_path, small_blocks):
    config = _config(tmp_path, 200)
    in_memory = build_mixture(config)
    config.data.memory_gb = 1e-6                 # ~1 KB: every table is a map
    on_disk = build_mixture(config, scratch=tmp_path / "scratch")
    assert in_memory.table_bytes["mapped"] == 0 and on_disk.table_bytes["mapped"] > 0
    assert on_disk.samples == in_memory.samples
    assert on_disk.counts == in_memory.counts
    assert in_memory.counts["kind"] == {"distilled": 150, "role": 500, "integration": 150,
                                        "pretrain": 0}
    assert not any((tmp_path / "scratch").iterdir())
    law = [s.origin for s in in_memory.samples if s.kind == 1]
    assert max(law.count(o) for o in set(law)) == 3 and len(set(law)) == 200
