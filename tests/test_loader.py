"""The prepared dataset on disk and the packed, sharded, resumable loader in front of the C++
packer."""
import gc
import json
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rega_engine.batch import KINDS, PackedBatch
from rega_engine.data import PackedLoader, TokenDataset, TokenDatasetWriter

PAD = 0
DATASET_WEIGHTS = {"distilled": 1.0, "role": 2.0, "integration": 0.5, "pretrain": 3.0}
SOME = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_dataset(path, lengths, *, seed=0, seq_len=32, vocab=500, report=None):
    """A dataset of random samples; token ids start at 1 so that padding (0) is recognisable."""
    rng = np.random.default_rng(seed)
    samples = []
    with TokenDatasetWriter(path, domains=["general", "law", "med"], kind_weights=DATASET_WEIGHTS,
                            pad_id=PAD,
                            vocab_size=vocab, seq_len=seq_len) as writer:
        for n in lengths:
            tokens = rng.integers(1, vocab, n)
            mask = rng.random(n) < 0.6
            kind, domain = int(rng.integers(0, len(KINDS))), int(rng.integers(0, 3))
            writer.add(tokens, mask, kind, domain)
            samples.append((tokens, mask, kind, domain))
        dataset = writer.close(report)
    return dataset, samples


def expected_documents(samples, seq_len):
    """What each kept sample must look like in a batch: tokens, which tokens carry a label, kind,
    domain."""
    docs = Counter()
    for tokens, mask, kind, domain in samples:
        if len(tokens) <= seq_len:
            learn = mask.copy()
            learn[0] = False  # nothing predicts a document's first token
            docs[(tuple(tokens.tolist()), tuple(learn.tolist()), kind, domain)] += 1
    return docs


def check_batch(batch, batch_size, seq_len, kind_weights):
    """Every contract of rega_engine/batch.py on one batch; returns the documents it holds."""
    assert isinstance(batch, PackedBatch)
    shape = (batch_size, seq_len)
    for name in ("input_ids", "labels", "position_ids", "kind_ids", "domain_ids"):
        value = getattr(batch, name)
        assert value.shape == shape and value.dtype == torch.int64, name
    assert batch.loss_weights.shape == shape and batch.loss_weights.dtype == torch.float32
    assert batch.cu_seqlens.dtype == torch.int32
    ids, labels, positions, kinds, domains, weights = (
        getattr(batch, n).numpy().ravel()
        for n in ("input_ids", "labels", "position_ids", "kind_ids", "domain_ids", "loss_weights"))
    cu = batch.cu_seqlens.numpy()
    total = batch_size * seq_len
    assert cu[0] == 0 and cu[-1] == total and (np.diff(cu) > 0).all()
    assert set(range(0, total + 1, seq_len)) <= set(cu.tolist()), "a segment crosses a row boundary"
    assert batch.max_seqlen == np.diff(cu).max()

    # No label crosses a document: a labelled token and the one before it share a segment.
    segment = np.searchsorted(cu, np.arange(total), side="right") - 1
    labelled = np.flatnonzero(labels != -100)
    assert (labelled % seq_len != 0).all()
    assert (segment[labelled - 1] == segment[labelled]).all()

    docs, real = [], 0
    for a, b in zip(cu[:-1], cu[1:]):
        np.testing.assert_array_equal(positions[a:b], np.arange(b - a))  # restart at each segment
        if kinds[a] == -1:  # padding: one run at the end of its row, carrying nothing
            assert b % seq_len == 0
            assert (ids[a:b] == PAD).all() and (labels[a:b] == -100).all() and (kinds[a:b] ==
                                                                                -1).all()
            assert (domains[a:b] == -1).all() and (weights[a:b] == 0).all()
            continue
        kind = int(kinds[a])
        assert (kinds[a:b] == kind).all() and (domains[a:b] == domains[a]).all() and domains[a] >= 0
        learn = labels[a:b] != -100
        assert not learn[0]
        np.testing.assert_array_equal(labels[a:b][learn], ids[a:b][learn])
        np.testing.assert_array_equal(weights[a:b], np.where(learn, kind_weights[KINDS[kind]],
                                                             0).astype(np.float32))
        docs.append((tuple(ids[a:b].tolist()), tuple(learn.tolist()), kind, int(domains[a])))
        real += b - a
    assert batch.num_real_tokens == real
    return docs


# -- the dataset ----------------------------------------------------------------------------------

