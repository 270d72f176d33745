"""The C++ packer core: bin planning, rank dealing and batch materialisation (rega_engine._C)."""
from bisect import bisect_left, insort

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rega_engine import _C
from rega_engine.data import plan_bins

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bfd_bin_count(lengths, seq_len):
    """Textbook best-fit-decreasing: only the multiset of free capacities decides the bin count."""
    free, bins = [], 0
    for n in sorted((n for n in lengths if n <= seq_len), reverse=True):
        i = bisect_left(free, n)
        if i == len(free):
            bins, rest = bins + 1, seq_len - n
        else:
            rest = free.pop(i) - n
        if rest > 0:
            insort(free, rest)
    return bins


def check_plan(lengths, seq_len, bins):
    lengths = np.asarray(lengths, dtype=np.int64)
    assert bins.dtype == np.int64 and bins.shape == lengths.shape
    np.testing.assert_array_equal(bins == -1, lengths > seq_len)
    kept = bins >= 0
    if kept.any():
        num_bins = int(bins.max()) + 1
        assert set(bins[kept].tolist()) == set(range(num_bins)), "bin ids must be 0..n-1, all used"
        assert np.bincount(bins[kept], weights=lengths[kept]).max() <= seq_len


@FAST
@given(lengths=st.lists(st.integers(0, 70), max_size=300), seq_len=st.integers(1, 64),
       window=st.one_of(st.none(), st.integers(1, 50)))
def test_plan_bins_contract(lengths, seq_len, window):
    bins = plan_bins(lengths, seq_len, window=window)
    check_plan(lengths, seq_len, bins)
    np.testing.assert_array_equal(bins, plan_bins(lengths, seq_len, window=window))  # deterministic


@FAST
@given(lengths=st.lists(st.integers(1, 64), max_size=300), seq_len=st.integers(1, 64))
def test_plan_bins_one_window_uses_as_few_bins_as_best_fit_decreasing(lengths, seq_len):
    bins = plan_bins(lengths, seq_len)
    num_bins = int(bins.max()) + 1 if (bins >= 0).any() else 0
    assert num_bins == bfd_bin_count(lengths, seq_len)


@FAST
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=300), window=st.integers(1, 40))
def test_plan_bins_bins_live_at_most_two_windows(lengths, window):
    # Streaming: a bin may take the next window's samples, never those of a window after that.
    bins = plan_bins(lengths, 40, window=window)
    window_of = np.arange(len(lengths)) // window
    for b in range(int(bins.max()) + 1):
        spans = window_of[bins == b]
        assert spans.max() - spans.min() <= 1


def test_plan_bins_small_cases():
    # Longest first into the tightest fit: 5+3 fill one row, 4+2 the next; 9 fits no row of 8.
    np.testing.assert_array_equal(plan_bins([5, 3, 4, 2, 9], 8), [0, 0, 1, 1, -1])
    # A zero-length sample opens no row of its own.
    np.testing.assert_array_equal(plan_bins([4, 0], 4), [0, 0])
    assert plan_bins([], 8).shape == (0,)
    np.testing.assert_array_equal(plan_bins([9, 10], 8), [-1, -1])


def test_plan_bins_fill_on_sft_like_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(350), 1.0, 50_000).astype(np.int64), 1, 8192)
    bins = plan_bins(lengths, 4096, window=8192)
    kept = bins >= 0
    fill = lengths[kept].sum() / ((bins.max() + 1) * 4096)
    assert fill >= 0.995, fill


@pytest.mark.parametrize("bad, message", [
    (dict(lengths=[3, -1], seq_len=8), "lengths\\[1\\] = -1"),
    (dict(lengths=[3], seq_len=0), "seq_len"),
    (dict(lengths=[[3, 4]], seq_len=8), "1-D"),
    (dict(lengths=[1.5, 2.0], seq_len=8), "integers"),
    (dict(lengths=[3], seq_len=8, window=0), "window"),
])
def test_plan_bins_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        plan_bins(**bad)


@FAST
@given(tokens=st.lists(st.integers(0, 50), max_size=60), world_size=st.integers(1, 5),
       batch_size=st.integers(1, 4))
