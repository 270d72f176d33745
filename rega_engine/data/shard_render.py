"""One shard of `rega-engine prepare`: its samples rendered and tokenized (in worker processes or
in this one) and written, with the seq_len policy and every count of what did not make it.

Work moves a chunk (CHUNK samples) at a time, as whole arrays: a worker returns a chunk's tokens
and masks concatenated, with each sample's length, and the policy and the counts are numpy over
the chunk. Per sample there is only the rendering itself, so prepare's cost stays close to the
tokenizer's own (see benchmarks/bench_prepare.py), and what crosses between processes is four
arrays a chunk instead of two arrays a sample.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from ..kinds import KINDS
from ..log import get_logger
from ..tokenizer import load_tokenizer
from .dataset import ShardWriter
from .records import WARN_FIRST, DataError, load_row
from .render import ChatRenderer, RenderError

log = get_logger(__name__)

CHUNK = 256             # samples per task sent to a worker
_NO_IDS, _NO_MASK = np.empty(0, np.int32), np.empty(0, np.uint8)

# -- rendering, in worker processes --------------------------------------------------------------
_renderer: ChatRenderer | None = None


def _init_worker(path: str, template: str) -> None:
    global _renderer
    _renderer = ChatRenderer(load_tokenizer(path), template)


def render_chunk(jobs: list) -> tuple:
    """Samples.references() of a chunk, [(path, line, offset, length, is_text, system, kind,
    domain)] -> (ids int32 and mask uint8 of all the samples
    concatenated, length of each (0 for one that failed), [(index, RenderError)]). The worker
    reads each row from its file; a plain-text document is that text alone, after its prompt when
    it has one."""
    ids, masks, errors = [], [], []
    for i, (path, _, offset, length, is_text, system, _, _) in enumerate(jobs):
        content = load_row(path, offset, length, is_text)
        try:
            sample_ids, mask = (_renderer.render_text_arrays(content, system) if is_text
                                else _renderer.render_arrays(content, system))
        except RenderError as e:
            errors.append((i, e))
            sample_ids, mask = _NO_IDS, _NO_MASK
        ids.append(sample_ids)
        masks.append(mask)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.concatenate(ids), np.concatenate(masks), lengths, errors


class Renderers:
    """Renders lists of jobs, chunk by chunk and in order, in `workers` processes (or in this
    one)."""

    def __init__(self, tokenizer, path: str, template: str, workers: int):
        global _renderer
        self.pool = None
        if workers <= 1:   # this process, with the tokenizer it has loaded already
            _renderer = ChatRenderer(tokenizer, template)
            return
        # fork where there is one: workers start in milliseconds instead of re-importing
        # transformers.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (path,
                                                                                     template))

    def __call__(self, jobs: list):
        """Yields render_chunk's result for each CHUNK jobs, in order."""
        chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
        if self.pool is None:
            yield from map(render_chunk, chunks)
        else:
            yield from self.pool.imap(render_chunk, chunks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class Warnings:
    """Logs the first WARN_FIRST skipped samples of a process; the rest are only counted."""

    def __init__(self):
        self.left = WARN_FIRST

    def __call__(self, message: str, *args) -> None:
        if self.left > 0:
            self.left -= 1
            more = " (further ones of this process are only counted)" if self.left == 0 else ""
            log.warning(message + more, *args)


# -- the seq_len policy and the counts, a chunk at a time ----------------------------------------
class _Tally:
    """A shard's counts, as shard.json states them: what was written, per kind, domain and pair,
    and what was not, by reason."""

    def __init__(self, num_domains: int):
        self.domains = max(1, num_domains)
        self.counts: dict[str, int] = {}
        self.unrenderable: dict[str, int] = {}
        size = len(KINDS) * self.domains
        self.samples_pair = np.zeros(size, np.int64)
        self.tokens_pair = np.zeros(size, np.int64)

    def add(self, key: str, n: int, into: dict | None = None) -> None:
        into = self.counts if into is None else into
        if n:
            into[key] = into.get(key, 0) + int(n)

    def info(self) -> dict:
        def by(pairs: np.ndarray, axis: int) -> dict:
            totals = pairs.reshape(len(KINDS), self.domains).sum(axis=axis)
            return {str(i): int(v) for i, v in enumerate(totals) if v}

        def pairs(values: np.ndarray) -> dict:
            found = np.flatnonzero(values)
            return dict(sorted((f"{p // self.domains}/{p % self.domains}", int(values[p]))
                               for p in found))

        return {"counts": dict(sorted(self.counts.items())),
                "unrenderable": dict(sorted(self.unrenderable.items())),
                "samples_by_kind": by(self.samples_pair, 1),
                "samples_by_domain": by(self.samples_pair, 0),
                "samples_by_pair": pairs(self.samples_pair),
                "tokens_by_kind": by(self.tokens_pair, 1),
                "tokens_by_domain": by(self.tokens_pair, 0),
                "tokens_by_pair": pairs(self.tokens_pair)}


def _raise_or_warn(chunk, lengths: np.ndarray, errors: list, tally: _Tally, data,
                   warn: Warnings) -> None:
    """The chunk's render errors and too-long samples that stop the run (data.bad_rows or
    data.too_long = "error"), in sample order; the skipped ones counted and warned about."""
    too_long = lengths > data.seq_len
    if data.too_long == "error":
        splittable = chunk.is_text & data.split_documents
        fatal = np.flatnonzero(too_long & ~splittable)
    else:
        fatal = np.empty(0, np.int64)
    first_fatal = int(fatal[0]) if fatal.size else len(lengths)
    for i, error in errors:
        if i > first_fatal:
            break
        if data.bad_rows == "error":
            path, line = chunk.where(i)
            raise DataError(f"{path}:{line}: {error}", error.reason, path, line)
        tally.add(error.reason, 1, tally.unrenderable)
        warn("%s:%d: %s; sample skipped", *chunk.where(i), error)
    if fatal.size:
        path, line = chunk.where(first_fatal)
        raise DataError(f"{path}:{line}: the rendered sample has {int(lengths[first_fatal])} "
                        f"tokens, more than data.seq_len = {data.seq_len}; raise data.seq_len, or "
                        "set data.too_long to \"truncate\" or \"drop\"", "too long", path, line)


def _pieces(chunk, lengths: np.ndarray, failed: np.ndarray, tally: _Tally, data):
    """The rows the chunk's samples become: (sample, start, end) into the chunk's tokens. A sample
    fits in one; a longer document is split into seq_len pieces (data.split_documents), a longer
    chat truncated or dropped (data.too_long)."""
    seq_len = data.seq_len
    too_long = lengths > seq_len
    split = too_long & chunk.is_text & data.split_documents
    count = np.where(failed, 0, 1)
    count[split] = -(-lengths[split] // seq_len)
    tally.add("split_documents", np.count_nonzero(split))
    tally.add("document_pieces", count[split].sum())
    cut = too_long & ~split & ~failed
    if data.too_long == "drop":
        count[cut] = 0
        tally.add("dropped_too_long", np.count_nonzero(cut))
    else:   # "truncate" ("error" has stopped the run before)
        tally.add("truncated", np.count_nonzero(cut))
    sample = np.repeat(np.arange(len(lengths)), count)
    # a piece's number within its sample
    piece = np.arange(len(sample)) - np.repeat(np.cumsum(count) - count, count)
    starts = np.cumsum(lengths) - lengths
    start = starts[sample] + piece * seq_len
    end = np.minimum(start + seq_len, starts[sample] + lengths[sample])
    return sample, start, end, count


def _add_chunk(writer: ShardWriter, tally: _Tally, chunk, result, data, warn: Warnings) -> None:
    ids, mask, lengths, errors = result
    failed = np.zeros(len(lengths), bool)
    failed[[i for i, _ in errors]] = True
    _raise_or_warn(chunk, lengths, errors, tally, data, warn)
    sample, start, end, count = _pieces(chunk, lengths, failed, tally, data)

    # Loss tokens of each piece; a document's first token carries none (nothing predicts it).
    loss_sum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    is_text = chunk.is_text[sample]
    loss = loss_sum[end] - loss_sum[np.minimum(start + is_text, end)]
    keep = loss > 0
    dropped = ~keep
    whole = ~is_text | (count[sample] == 1)
    tally.add("dropped_no_loss", np.count_nonzero(dropped & whole))
    tally.add("dropped_piece_no_loss", np.count_nonzero(dropped & ~whole))   # a 1-token tail

    sample, start, end = sample[keep], start[keep], end[keep]
    size = end - start
    tally.add("tokens", size.sum())
    tally.add("loss_tokens", loss[keep].sum())
    pair = chunk.kinds.astype(np.int64) * tally.domains + chunk.domains
    tally.tokens_pair += np.bincount(pair[sample], weights=size,
                                     minlength=len(tally.tokens_pair)).astype(np.int64)
    tally.samples_pair += np.bincount(pair[np.unique(sample)], minlength=len(tally.samples_pair))
    if len(start) == len(lengths) and size.sum() == len(ids):   # every sample whole, in order
        picked = slice(None)
    else:   # the token positions of the kept pieces, in order
        picked = np.repeat(start - (np.cumsum(size) - size), size) + np.arange(size.sum())
    writer.add_many(ids[picked], mask[picked], size, chunk.kinds[sample], chunk.domains[sample])


class _Chunk:
    """The samples of one chunk: their references (Samples.references()) and, as arrays, what
    the policy and the counts need of them."""

    def __init__(self, references: list, kinds: np.ndarray, domains: np.ndarray):
        self.references = references
        self.is_text = np.fromiter((r[4] for r in references), bool, len(references))
        self.kinds, self.domains = kinds, domains

    def where(self, i: int) -> tuple[str, int]:
        """(path, line) of sample i's row."""
        return self.references[i][0], self.references[i][1]


def write_shard(directory: Path, samples, renderers: Renderers, data, fingerprint: str,
                first: int, warn: Warnings) -> dict:
    """Renders `samples` (a Samples slice of the mixture, from sample `first` on) and writes them
    as the shard at `directory`; returns its shard.json record."""
    kinds = np.asarray(samples.table["kind"])
    domains = np.asarray(samples.table["domain"], np.int64)
    jobs = samples.references()
    tally = _Tally(int(domains.max()) + 1 if len(domains) else 1)
    writer = ShardWriter(directory)
    results = renderers(jobs)
    try:
        for at, result in zip(range(0, len(jobs), CHUNK), results):
            part = slice(at, at + CHUNK)
            _add_chunk(writer, tally, _Chunk(jobs[part], kinds[part], domains[part]),
                       result, data, warn)
        return writer.finish({"fingerprint": fingerprint, "first_sample": first,
                              "mixture_samples": len(samples), **tally.info()})
    except BaseException:
        writer.abort()
        raise
    finally:
        if hasattr(results, "close"):
            results.close()