def test_dataset_round_trip(tmp_path):
    dataset, samples = write_dataset(tmp_path / "ds", [3, 1, 7, 5], report={"truncated": 2})
    assert len(dataset) == 4 and dataset.num_tokens == 16
    np.testing.assert_array_equal(dataset.lengths, [3, 1, 7, 5])
    for i, (tokens, mask, kind, domain) in enumerate(samples):
        got_tokens, got_mask = dataset.sample(i)
        np.testing.assert_array_equal(got_tokens, tokens)
        np.testing.assert_array_equal(got_mask, mask.astype(np.uint8))
        assert dataset.kinds[i] == kind and dataset.domains[i] == domain
    np.testing.assert_array_equal(dataset.sample(-1)[0], samples[-1][0])
    assert isinstance(dataset.tokens, np.memmap) and dataset.tokens.dtype == np.int32
    reopened = TokenDataset(tmp_path / "ds")
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["format"] == 1 and meta["num_samples"] == 4 and meta["num_tokens"] == 16
    assert meta["kinds"] == list(KINDS) and meta["domains"] == ["general", "law", "med"]
    assert reopened.kind_weights == DATASET_WEIGHTS and meta["report"] == {"truncated": 2}
    assert (reopened.pad_id, reopened.seq_len, reopened.meta["vocab_size"]) == (PAD, 32, 500)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"], "no temporary directory left behind"
    with pytest.raises(IndexError):
        dataset.sample(4)


def test_writer_puts_the_general_domain_first(tmp_path):
    with TokenDatasetWriter(tmp_path / "ds", domains=["law"], kind_weights={}, pad_id=0,
                            vocab_size=10,
                            seq_len=8) as writer:
        writer.add([1, 2], [0, 1], kind=0, domain=1)
    dataset = TokenDataset(tmp_path / "ds")
    assert dataset.domain_names == ["general", "law"]
    assert dataset.kind_weights == {k: 1.0 for k in KINDS}  # kinds left out weigh 1


@pytest.mark.parametrize("tokens, mask, kind, domain, message", [
    ([1, 2], [1], 0, 0, "loss_mask has shape"),
    ([], [], 0, 0, "non-empty"),
    ([1, 10], [0, 1], 0, 0, "0..9"),
    ([1, 2], [0, 2], 0, 0, "loss_mask must be booleans or 0/1"),
    ([1, 2], [0, 1], 4, 0, "kind = 4"),   # KINDS has 4 kinds: ids 0..3
    ([1, 2], [0, 1], 0, 2, "domain = 2"),
    ([1.5, 2.0], [0, 1], 0, 0, "integers"),
])
def test_writer_rejects_bad_samples(tmp_path, tokens, mask, kind, domain, message):
    writer = TokenDatasetWriter(tmp_path / "ds", domains=["general", "law"], kind_weights={},
                                pad_id=0,
                                vocab_size=10, seq_len=8)
    with pytest.raises(ValueError, match=message):
        writer.add(tokens, mask, kind, domain)
    writer.abort()


