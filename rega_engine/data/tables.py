"""Numpy tables for planning a mixture of any size within a memory budget.

A mixture of 100M samples kept as Python objects would take ~20 GB; as the numpy records here it
takes ~50 bytes a sample, and `TableStore` keeps tables in memory only up to its budget
(`data.memory_gb`): a table that would go past it lives in a file-backed memory map instead, so a
planning process's resident memory stays within the budget (plus the pages the kernel may drop)
whatever the input size. Map files are unlinked as soon as they are mapped: nothing is left behind,
even by a process that is killed.

Random choices here work block by block (BLOCK rows at a time) so they too need memory of a block,
not of the table; and none depends on the budget, so the same seed gives the same mixture whether
it was planned in memory or on disk.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np

BLOCK = 1 << 22          # rows per block of the block-wise choices and of the shuffle's buckets
HYPERGEOMETRIC_MAX = 10**9   # numpy's limit on each side of a hypergeometric draw


def seeded_rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator seeded from a string: stable across processes, platforms and Python versions."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


class TableStore:
    """Allocates tables in memory while their total stays within `budget` bytes, else as memory
    maps of files in `scratch` (a fresh directory under it, removed by close())."""

    def __init__(self, budget: float, scratch: str | os.PathLike | None = None):
        self.budget = float(budget)
        self.in_memory = 0          # bytes of the tables held in memory
        self.spilled = 0            # bytes of the tables mapped from files
        self._parent = scratch
        self._dir: str | None = None

    def fits(self, nbytes: int) -> bool:
        return self.in_memory + nbytes <= self.budget

    def _file(self) -> str:
        if self._dir is None:
            parent = self._parent
            if parent is not None:
                os.makedirs(parent, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix=".plan-", dir=parent)
        fd, path = tempfile.mkstemp(dir=self._dir)
        os.close(fd)
        return path

    def _map(self, path: str, dtype: np.dtype, n: int, mode: str) -> np.ndarray:
        if n == 0:
            os.unlink(path)
            return np.empty(0, dtype)
        table = np.memmap(path, dtype=dtype, mode=mode, shape=(n,))
        os.unlink(path)     # the mapping stays valid; the disk space goes with it
        self.spilled += n * dtype.itemsize
        return table

    def empty(self, dtype, n: int) -> np.ndarray:
        """An uninitialised table of `n` records."""
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize
        if self.fits(nbytes):
            self.in_memory += nbytes
            return np.empty(n, dtype)
        path = self._file()
        with open(path, "wb") as f:
            f.truncate(nbytes)
        return self._map(path, dtype, n, "r+")

    def release(self, table: np.ndarray) -> None:
        """Gives a table's bytes back to the budget (the caller drops its references)."""
        if not isinstance(table, np.memmap):
            self.in_memory -= table.nbytes

    def appender(self, dtype) -> Appender:
        return Appender(self, np.dtype(dtype))

    def close(self) -> None:
        if self._dir is not None:
            try:
                os.rmdir(self._dir)
            except OSError:
                pass
            self._dir = None


class Appender:
    """A table built one record at a time: records gather in memory while the store's budget
    allows, then stream to a file that finish() maps."""

    # Records wait as Python tuples (~200 bytes each, against the table's ~33) until a chunk is
    # converted: small chunks keep that transient to ~1 MB, so a prepare's peak memory does not
    # grow with the row count (64Ki tuples were 16 MB, the most of all it held past start-up).
    CHUNK = 1 << 12

    def __init__(self, store: TableStore, dtype: np.dtype):
        self.store, self.dtype = store, dtype
        self._pending: list[tuple] = []
        self._chunks: list[np.ndarray] = []
        self._file = None
        self._path = None
        self.count = 0

    def __len__(self) -> int:
        return self.count + len(self._pending)

    def append(self, record: tuple) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        chunk = np.array(self._pending, dtype=self.dtype)
        self._pending.clear()
        self.count += len(chunk)
        if self._file is None and not self.store.fits(chunk.nbytes):
            self._path = self.store._file()
            self._file = open(self._path, "wb")
            for held in self._chunks:
                held.tofile(self._file)
                self.store.release(held)
            self._chunks.clear()
        if self._file is not None:
            chunk.tofile(self._file)
        else:
            self.store.in_memory += chunk.nbytes
            self._chunks.append(chunk)

    def finish(self) -> np.ndarray:
        self._flush()
        if self._file is not None:
            self._file.close()
            return self.store._map(self._path, self.dtype, self.count, "r")
        if len(self._chunks) == 1:
            return self._chunks[0]
        # Concatenating briefly holds the chunks twice: fine within the budget's margin.
        table = np.concatenate(self._chunks) if self._chunks else np.empty(0, self.dtype)
        self._chunks.clear()
        return table


def choose_sorted(population: int, k: int, rng: np.random.Generator):
    """Yields, block by block, the sorted indices of a uniform random k-subset of
    range(population) (k <= population), in memory of one block."""
    if k > population:
        raise ValueError(f"cannot choose {k} of {population}")
    start, left, wanted = 0, population, k
    while wanted > 0:
        size = min(BLOCK, left)
        if size == left:
            take = wanted
        elif left - size >= HYPERGEOMETRIC_MAX:
            raise ValueError(f"a source of {population} rows: sampling a part of more than "
                             f"{HYPERGEOMETRIC_MAX} rows is not supported; split the file")
        else:   # how many of the k fall in this block
            take = int(rng.hypergeometric(size, left - size, wanted))
        if take:
            yield start + np.sort(rng.choice(size, take, replace=False))
        start, left, wanted = start + size, left - size, wanted - take


def shuffle_into(table: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> None:
    """A uniform random permutation of `table` written to `out`, in memory of a few blocks: each
    record goes to a random bucket of about BLOCK records, then each bucket is permuted (random
    buckets, each in random order, is a uniform permutation: every step treats records alike)."""
    n = len(table)
    buckets = max(1, -(-n // BLOCK))
    if buckets == 1:
        out[:] = table[rng.permutation(n)]
        return
    state = rng.bit_generator.state          # replayed: the bucket draws are made twice
    counts = np.zeros(buckets, np.int64)
    for start in range(0, n, BLOCK):
        counts += np.bincount(rng.integers(buckets, size=min(BLOCK, n - start)),
                              minlength=buckets)
    rng.bit_generator.state = state
    cursor = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for start in range(0, n, BLOCK):
        block = np.asarray(table[start:start + BLOCK])
        bucket = rng.integers(buckets, size=len(block))
        order = np.argsort(bucket, kind="stable")
        sizes = np.bincount(bucket, minlength=buckets)
        edges = np.concatenate([[0], np.cumsum(sizes)])
        for b in np.flatnonzero(sizes):
            out[cursor[b]:cursor[b] + sizes[b]] = block[order[edges[b]:edges[b + 1]]]
            cursor[b] += sizes[b]
    ends = np.cumsum(counts)
    for b in range(buckets):
        part = slice(ends[b] - counts[b], ends[b])
        out[part] = np.asarray(out[part])[rng.permutation(int(counts[b]))]