def test_deal_rows_gives_every_rank_batch_size_rows_balanced_by_tokens(tokens, world_size,
                                                                       batch_size):
    row_tokens = np.asarray(tokens, dtype=np.int64)
    dealt = _C.deal_rows(row_tokens, world_size, batch_size)
    per_global = world_size * batch_size
    assert dealt.shape == (-(-len(tokens) // per_global), world_size, batch_size)
    real = dealt[dealt >= 0]
    assert sorted(real.tolist()) == list(range(len(tokens)))  # every row exactly once
    for g, batch in enumerate(dealt):
        assert set(batch[batch >= 0].tolist()) == set(range(g * per_global,
                                                            min((g + 1) * per_global, len(tokens))))
        loads = [row_tokens[r[r >= 0]].sum() for r in batch]
        biggest = row_tokens[batch[batch >= 0]].max(initial=0)
        assert max(loads) - min(loads) <= biggest


def test_deal_rows_spreads_the_padding_rows_of_the_last_batch():
    dealt = _C.deal_rows(np.full(5, 10, dtype=np.int64), 4, 2)
    assert sorted((dealt[0] >= 0).sum(axis=1).tolist()) == [1, 1, 1, 2]


# -- materialising ------------------------------------------------------------------------------

def make_store(lengths, rng, num_kinds=3, weights=(1.0, 0.5, 2.0)):
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    data = dict(
        tokens=rng.integers(1, 1000, total, dtype=np.int32),
        loss_mask=(rng.random(total) < 0.6).astype(np.uint8),
        offsets=offsets,
        kinds=rng.integers(0, num_kinds, len(lengths)).astype(np.uint8),
        domains=rng.integers(0, 4, len(lengths)).astype(np.int16),
        kind_weights=np.asarray(weights, dtype=np.float32),
    )
    return _C.TokenStore(**data), data


def reference_batch(data, rows, seq_len, pad_id):
    """Straightforward per-token build of a batch as rega_engine/batch.py documents it."""
    B, L = len(rows), seq_len
    out = dict(input_ids=np.full((B, L), pad_id), labels=np.full((B, L), -100),
               position_ids=np.zeros((B, L), int),
               kind_ids=np.full((B, L), -1), domain_ids=np.full((B, L), -1),
               loss_weights=np.zeros((B, L), np.float32))
    cu, real = [0], 0
    for r, samples in enumerate(rows):
        p = 0
        for s in samples:
            a, b = data["offsets"][s], data["offsets"][s + 1]
            for j in range(b - a):
                tok, learn = int(data["tokens"][a + j]), bool(data["loss_mask"][a + j])
                kind = int(data["kinds"][s])
                out["input_ids"][r, p + j] = tok
                out["position_ids"][r, p + j] = j
                out["kind_ids"][r, p + j] = kind
                out["domain_ids"][r, p + j] = data["domains"][s]
                if learn and j > 0:
                    out["labels"][r, p + j] = tok
                    out["loss_weights"][r, p + j] = data["kind_weights"][kind]
            if b > a:
                p += b - a
                cu.append(r * L + p)
        real += p
        if p < L:
            out["position_ids"][r, p:] = np.arange(L - p)
            cu.append((r + 1) * L)
    return out, np.asarray(cu, dtype=np.int32), real


def run_fill(store, bin_splits, bin_samples, rows, seq_len, pad_id, cu_size=None):
    B = len(rows)
    out = {name: np.full((B, seq_len), 12345, dtype=np.int64)
           for name in ("input_ids", "labels", "position_ids", "kind_ids", "domain_ids")}
    out["loss_weights"] = np.full((B, seq_len), 7.0, dtype=np.float32)
    cu = np.full(cu_size or B * seq_len + 1, -1, dtype=np.int32)
    segments, max_seqlen, real = store.fill_batch(bin_splits, bin_samples, np.asarray(rows,
        dtype=np.int64), pad_id,
                                                  cu_seqlens=cu, **out)
    return out, cu[: segments + 1], max_seqlen, real


@FAST
@given(lengths=st.lists(st.integers(0, 24), min_size=1, max_size=40), seq_len=st.integers(1, 32),
       batch_size=st.integers(1, 4), seed=st.integers(0, 2**16), pad_id=st.integers(0, 5))
def test_fill_batch_matches_the_reference(lengths, seq_len, batch_size, seed, pad_id):
    rng = np.random.default_rng(seed)
    store, data = make_store(lengths, rng)
    bins = plan_bins(lengths, seq_len)
    kept = np.flatnonzero(bins >= 0)
    num_bins = int(bins.max()) + 1 if kept.size else 0
    order = kept[np.argsort(bins[kept], kind="stable")]
    bin_splits = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bins[kept], minlength=num_bins), out=bin_splits[1:])
    rows = rng.integers(-1, num_bins,
                        batch_size).astype(np.int64) if num_bins else np.full(batch_size, -1)
    members = [[] if b < 0 else order[bin_splits[b]:bin_splits[b + 1]].tolist() for b in rows]

    out, cu, max_seqlen, real = run_fill(store, bin_splits, order.astype(np.int64), rows, seq_len,
                                         pad_id)
    expected, expected_cu, expected_real = reference_batch(data, members, seq_len, pad_id)
    for name, value in expected.items():
        np.testing.assert_array_equal(out[name], value, err_msg=name)
    np.testing.assert_array_equal(cu, expected_cu)
    assert max_seqlen == np.diff(expected_cu).max()
    assert real == expected_real
    # One segment per non-empty document, plus one padding run per row that is not full.
    lengths_of = [[lengths[s] for s in m] for m in members]
    segments = sum(sum(n > 0 for n in row) + (sum(row) < seq_len) for row in lengths_of)
    assert len(cu) - 1 == segments