def test_interrupted_write_leaves_nothing_that_looks_like_a_dataset(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with TokenDatasetWriter(tmp_path / "ds", domains=["general"], kind_weights={}, pad_id=0,
                                vocab_size=10,
                                seq_len=8) as writer:
            writer.add([1, 2, 3], [0, 1, 1], 0, 0)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # A crash before close leaves only the hidden temporary directory, which no reader mistakes for
    # data.
    writer = TokenDatasetWriter(tmp_path / "ds", domains=["general"], kind_weights={}, pad_id=0,
                                vocab_size=10,
                                seq_len=8)
    writer.add([1, 2, 3], [0, 1, 1], 0, 0)
    (partial,) = tmp_path.iterdir()
    with pytest.raises(FileNotFoundError,
                       match="meta.json is missing.*not a complete prepared dataset"):
        TokenDataset(partial)
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenDataset(tmp_path / "ds")
    writer.abort()


def test_reader_names_the_broken_file(tmp_path):
    write_dataset(tmp_path / "ds", [3, 4])
    (tmp_path / "ds" / "kinds.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds/kinds.npy is missing"):
        TokenDataset(tmp_path / "ds")

    write_dataset(tmp_path / "ds", [3, 4])  # replaces the earlier dataset
    with open(tmp_path / "ds" / "tokens.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match=r"tokens.bin: 8 bytes, expected 28"):
        TokenDataset(tmp_path / "ds")

    write_dataset(tmp_path / "ds", [3, 4])
    meta_path = tmp_path / "ds" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format": 99}))
    with pytest.raises(ValueError, match="unknown dataset format 99"):
        TokenDataset(tmp_path / "ds")


def test_writer_overwrites_only_a_dataset(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        TokenDatasetWriter(tmp_path / "notes", domains=["general"], kind_weights={}, pad_id=0,
                           vocab_size=10,
                           seq_len=8)
    write_dataset(tmp_path / "ds", [3])
    dataset, _ = write_dataset(tmp_path / "ds", [5, 6])
    assert len(TokenDataset(tmp_path / "ds")) == 2 and dataset.num_tokens == 11


# -- the loader -----------------------------------------------------------------------------------

@SOME
@given(lengths=st.lists(st.integers(1, 40), min_size=0, max_size=80), seq_len=st.integers(8, 48),
       world_size=st.integers(1, 3), batch_size=st.integers(1, 3), shuffle=st.booleans(),
       seed=st.integers(0, 1000), window=st.integers(1, 64))
def test_an_epoch_across_ranks_holds_every_kept_sample_exactly_once(lengths, seq_len, world_size,
                                                                    batch_size,
                                                                     shuffle, seed, window):
    with tempfile.TemporaryDirectory() as tmp:
        dataset, samples = write_dataset(Path(tmp) / "ds", lengths, seed=seed)
        seen, counts = Counter(), set()
        for rank in range(world_size):
            loader = PackedLoader(dataset, seq_len=seq_len, batch_size=batch_size, rank=rank,
                                  world_size=world_size, seed=seed, shuffle=shuffle, window=window,
                                  prefetch=rank % 2 * 2)  # the threaded and the inline path
            expected_batches = len(loader)
            batches = list(loader)
            assert len(batches) == expected_batches and loader.epoch == 1
            counts.add(expected_batches)
            for batch in batches:
                seen.update(check_batch(batch, batch_size, seq_len, DATASET_WEIGHTS))
        assert len(counts) == 1, "every rank must get the same number of micro-batches"
        assert seen == expected_documents(samples, seq_len)  # disjoint ranks that cover the epoch
        kept = [n for n in lengths if n <= seq_len]
        assert loader.dropped_samples == len(lengths) - len(kept)
        assert loader.tokens_per_epoch == sum(kept)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_state_dict_matches_an_uninterrupted_run(tmp_path, prefetch):
    dataset, _ = write_dataset(tmp_path / "ds", np.random.default_rng(1).integers(1, 30,
                                                                                  120).tolist())
    options = dict(seq_len=32, batch_size=2, world_size=2, rank=1, seed=7, prefetch=prefetch)
    reference = PackedLoader(dataset, **options)
    per_epoch = len(reference)
    uninterrupted = list(reference) + list(reference)  # two epochs

    for stop in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2):
        loader = PackedLoader(dataset, **options)
        taken = []
        while len(taken) < stop:
            for batch in loader:
                taken.append(batch)
                if len(taken) == stop:
                    break
        state = loader.state_dict()
        # Only batches handed out count, whatever the prefetch thread made ahead.
        assert (state["epoch"], state["cursor"]) == divmod(stop, per_epoch)
        resumed = PackedLoader(dataset, **{**options, "seed": 0})
        resumed.load_state_dict(json.loads(json.dumps(state)))  # a state survives a JSON round trip
        rest = []
        while len(taken) + len(rest) < 2 * per_epoch:
            rest += list(resumed)  # the rest of the current epoch, then the next
        for got, want in zip(taken + rest, uninterrupted, strict=True):
            for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "loss_weights",
                         "domain_ids"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (stop, name)


def test_an_abandoned_iterator_resumes_where_the_caller_stopped(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", np.random.default_rng(2).integers(1, 30,
                                                                                  60).tolist())
    reference = list(PackedLoader(dataset, seq_len=32, seed=3))
    loader = PackedLoader(dataset, seq_len=32, seed=3, prefetch=4)
    first = next(iter(loader))
    rest = list(loader)  # a new iterator picks up after the one batch taken
    assert [b.input_ids.tolist() for b in [first, *rest]] == [b.input_ids.tolist()
                                                              for b in reference]


def test_a_replaced_iterator_refuses_to_go_on(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", [5] * 20)
    loader = PackedLoader(dataset, seq_len=8, prefetch=2)
    old = iter(loader)
    next(old)
    state = loader.state_dict()
    loader.load_state_dict(state)
    with pytest.raises(RuntimeError, match="replaced"):
        next(old)
    assert loader.state_dict() == state


def test_bad_state_is_refused(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", [5] * 10)
    loader = PackedLoader(dataset, seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="seq_len=8"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 8})
    with pytest.raises(ValueError, match="window=4"):
        loader.load_state_dict({**loader.state_dict(), "window": 4})
    with pytest.raises(ValueError, match="rows_consumed 99"):
        loader.load_state_dict({**loader.state_dict(), "rows_consumed": 99})
    with pytest.raises(KeyError, match="rows_consumed"):
        loader.load_state_dict({"epoch": 0, "seed": 0})


def _rows_of(batch) -> list[tuple]:
    """The real rows of a batch, each as its tuple of token ids (padding rows left out)."""
    ids = batch.input_ids.numpy()
    return [tuple(row[row != PAD].tolist()) for row in ids if (row != PAD).any()]


def test_elastic_resume_trains_every_row_of_the_epoch_exactly_once(tmp_path):
    """2 ranks, then 1, then 3, then 2: the rows handed out over the epoch are one uninterrupted
    epoch's, none twice, none skipped, whatever the world sizes in between."""
    dataset, _ = write_dataset(tmp_path / "ds", np.random.default_rng(4).integers(1, 30,
                                                                                  300).tolist())
    options = dict(seq_len=32, batch_size=2, seed=11, prefetch=2)
    uninterrupted = Counter(r for b in PackedLoader(dataset, world_size=1,
                                                    **options) for r in _rows_of(b))
    state, seen = None, Counter()
    for world, steps in ((2, 3), (1, 5), (3, 2), (2, None)):
        loaders = [PackedLoader(dataset, world_size=world, rank=r, **options) for r in range(world)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
        assert loaders[0].epoch == 0
        iterators = [iter(loader) for loader in loaders]
        for _ in range(len(loaders[0]) if steps is None else steps):
            for iterator in iterators:
                seen.update(_rows_of(next(iterator)))
        states = [loader.state_dict() for loader in loaders]
        assert len({s["rows_consumed"] for s in states}) == 1
        state = states[0]
    assert state["epoch"] == 1 and state["rows_consumed"] == 0
    assert seen == uninterrupted


def test_a_state_without_rows_consumed_resumes_at_its_cursor(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", np.random.default_rng(5).integers(1, 30,
                                                                                  80).tolist())
    options = dict(seq_len=32, batch_size=2, world_size=2, rank=0, seed=1, prefetch=0)
    reference = [b.input_ids.tolist() for b in PackedLoader(dataset, **options)]
    loader = PackedLoader(dataset, **options)
    old = {k: v for k, v in loader.state_dict().items() if k != "rows_consumed"}
    loader.load_state_dict({**old, "cursor": 2})
    assert [b.input_ids.tolist() for b in loader] == reference[2:]


def test_epochs_and_seeds_reshuffle_deterministically(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", np.random.default_rng(3).integers(1, 30,
                                                                                  80).tolist())

    def epoch_ids(seed, epochs=1):
        loader = PackedLoader(dataset, seq_len=32, seed=seed, prefetch=0)
        return [[b.input_ids.tolist() for b in loader] for _ in range(epochs)]

    first, second = epoch_ids(5, epochs=2)
    assert first == epoch_ids(5)[0]
    assert first != second and first != epoch_ids(6)[0]
    unshuffled = PackedLoader(dataset, seq_len=32, shuffle=False, prefetch=0)
    assert [b.input_ids.tolist() for b in unshuffled] == [b.input_ids.tolist() for b in unshuffled]


def test_last_global_batch_is_completed_with_padding_rows(tmp_path):
    dataset, samples = write_dataset(tmp_path / "ds", [16, 16, 16])  # one full row each
    rank1 = list(PackedLoader(dataset, seq_len=16, batch_size=2, world_size=2, rank=1, prefetch=0))
    assert len(rank1) == 1
    (batch,) = rank1
    assert batch.num_real_tokens == 16
    padding_rows = [r for r in range(2) if (batch.kind_ids[r] == -1).all()]
    assert len(padding_rows) == 1
    assert batch.position_ids[padding_rows[0]].tolist() == list(range(16))
    assert batch.cu_seqlens.tolist() == [0, 16, 32]


def test_kind_weights_can_be_overridden(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", np.random.default_rng(4).integers(2, 20,
                                                                                  40).tolist())
    weights = {**DATASET_WEIGHTS, "role": 3.0}
    loader = PackedLoader(dataset, seq_len=32, kind_weights={"role": 3.0})
    assert loader.kind_weights == weights
    batches = list(loader)
    for batch in batches:
        check_batch(batch, 1, 32, weights)
    role = torch.cat([b.loss_weights[(b.kind_ids == KINDS.index("role")) & (b.labels != -100)]
                      for b in batches])
    assert role.numel() > 0 and (role == 3.0).all()
    with pytest.raises(ValueError, match="unknown kind"):
        PackedLoader(dataset, kind_weights={"chitchat": 1.0})


