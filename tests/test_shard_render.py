"""The chunk-at-a-time seq_len policy and counts of prepare's shard writing, against the rule
applied one sample at a time."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from rega_engine.data.render import RenderError
from rega_engine.data.shard_render import _add_chunk, _Chunk, _Tally
from rega_engine.errors import DataError

SEQ_LEN = 4


class Recorder:
    """Stands in for ShardWriter: keeps what add_many was given, split back into samples."""

    def __init__(self):
        self.samples = []

    def add_many(self, ids, mask, lengths, kinds, domains):
        assert ids.dtype == np.int32 and mask.dtype == np.uint8 and len(ids) == lengths.sum()
        ends = np.cumsum(lengths)
        for start, end, kind, domain in zip(ends - lengths, ends, kinds, domains):
            self.samples.append((ids[start:end].tolist(), mask[start:end].tolist(), int(kind),
                                 int(domain)))


def one_at_a_time(samples, data):
    """The policy, sample by sample: [(ids, mask, kind, domain)] written and the counts."""
    written, counts = [], Counter()
    for ids, mask, is_text, kind, domain, error in samples:
        if error:
            counts[f"unrenderable {error}"] += 1
            continue
        pieces = [(ids, mask)]
        if len(ids) > data.seq_len:
            if is_text and data.split_documents:
                pieces = [(ids[i:i + data.seq_len], mask[i:i + data.seq_len])
                          for i in range(0, len(ids), data.seq_len)]
                counts["split_documents"] += 1
                counts["document_pieces"] += len(pieces)
            elif data.too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            else:
                pieces = [(ids[:data.seq_len], mask[:data.seq_len])]
                counts["truncated"] += 1
        for piece_ids, piece_mask in pieces:
            loss = sum(piece_mask[1:] if is_text else piece_mask)
            if not loss:
                counts["dropped_no_loss" if not is_text or len(pieces) == 1
                       else "dropped_piece_no_loss"] += 1
                continue
            written.append((piece_ids, piece_mask, kind, domain))
            counts["tokens"] += len(piece_ids)
            counts["loss_tokens"] += loss
    return written, counts


def chunk_of(samples):
    references = [("rows.jsonl", line, 0, 0, s[2], "", s[3], s[4])
                  for line, s in enumerate(samples, start=1)]
    kinds = np.array([s[3] for s in samples], np.uint8)
    domains = np.array([s[4] for s in samples], np.int64)
    ids = np.array([t for s in samples for t in s[0]], np.int32)
    mask = np.array([m for s in samples for m in s[1]], np.uint8)
    lengths = np.array([len(s[0]) for s in samples], np.int64)
    errors = [(i, RenderError(f"bad {i}", s[5])) for i, s in enumerate(samples) if s[5]]
    return _Chunk(references, kinds, domains), (ids, mask, lengths, errors)


# (ids, mask, is_text, kind, domain, render error)
SAMPLES = [
    ([1, 2, 3], [0, 1, 1], False, 1, 1, None),               # fits
    ([], [], False, 1, 2, "special token in text"),          # failed to render
    ([4, 5, 6, 7, 8, 9], [0, 0, 1, 1, 1, 1], False, 1, 2, None),   # a long chat
    ([10, 11, 12, 13, 14, 15, 16, 17, 18], [1] * 9, True, 3, 0, None),   # 3 pieces, 1-token tail
    ([19, 20], [0, 0], False, 0, 0, None),                   # no loss token
    ([21, 22, 23, 24, 25], [0, 0, 0, 0, 1], True, 3, 1, None),   # a first piece without loss
    ([26], [1], True, 3, 1, None),                           # a 1-token document: nothing to learn
    ([27, 28, 29, 30], [0, 1, 1, 1], False, 2, 2, None),     # exactly seq_len
]


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
@pytest.mark.parametrize("split_documents", [True, False])
def test_a_chunk_is_written_and_counted_as_one_sample_at_a_time(too_long, split_documents):
    data = SimpleNamespace(seq_len=SEQ_LEN, too_long=too_long, split_documents=split_documents,
                           bad_rows="skip")
    writer, tally = Recorder(), _Tally(3)
    warned = []
    _add_chunk(writer, tally, *chunk_of(SAMPLES), data, lambda *a: warned.append(a))
    want, counts = one_at_a_time(SAMPLES, data)
    assert writer.samples == want
    info = tally.info()
    assert info["counts"] == {k: v for k, v in sorted(counts.items())
                              if not k.startswith("unrenderable")}
    assert info["unrenderable"] == {"special token in text": 1} and len(warned) == 1
    tokens_by_kind = Counter()
    for ids, _, kind, _ in want:
        tokens_by_kind[str(kind)] += len(ids)
    assert info["tokens_by_kind"] == dict(sorted(tokens_by_kind.items()))
    owner = {token: i for i, s in enumerate(SAMPLES) for token in s[0]}   # token ids are unique
    written = {owner[ids[0]] for ids, *_ in want}
    pairs = Counter(f"{SAMPLES[i][3]}/{SAMPLES[i][4]}" for i in written)
    assert info["samples_by_pair"] == dict(sorted(pairs.items()))

def test_the_first_sample_that_stops_the_run_is_named():
    data = SimpleNamespace(seq_len=SEQ_LEN, too_long="error", split_documents=True,
                           bad_rows="skip")
    warned = []
    with pytest.raises(DataError, match=r"rows.jsonl:3: the rendered sample has 6 tokens"):
        _add_chunk(Recorder(), _Tally(3), *chunk_of(SAMPLES), data, lambda *a: warned.append(a))
    assert len(warned) == 1          # the render failure before it was counted first

    data.bad_rows = "error"
    with pytest.raises(DataError, match=r"rows.jsonl:2: bad 1"):
        _add_chunk(Recorder(), _Tally(3), *chunk_of(SAMPLES), data, lambda *a: None)

    data.too_long, data.bad_rows = "drop", "skip"    # a split document is never "too long"
    _add_chunk(Recorder(), _Tally(3), *chunk_of(SAMPLES[3:4]), data, lambda *a: None)
