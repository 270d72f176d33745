"""Python face of the C++ packer: `plan_bins` and the sharded, resumable `PackedLoader`.

An epoch is planned up front, identically on every rank and without communication: shuffle the
samples with (seed, epoch), pack them into rows with windowed best-fit-decreasing, shuffle the rows,
cut them into global batches of world_size * batch_size rows and deal each global batch's rows to
the ranks balanced by tokens. Each rank then materialises only its own rows, in C++ with the GIL
released, on a background thread that stays `prefetch` batches ahead.

With `share_plan` (a `PlanSharing`; the training loop passes one under torchrun with several
processes per node) one process per node plans each epoch and the others map its plan
(rega_engine/data/shared_plan.py): the node holds one plan instead of one per process.
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rega_engine import _C
from rega_engine.data.dataset import TokenDataset
from rega_engine.data.shared_plan import PlanSharing, SharedPlan
from rega_engine.errors import DataError
from rega_engine.kinds import KINDS, check_kind_weights
from rega_engine.log import get_logger

if TYPE_CHECKING:
    from rega_engine.batch import PackedBatch

log = get_logger(__name__)
_INT64_MAX = np.iinfo(np.int64).max


def _int_at_least(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def plan_bins(lengths, seq_len: int, *, window: int | None = None) -> np.ndarray:
    """Assigns each sample to a row ("bin") of at most `seq_len` tokens.

    Best-fit-decreasing over consecutive windows of `window` samples in the order given (None: one
    window over everything); a bin left open at the end of a window may still take samples from the
    next window, then closes. Deterministic. Returns int64 bin ids in 0..num_bins-1, every id used,
    numbered in opening order, and -1 for a sample longer than `seq_len` (it fits no row).
    """
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"plan_bins: lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"plan_bins: lengths must be integers, got dtype {arr.dtype}")
    seq_len = _int_at_least(seq_len, "plan_bins: seq_len")
    window = max(arr.size, 1) if window is None else _int_at_least(window, "plan_bins: window")
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        raise ValueError("plan_bins: lengths do not fit int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    negative = np.flatnonzero(arr < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(f"plan_bins: lengths must be >= 0, lengths[{i}] = {int(arr[i])}")
    return _C.plan_bins(arr, seq_len, window)


@dataclass(frozen=True)
class _EpochRows:
    """An epoch's rows, the same for every world size: which samples each row ("bin") holds and
    the order the rows are consumed in. Bin b holds bin_samples[bin_splits[b]:bin_splits[b + 1]]."""
    epoch: int
    bin_splits: np.ndarray    # int64 (num_bins + 1,)
    bin_samples: np.ndarray   # int64 dataset sample ids
    # int64 cu_seqlens segments a row of this bin adds (documents + padding run)
    bin_segments: np.ndarray
    bin_tokens: np.ndarray    # int64 real tokens per bin
    # int64 the bins in consumption order: row r of the epoch is bin row_bins[r]
    row_bins: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.row_bins.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"bin_splits": self.bin_splits, "bin_samples": self.bin_samples,
                "bin_segments": self.bin_segments, "bin_tokens": self.bin_tokens,
                "row_bins": self.row_bins}


@dataclass(frozen=True)
class _EpochPlan:
    """One epoch as this rank sees it, from global row `start_row` on (0 unless resumed
    elastically)."""
    epoch: int
    start_row: int
    bin_splits: np.ndarray
    bin_samples: np.ndarray
    bin_segments: np.ndarray
    # int64 (micro-batches, batch_size) bin ids of this rank; -1 = all-padding row
    batches: np.ndarray
    num_rows: int             # rows of the whole epoch, all ranks


class PackedLoader:
    """Packed micro-batches (`rega_engine.batch.PackedBatch`) of one rank, epoch after epoch.

    Iterating yields the rest of the current epoch and then moves to the next one; `state_dict()`
    counts only the batches handed to the caller, so a restored loader continues batch for batch
    as an uninterrupted one would. Samples longer than `seq_len` are dropped, counted in
    `dropped_samples` and logged once. `tokens_per_epoch` counts the real (non-padding) tokens of
    one epoch over all ranks; `len(loader)` is this rank's micro-batches in the current epoch, the
    same on every rank. One iterator is live at a time: a new `iter(loader)` continues where the
    caller stopped taking batches and retires the previous iterator.

    `share_plan`: None (the default) plans every epoch in this process, as a loader on its own
    must. A `PlanSharing` (local rank, processes on the node, job identity) makes the node's local
    rank 0 plan each epoch into a file that the node's other loaders map read-only: the same rows,
    bit for bit, held once per node. One argument rather than four, because the four only mean
    something together, and `PlanSharing.from_env()` fills them in from torchrun's environment.
    """

    def __init__(self, dataset: TokenDataset | str | os.PathLike, *, seq_len: int | None = None,
                 batch_size: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True,
                 window: int = 65536, prefetch: int = 4, pin_memory: bool | None = None,
                 kind_weights: dict | None = None, share_plan: PlanSharing | None = None):
        if not isinstance(dataset, TokenDataset):
            if not isinstance(dataset, (str, os.PathLike)):
                raise TypeError("PackedLoader: dataset must be a TokenDataset or a path, got "
                                f"{type(dataset).__name__}")
            dataset = TokenDataset(dataset)
        self.dataset = dataset
        self.seq_len = _int_at_least(dataset.seq_len if seq_len is None else seq_len,
                                     "PackedLoader: seq_len")
        self.batch_size = _int_at_least(batch_size, "PackedLoader: batch_size")
        self.world_size = _int_at_least(world_size, "PackedLoader: world_size")
        self.rank = _int_at_least(rank, "PackedLoader: rank", minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"PackedLoader: rank {rank} must be below world_size {world_size}")
        self.seed = _int_at_least(seed, "PackedLoader: seed", minimum=0)
        self.shuffle = bool(shuffle)
        self.window = _int_at_least(window, "PackedLoader: window")
        self.prefetch = _int_at_least(prefetch, "PackedLoader: prefetch", minimum=0)
        if self.batch_size * self.seq_len > np.iinfo(np.int32).max:
            raise ValueError("PackedLoader: batch_size * seq_len = "
                             f"{self.batch_size * self.seq_len} overflows the "
                             "int32 cu_seqlens; use fewer rows per micro-batch")
        if pin_memory is not False:
            import torch  # here and in _make_batch: planning alone (prepare) never imports it
            if pin_memory is None:
                pin_memory = torch.cuda.is_available()
            elif not torch.cuda.is_available():
                raise ValueError("PackedLoader: pin_memory=True needs CUDA; pass pin_memory=None "
                                 "or False on this machine")
        self.pin_memory = bool(pin_memory)
        weights = dict(dataset.kind_weights)
        if kind_weights is not None:
            if not isinstance(kind_weights, dict):
                raise TypeError(f"PackedLoader: kind_weights must be a dict {{kind: weight}}, got "
                                f"{kind_weights!r}")
            weights.update(kind_weights)  # kinds it leaves out keep the dataset's weight
        self.kind_weights = check_kind_weights(weights, "PackedLoader: kind_weights",
                                               error=ValueError)
        self.pad_id = dataset.pad_id
        self.vocab_size = int(dataset.vocab_size)

        # Counted shard by shard: the samples' lengths (8 bytes a sample) are materialised whole
        # only where an epoch is planned (_build_rows), never by a loader that maps a node's
        # shared plan.
        self._num_samples = len(dataset)
        num_tokens = dropped_tokens = self.dropped_samples = 0
        for shard in dataset.shards:
            lengths = np.diff(shard.offsets)
            too_long = lengths > self.seq_len
            num_tokens += int(lengths.sum())
            self.dropped_samples += int(too_long.sum())
            dropped_tokens += int(lengths[too_long].sum())
        self.tokens_per_epoch = num_tokens - dropped_tokens
        if self.dropped_samples:
            log.warning("PackedLoader: %d of %d samples in %s are longer than seq_len=%d and are "
                        "dropped (%d tokens); truncate them in prepare to keep them",
                        self.dropped_samples, self._num_samples,
                        getattr(dataset, "path", "the dataset"), self.seq_len, dropped_tokens)
        if share_plan is not None and not isinstance(share_plan, PlanSharing):
            raise TypeError("PackedLoader: share_plan must be a PlanSharing or None, got "
                            f"{type(share_plan).__name__}")
        self.share_plan = share_plan
        # Everything the rows depend on but the seed (load_state_dict may change that one).
        self._shared = None if share_plan is None else SharedPlan(share_plan, {
            "dataset": dataset.fingerprint, "num_samples": self._num_samples,
            "num_tokens": num_tokens, "seq_len": self.seq_len, "window": self.window,
            "shuffle": self.shuffle})
        self._store = _C.TokenStore.from_shards(
            [(s.tokens, s.loss_mask, s.offsets, s.kinds, s.domains) for s in dataset.shards],
            np.array([self.kind_weights[k] for k in KINDS], np.float32))
        self._epoch = 0
        self._cursor = 0
        self._start_row = 0
        self._rows: _EpochRows | None = None
        self._plan: _EpochPlan | None = None
        # weak reference to the live iterator, so that an abandoned one can be collected
        self._active = None

    # -- epoch planning ------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def _epoch_plan(self) -> _EpochPlan:
        plan = self._plan
        if plan is None or plan.epoch != self._epoch or plan.start_row != self._start_row:
            self._plan = self._make_plan(self._epoch, self._start_row)
        return self._plan

    def _epoch_rows(self, epoch: int) -> _EpochRows:
        if self._rows is not None and self._rows.epoch == epoch:
            return self._rows
        if self._shared is None:
            self._rows = self._build_rows(epoch)
        else:
            # The node's file, mapped read-only; the leader builds and writes it first (and keeps
            # only the map), a follower builds only when the leader cannot hand it the file.
            arrays = self._shared.rows(self.seed, epoch, lambda: self._build_rows(epoch).arrays())
            self._rows = _EpochRows(epoch, **arrays)
        return self._rows

    def _build_rows(self, epoch: int) -> _EpochRows:
        lengths = np.ascontiguousarray(self.dataset.lengths, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(lengths)) if self.shuffle else np.arange(len(lengths),
                                                                             dtype=np.int64)
        bin_of = _C.plan_bins(np.ascontiguousarray(lengths[order]), self.seq_len, self.window)
        kept = bin_of >= 0
        samples, bins = order[kept], bin_of[kept]
        del order, bin_of, kept
        num_bins = int(bins.max()) + 1 if bins.size else 0
        by_bin = np.argsort(bins, kind="stable")  # within a row, documents keep the shuffled order
        bin_samples = np.ascontiguousarray(samples[by_bin], dtype=np.int64)
        del by_bin
        bin_splits = np.zeros(num_bins + 1, dtype=np.int64)
        np.cumsum(np.bincount(bins, minlength=num_bins), out=bin_splits[1:])
        sample_lengths = lengths[samples]
        bin_tokens = np.bincount(bins, weights=sample_lengths, minlength=num_bins).astype(np.int64)
        documents = np.bincount(bins, weights=sample_lengths > 0,
                                minlength=num_bins).astype(np.int64)
        bin_segments = documents + (bin_tokens < self.seq_len)
        row_bins = rng.permutation(num_bins) if self.shuffle else np.arange(num_bins,
                                                                            dtype=np.int64)
        return _EpochRows(epoch, bin_splits, bin_samples, bin_segments.astype(np.int64),
                          bin_tokens, np.ascontiguousarray(row_bins, dtype=np.int64))

    def _make_plan(self, epoch: int, start_row: int = 0) -> _EpochPlan:
        rows = self._epoch_rows(epoch)
        # Rows before start_row were trained (by however many ranks the run had then); the rest
        # are dealt to this world size. From start_row 0, or from a multiple of world_size *
        # batch_size, the deal is the uninterrupted run's, batch for batch.
        row_bins = rows.row_bins[start_row:]
        dealt = _C.deal_rows(np.ascontiguousarray(rows.bin_tokens[row_bins]), self.world_size,
                             self.batch_size)
        mine = dealt[:, self.rank, :]
        batches = np.where(mine >= 0, row_bins[np.maximum(mine, 0)], -1)
        return _EpochPlan(epoch, start_row, rows.bin_splits, rows.bin_samples, rows.bin_segments,
                          np.ascontiguousarray(batches, dtype=np.int64), rows.num_rows)

    @property
    def rows_consumed(self) -> int:
        """Rows of the current epoch handed out so far, over all ranks: the position a checkpoint
        saves, valid for any world size."""
        plan = self._epoch_plan()
        return min(plan.start_row + self._cursor * self.world_size * self.batch_size, plan.num_rows)

    def __len__(self) -> int:
        """Micro-batches per rank in the current epoch (the same on every rank)."""
        return int(self._epoch_plan().batches.shape[0])

    def _advance(self, epoch: int, cursor: int) -> None:
        """Moves the position state_dict() saves: the next batch to hand out is batch `cursor` of
        `epoch`. Only the live iterator calls this, once per batch it hands to the caller (and at
        an epoch's end), so that the position counts batches taken, not batches prefetched."""
        if epoch != self._epoch:
            self._start_row = 0
        self._epoch, self._cursor = epoch, cursor

    # -- materialising -------------------------------------------------------------------------
    def _make_batch(self, plan: _EpochPlan, k: int) -> PackedBatch:
        import torch

        from rega_engine.batch import PackedBatch
        rows = plan.batches[k]
        filled = rows[rows >= 0]
        num_segments = int(plan.bin_segments[filled].sum()) + (len(rows) - len(filled))
        shape = (self.batch_size, self.seq_len)
        pin = self.pin_memory

        def empty(size, dtype):
            return torch.empty(size, dtype=dtype, pin_memory=pin)

        input_ids, labels, position_ids, kind_ids, domain_ids = (empty(shape,
            torch.int64) for _ in range(5))
        loss_weights = empty(shape, torch.float32)
        cu_seqlens = empty((num_segments + 1,), torch.int32)
        segments, max_seqlen, real_tokens = self._store.fill_batch(
            plan.bin_splits, plan.bin_samples, rows, self.pad_id, input_ids.numpy(), labels.numpy(),
            position_ids.numpy(), kind_ids.numpy(), domain_ids.numpy(), loss_weights.numpy(),
            cu_seqlens.numpy())
        if segments != num_segments:
            raise RuntimeError(f"PackedLoader: batch {k} of epoch {plan.epoch} has {segments} "
                               f"segments, the plan expected {num_segments}")
        # A token id outside the vocabulary (a damaged shard) would end in a bare IndexError in
        # the embedding steps later; two reductions over the batch (about 20 microseconds for
        # 64K tokens, on the prefetch thread) find it here, where its shard and sample are known.
        ids = input_ids.numpy()
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise self._token_out_of_range(plan, filled)
        return PackedBatch(input_ids=input_ids, labels=labels, position_ids=position_ids,
                           cu_seqlens=cu_seqlens,
                           max_seqlen=int(max_seqlen), kind_ids=kind_ids, domain_ids=domain_ids,
                           loss_weights=loss_weights, num_real_tokens=int(real_tokens))

    def _token_out_of_range(self, plan: _EpochPlan, bins: np.ndarray) -> DataError:
        """The first sample of `bins` holding a token id outside the vocabulary, named by its
        shard and its index there."""
        dataset = self.dataset
        for b in bins:
            for i in plan.bin_samples[plan.bin_splits[b]:plan.bin_splits[b + 1]]:
                tokens, _ = dataset.sample(int(i))
                bad = np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))
                if bad.size:
                    k = int(np.searchsorted(dataset.sample_base, int(i), side="right")) - 1
                    return DataError(
                        f"{dataset.shards[k].path / 'tokens.bin'}: sample "
                        f"{int(i) - int(dataset.sample_base[k])} of the shard (sample {int(i)} of "
                        f"the dataset) holds token id {int(tokens[bad[0]])} at position "
                        f"{int(bad[0])}, outside the vocabulary 0..{self.vocab_size - 1} of "
                        f"{dataset.path}/meta.json; the shard is damaged: run `rega-engine "
                        "prepare` again (it rewrites damaged shards)")
        return DataError(f"{dataset.path}: a batch holds a token id outside the vocabulary "
                         f"0..{self.vocab_size - 1}, but no sample does; the dataset changed "
                         "while it was read?")

    def _retire_active_iterator(self) -> None:
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close(invalidate=True)
        self._active = None

    def __iter__(self) -> _BatchIterator:
        self._retire_active_iterator()
        iterator = _BatchIterator(self, self._epoch_plan(), start=self._cursor)
        self._active = weakref.ref(iterator)
        return iterator

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position: epoch and `rows_consumed`, the rows of the planned epoch that every rank
        together has been handed. It does not depend on the world size, so a run may resume with
        any number of processes (and any batch_size); `cursor` is this world size's batch index."""
        return {
            "epoch": self._epoch,
            "rows_consumed": self.rows_consumed,
            "cursor": self._cursor,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "window": self.window,
            "num_samples": self._num_samples,
        }

    # These decide the plan itself; resuming under other values would replay or skip data.
    PLAN_KEYS = ("num_samples", "seq_len", "shuffle", "window")

    def state_mismatches(self, state: dict) -> list[tuple[str, object, object]]:
        """(key, saved, this loader's) for each plan setting of `state` that differs from this
        loader's: a caller can refuse a resume before anything is loaded."""
        current = {"num_samples": self._num_samples, "seq_len": self.seq_len,
                   "shuffle": self.shuffle, "window": self.window}
        return [(key, state[key], current[key]) for key in self.PLAN_KEYS
                if key in state and state[key] != current[key]]

    def load_state_dict(self, state: dict) -> None:
        """Continues at the saved position. The epoch's plan (seed, shuffle, seq_len, window,
        dataset) must be the saved run's; world_size and batch_size may differ: the rows not yet
        consumed are dealt to this loader's ranks, so over the epoch every row is handed out
        once."""
        missing = [k for k in ("epoch", "seed") if k not in state]
        if "rows_consumed" not in state and "cursor" not in state:
            missing.append("rows_consumed")
        if missing:
            raise KeyError(f"PackedLoader.load_state_dict: state lacks {missing}")
        for key, saved, current in self.state_mismatches(state)[:1]:
            raise ValueError(f"PackedLoader.load_state_dict: state has {key}={saved!r} "
                             f"but this loader has {current!r}; build the loader with the "
                             "settings of the saved run")
        epoch = _int_at_least(state["epoch"], "state['epoch']", minimum=0)
        if "rows_consumed" in state:
            rows = _int_at_least(state["rows_consumed"], "state['rows_consumed']", minimum=0)
        else:   # a state saved before rows_consumed existed: its world size's batches
            cursor = _int_at_least(state["cursor"], "state['cursor']", minimum=0)
            rows = cursor * int(state.get("world_size",
                                          self.world_size)) * int(state.get("batch_size",
                                                                                          self.batch_size))
        self._retire_active_iterator()
        self.seed = _int_at_least(state["seed"], "state['seed']", minimum=0)
        self._plan = self._rows = None
        num_rows = self._epoch_rows(epoch).num_rows
        if rows > num_rows and not ("cursor" in state and "rows_consumed" not in state
                                    and rows - num_rows < int(state.get("world_size",
                                        1)) * int(state.get("batch_size", 1))):
            raise ValueError(f"PackedLoader.load_state_dict: rows_consumed {rows} is past the "
                             f"{num_rows} rows of epoch {epoch}")
        if rows >= num_rows:
            self._epoch, self._start_row, self._cursor = epoch + 1, 0, 0
        elif rows % (self.world_size * self.batch_size) == 0:
            # On a global-batch boundary of this world size: the uninterrupted plan, at its batch.
            self._epoch, self._start_row, self._cursor = epoch, 0, rows // (self.world_size
                                                                            * self.batch_size)
        else:
            self._epoch, self._start_row, self._cursor = epoch, rows, 0


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_LIVE_ITERATORS: weakref.WeakSet[_BatchIterator] = weakref.WeakSet()