def test_ignore_index_matches_the_python_side():
    # The C++ labels and the losses that skip them must agree on the marker.
    from rega_engine.batch import IGNORE_INDEX

    assert _C.IGNORE_INDEX == IGNORE_INDEX == -100


def test_fill_batch_rejects_a_row_over_seq_len_and_bad_ids():
    store, _ = make_store([5, 5], np.random.default_rng(0))
    splits = np.array([0, 2], dtype=np.int64)
    both = np.array([0, 1], dtype=np.int64)
    with pytest.raises(ValueError, match="more than seq_len = 8"):
        run_fill(store, splits, both, [0], 8, 0)
    with pytest.raises(ValueError, match="sample id 7 out of range"):
        run_fill(store, splits, np.array([0, 7], dtype=np.int64), [0], 16, 0)
    with pytest.raises(ValueError, match="names bin 3"):
        run_fill(store, splits, both, [3], 16, 0)
    with pytest.raises(ValueError, match="cu_seqlens buffer too small"):
        run_fill(store, splits, both, [0], 16, 0, cu_size=2)


def test_bindings_refuse_to_copy_instead_of_erroring():
    # A converted copy of an output buffer would be filled and thrown away; of a memory map, copied
    # whole on every batch. Both must be errors.
    store, data = make_store([3], np.random.default_rng(0))
    ok = dict(input_ids=np.zeros((1, 4), np.int64), labels=np.zeros((1, 4), np.int64),
              position_ids=np.zeros((1, 4), np.int64), kind_ids=np.zeros((1, 4), np.int64),
              domain_ids=np.zeros((1, 4), np.int64), loss_weights=np.zeros((1, 4), np.float32),
              cu_seqlens=np.zeros(4, np.int32))
    plan = (np.array([0, 1], np.int64), np.array([0], np.int64), np.array([0], np.int64), 0)
    with pytest.raises(TypeError):
        store.fill_batch(*plan, **{**ok, "labels": np.zeros((1, 4), np.int32)})
    with pytest.raises(TypeError):
        store.fill_batch(*plan, **{**ok, "input_ids": np.zeros((1, 8), np.int64)[:, ::2]})
    with pytest.raises(TypeError):
        _C.plan_bins(np.array([1, 2], dtype=np.int32), 8, 8)
    store.fill_batch(*plan, **ok)  # the exact types are filled in place
    np.testing.assert_array_equal(ok["input_ids"][0], [*data["tokens"], 0])
    read_only = np.zeros((1, 4), np.int64)
    read_only.setflags(write=False)
    with pytest.raises((ValueError, RuntimeError)):
        store.fill_batch(*plan, **{**ok, "kind_ids": read_only})


def test_token_store_checks_the_dataset_once():
    rng = np.random.default_rng(0)
    _, data = make_store([2, 3], rng)
    with pytest.raises(ValueError, match="kind id 2 but only 2 kind weights"):
        _C.TokenStore(**{**data, "kinds": np.array([0, 2], np.uint8), "kind_weights": np.ones(2,
            np.float32)})
    with pytest.raises(ValueError, match="offsets decrease"):
        _C.TokenStore(**{**data, "offsets": np.array([0, 3, 2], np.int64)})
    with pytest.raises(ValueError, match="tokens has only 5"):
        _C.TokenStore(**{**data, "offsets": np.array([0, 2, 9], np.int64)})