def test_too_long_samples_are_dropped_counted_and_logged(tmp_path, capsys):
    dataset, _ = write_dataset(tmp_path / "ds", [10, 40, 12, 50])
    capsys.readouterr()
    loader = PackedLoader(str(tmp_path / "ds"), seq_len=32)
    assert loader.dropped_samples == 2 and loader.tokens_per_epoch == 22
    logged = capsys.readouterr().err   # the package's log lines go to stderr
    assert "2 of 4 samples" in logged and "seq_len=32" in logged
    assert sum(b.num_real_tokens for b in loader) == 22


def test_empty_dataset_gives_empty_epochs(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", [])
    loader = PackedLoader(dataset)
    assert len(loader) == 0 and list(loader) == [] and loader.epoch == 1


def test_bad_loader_arguments(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", [5])
    with pytest.raises(ValueError, match="rank 2 must be below world_size 2"):
        PackedLoader(dataset, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PackedLoader(dataset, batch_size=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        PackedLoader(tmp_path / "missing")


def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rega-packed-loader")]


def test_prefetch_thread_stops_when_the_iterator_is_dropped(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", [5] * 200)
    loader = PackedLoader(dataset, seq_len=8, prefetch=2)
    iterator = iter(loader)
    next(iterator)
    assert _loader_threads()
    del iterator
    gc.collect()
    deadline = time.monotonic() + 10
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _loader_threads()
    assert loader.state_dict()["cursor"] == 1


def test_interpreter_exits_with_a_live_iterator(tmp_path):
    write_dataset(tmp_path / "ds", [5] * 200)
    script = textwrap.dedent(f"""
        from rega_engine.data import PackedLoader
        loader = PackedLoader({str(tmp_path / "ds")!r}, seq_len=8, prefetch=2)
        ITERATOR = iter(loader)  # a global: still alive at interpreter exit
        next(ITERATOR)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_token_id_outside_the_vocabulary_names_its_shard_and_sample(tmp_path):
    """A damaged tokens.bin (no checksum in format 1 to catch it) must not reach the embedding as
    a bare IndexError: the batch that holds it names the file and the sample."""
    from rega_engine.errors import DataError

    _, samples = write_dataset(tmp_path / "ds", [5] * 12, vocab=500)
    tokens = np.memmap(tmp_path / "ds" / "tokens.bin", dtype=np.int32, mode="r+")
    tokens[7 * 5 + 2] = 60000   # sample 7, position 2
    tokens.flush()
    del tokens
    loader = PackedLoader(TokenDataset(tmp_path / "ds"), seq_len=16, batch_size=2, shuffle=False,
                          prefetch=2)
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'ds' / 'tokens.bin'}: sample 7 of the shard (sample 7 of the dataset) "
            "holds token id 60000 at position 2, outside the vocabulary 0..499 of ") +
            r".*the shard is damaged: run `rega-engine prepare` again"):
        for _ in loader:
            pass


def test_kind_and_domain_ids_are_checked_when_a_dataset_is_opened(tmp_path):
    from rega_engine.errors import DataError

    write_dataset(tmp_path / "ds", [5] * 4)
    domains = np.load(tmp_path / "ds" / "domains.npy")
    domains[2] = 9   # 3 domains
    np.save(tmp_path / "ds" / "domains.npy", domains)
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'ds' / 'domains.npy'}: sample 2 has id 9, outside 0..2")):
        TokenDataset(tmp_path / "ds")


def test_a_state_of_another_plan_is_named_before_anything_is_loaded(tmp_path):
    dataset, _ = write_dataset(tmp_path / "ds", [5] * 10)
    loader = PackedLoader(dataset, seq_len=16, batch_size=2)
    state = {**loader.state_dict(), "num_samples": 1227, "seq_len": 8}
    assert loader.state_mismatches(state) == [("num_samples", 1227, 10), ("seq_len", 8, 16)]
    assert loader.state_mismatches(loader.state_dict()) == []