@atexit.register
def _stop_all_iterators() -> None:
    # Iterators still alive at exit (held by a global, say) must not leave a thread behind.
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()


class _BatchIterator:
    """The rest of the loader's current epoch; a background thread keeps `prefetch` batches
    ready."""

    def __init__(self, loader: PackedLoader, plan: _EpochPlan, start: int):
        self._loader = loader
        self._plan = plan
        self._next = start
        self._end = int(plan.batches.shape[0])
        self._done = False
        self._invalidated = False
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if loader.prefetch > 0 and self._next < self._end:
            self._queue = queue.Queue(maxsize=loader.prefetch)
            # The thread gets the loader, plan and queue, never `self`: an abandoned iterator can be
            # collected, and its __del__ stops the thread.
            self._thread = threading.Thread(
                target=_produce, args=(loader, plan, self._next, self._end, self._queue,
                                       self._stop),
                name=f"rega-packed-loader-rank{loader.rank}", daemon=True)
            self._thread.start()
            _LIVE_ITERATORS.add(self)

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> PackedBatch:
        loader = self._loader
        if self._invalidated:
            raise RuntimeError("PackedLoader: this iterator was replaced by load_state_dict() or "
                               "a newer iter(loader); iterate the loader again")
        if self._done:
            raise StopIteration
        if self._next >= self._end:  # an empty epoch still counts as one
            self._finish_epoch()
            raise StopIteration
        batch = self._take() if self._queue is not None else loader._make_batch(self._plan,
                                                                                self._next)
        self._next += 1
        if self._next == self._end:
            self._finish_epoch()
        else:
            loader._advance(self._plan.epoch, self._next)
        return batch

    def _take(self) -> PackedBatch:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("PackedLoader: the prefetch thread stopped without a "
                                       "batch") from None
                continue
            if isinstance(item, _Failure):
                self.close()
                raise item.error
            return item

    def _finish_epoch(self) -> None:
        self._done = True
        self._loader._advance(self._plan.epoch + 1, 0)
        self.close()

    def close(self, invalidate: bool = False) -> None:
        """Stops the prefetch thread and drops the batches it made ahead; the loader keeps its
        position."""
        self._done = True
        self._invalidated = self._invalidated or invalidate
        self._stop.set()
        if self._queue is not None:
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        self._queue = None
        _LIVE_ITERATORS.discard(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _produce(loader: PackedLoader, plan: _EpochPlan, start: int, end: int, out: queue.Queue,
             stop: threading.Event) -> None:
    try:
        for k in range(start, end):
            if stop.is_set():
                return
            item = loader._make_batch(plan, k)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
    except BaseException as e:  # handed to the consumer, which raises it where the user sees it
        while not stop.is_set():
            try:
                out.put(_Failure(e), timeout=0.05)
                return
            except queue.Full:
                continue
