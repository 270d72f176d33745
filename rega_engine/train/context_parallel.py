"""Context parallelism (parallel.cp): each packed row split over the cp ranks of a group.

The cp ranks of a group read the same micro-batch (the loader deals rows by data-parallel rank)
and each computes an equal share of its tokens. Which tokens: under the causal rule a token's
attention work grows with its position in its document, so every document (and padding run) is
cut into 2 x cp equal pieces and rank i keeps pieces i and 2cp-1-i ("zigzag" per document: an
early piece paired with its mirror), and the few tokens left over at a document's end (its length
modulo 2 x cp) go round the ranks in the same zigzag order, continuing from document to document,
so that every rank holds exactly B x L / cp tokens. A row holding one document is thus the
familiar zigzag of the whole row (Megatron's, Llama 3's); a row of packed documents of mixed
lengths stays balanced too, where a zigzag of the row's chunks would not (the documents' work is
not spread evenly along the row: 21% apart at cp 2 on a long-tailed mix, measured by
`attention_work`; the per-document split is within 1%, tests/test_context_parallel.py).
Everything per token follows the token to its rank: ids, positions (RoPE), labels and loss
weights (shifted on the whole row first: a rank's last token of a piece predicts a label another
rank holds), kinds and domains for the metrics.

Attention: each rank computes its own queries against the keys and values of the whole row, which
it gathers from its group (`gather_row`: one all-gather per layer of K and V together; in the
backward their gradients go back, summed, by one reduce-scatter) and reorders into row order, so
that documents are contiguous in K again. `rega::split_varlen_attention` then keeps each query
within its document and causal by its position in the row (kernels/split_attention.py).

Gathering the whole row at once costs the memory of K and V for the full row per layer (freed
after the layer; saved for the backward only under no activation checkpointing) and exposes the
all-gather; a ring that overlaps each chunk's transfer with compute would hide it at the price of
cp rounds of smaller kernels. Which wins is for GPU measurements to decide (docs/long-context.md);
on the shapes this engine targets the K/V of a row is small next to the activations CP divides
(grouped-query attention: Llama 3 8B keeps 8 KV heads for its 32 query heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rega_engine.batch import IGNORE_INDEX, PackedBatch


def token_owners(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """(T,) int64: the cp rank that computes each token of a batch whose segments (documents and
    padding runs, covering all T tokens) are `cu_seqlens`; equal counts when 2 cp divides T."""
    cu = cu_seqlens.to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1])
    if total % (2 * cp):
        raise ValueError(f"context parallelism over {cp} ranks: the batch's {total} tokens are "
                         f"not a multiple of {2 * cp}")
    offset = torch.arange(total) - torch.repeat_interleave(cu[:-1], lengths)
    piece = torch.repeat_interleave(lengths // (2 * cp), lengths)
    in_pieces = offset < piece * 2 * cp
    # which of the 2 cp pieces (for the left-over tokens: their turn in the round)
    turn = torch.where(in_pieces, offset // piece.clamp(min=1), 0)
    left_over = ~in_pieces
    turn[left_over] = torch.arange(int(left_over.sum())) % (2 * cp)
    return torch.where(turn < cp, turn, 2 * cp - 1 - turn)


@dataclass
class ContextShard:
    """One micro-batch's split for one cp rank: what the model needs to run its part of the row
    (CausalLM.forward(..., context=shard)) and what the loop needs to count it once."""
    index: torch.Tensor          # (T_local,) int64: this rank's tokens in the flattened batch
    q_positions: torch.Tensor    # (T_local,) int32: the same, for the attention's causal rule
    cu_seqlens_q: torch.Tensor   # (segments + 1,) int32: this rank's tokens per batch segment
    max_seqlen_q: int
    row_order: torch.Tensor      # (B * L,) int64: gathered (rank after rank) -> row order
    rank_order: torch.Tensor     # (B * L,) int64: its inverse
    owned_labels: torch.Tensor   # (B * L,) bool: labels this rank scores (its tokens predict)
    group: object                # the cp process group
    cp: int
    cp_rank: int

    @property
    def counts_batch(self) -> bool:
        """Whether this rank counts the micro-batch's tokens, weights and FLOPs (one per group)."""
        return self.cp_rank == 0

    def local(self, flat: torch.Tensor) -> torch.Tensor:
        """A (B * L, ...) per-token tensor -> this rank's (T_local, ...) part."""
        return flat.index_select(0, self.index)

    def scatter(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's (T_local, ...) values at their places in a (B * L, ...) zero tensor."""
        out = local.new_zeros((self.row_order.numel(), *local.shape[1:]))
        return out.index_copy(0, self.index, local)

    def own(self, labels: torch.Tensor) -> torch.Tensor:
        """labels with IGNORE_INDEX wherever another rank of the group scores the label."""
        return labels.masked_fill(~self.owned_labels.view(labels.shape), IGNORE_INDEX)


def shard_batch(batch: PackedBatch, cp: int, cp_rank: int, group,
                device: torch.device | None = None) -> ContextShard:
    """The ContextShard of a (host) micro-batch: built from its cu_seqlens on the host, so that
    nothing synchronises with the device, then moved to `device`."""
    rows, seq_len = batch.input_ids.shape
    owners = token_owners(batch.cu_seqlens, cp)
    gathered = torch.argsort(owners, stable=True)   # rank after rank, each in row order
    index = gathered.view(cp, -1)[cp_rank]
    cu_q = torch.searchsorted(index, batch.cu_seqlens.to("cpu", torch.int64)).to(torch.int32)
    owned = torch.zeros(rows * seq_len, dtype=torch.bool)
    # position t predicts labels[t + 1] of its own row (batch.py): that label is this rank's
    predicted = index + 1
    owned[predicted[predicted % seq_len != 0]] = True
    device = device or batch.input_ids.device
    lengths = cu_q[1:] - cu_q[:-1]
    return ContextShard(
        index=index.to(device), q_positions=index.to(device, torch.int32),
        cu_seqlens_q=cu_q.to(device),
        max_seqlen_q=int(lengths.max()) if lengths.numel() else 0,
        row_order=torch.argsort(gathered).to(device), rank_order=gathered.to(device),
        owned_labels=owned.to(device), group=group, cp=cp, cp_rank=cp_rank)


# torch 2.13 renamed the tensor collectives (the old names warn); older releases have only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRow(torch.autograd.Function):
    """All ranks' (T_local, ...) tensors -> the row's (B * L, ...) in row order; backward: the
    row's gradient summed over the ranks, each getting its own tokens' part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, shard: ContextShard) -> torch.Tensor:
        ctx.shard = shard
        gathered = local.new_empty((shard.cp * local.shape[0], *local.shape[1:]))
        _all_gather(gathered, local.contiguous(), group=shard.group)
        return gathered.index_select(0, shard.row_order)

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor):
        shard = ctx.shard
        by_rank = grad_row.index_select(0, shard.rank_order).contiguous()
        mine = by_rank.new_empty((by_rank.shape[0] // shard.cp, *by_rank.shape[1:]))
        _reduce_scatter(mine, by_rank, op=dist.ReduceOp.SUM, group=shard.group)
        return mine, None


# Dynamo leaves the collectives out of a compiled block's graph (one break per layer): tracing
# the process group and the host-built indices would specialise the graph on every batch.
@torch.compiler.disable
def gather_row(local: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    """The whole row of a per-token tensor (keys and values) from this rank's part of it."""
    return _GatherRow.apply(local, shard)


# ------------------------------------------------------------------------------------------------
# Balance


def attention_work(doc_lengths: list[int], seq_len: int, cp: int) -> list[int]:
    """Causal attention work (query-key pairs) of each cp rank for one row whose documents have
    these lengths, packed from the row's start and followed by padding (which trains nothing and
    is left out): a query at document position p attends p + 1 keys, wherever its rank."""
    used = sum(doc_lengths)
    bounds = torch.tensor([0, *doc_lengths, seq_len - used] if used < seq_len
                          else [0, *doc_lengths]).cumsum(0)
    owners = token_owners(bounds, cp)[:used]
    lengths = torch.tensor(doc_lengths, dtype=torch.int64)
    positions = torch.arange(used) - torch.repeat_interleave(bounds[:-1][:len(doc_lengths)],
                                                             lengths)
    work = torch.bincount(owners, weights=(positions + 1).double(), minlength=cp)
    return [int(w) for w in work.tolist()]


def imbalance(work: list[int]) -> float:
    """max / mean - 1 of the ranks' work: 0 is perfect balance."""
    mean = sum(work) / len(work)
    return max(work) / mean - 1 if mean else 0.0
