"""The one boundary contract between the loader and the model: a packed batch.

Rows of `seq_len` tokens hold whole documents (samples). Labels are *unshifted*, aligned with
`input_ids` as Hugging Face models expect: the model predicts `labels[t + 1]` from position `t`.
A label is -100 on prompt tokens, on padding and on the first token of every document, so that
after the shift no prediction crosses a document boundary. Padding only sits at a row's end and
carries no sample: no loss, no kind, no domain. `cu_seqlens` indexes the flattened (B * L) tokens,
so that shapes stay static; a row's trailing padding run is one extra segment in it (positions
0, 1, ... like a document, so that models deriving segments from `position_ids` agree), which
keeps every real document attending only to itself. `num_real_tokens` excludes padding.

This is the layout flash-attn's varlen functions, transformers' DataCollatorWithFlattening and
TRL's padding-free batches use, so our parts plug into theirs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rega_engine.kinds import GENERAL_DOMAIN, KIND_ID, KINDS  # noqa: F401  (re-exported)

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # (B, L) int64; padding holds pad_id
    labels: torch.Tensor         # (B, L) int64; -100 on prompt, padding and document starts
    position_ids: torch.Tensor   # (B, L) int64; restart at 0 per document and per padding run
    cu_seqlens: torch.Tensor     # (segments + 1,) int32 over the flattened (B * L) tokens
    max_seqlen: int              # longest segment in the batch
    kind_ids: torch.Tensor       # (B, L) int64 index into KINDS; -1 on padding
    domain_ids: torch.Tensor     # (B, L) int64; 0 = general; -1 on padding
    loss_weights: torch.Tensor   # (B, L) float32; the label token's weight, 0 where label == -100
    num_real_tokens: int         # tokens that belong to a document (padding excluded)

    def to(self, device, non_blocking: bool | None = None) -> PackedBatch:
        # Asynchronous copies are only safe host -> GPU (from pinned memory): a non-blocking copy
        # to the CPU returns before the data has arrived.
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{
            f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
            for f in fields(self) for v in [getattr(self, f.name)]
        })

    def as_hf_kwargs(self) -> dict:
        """Padding-free keyword arguments for a transformers model (flattened to one row)."""
        flat_cu = self.cu_seqlens
        return {
            "input_ids": self.input_ids.reshape(1, -1),
            "labels": self.labels.reshape(1, -1),
            "position_ids": self.position_ids.reshape(1, -1),
            "cu_seq_lens_q": flat_cu, "cu_seq_lens_k": flat_cu,
            "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen,
        }
