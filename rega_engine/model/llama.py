"""A single-device decoder for the Llama family (Llama 2/3, Qwen2/2.5, Mistral) on packed batches.

Module and parameter names are exactly transformers' (`model.layers.3.self_attn.q_proj.weight`,
...), so that loading and saving Hugging Face checkpoints is a plain name mapping (hf_io.py, which
imports this file; this file never imports it). The arguments and the parsing of a config.json
live in args.py. Parallelism (FSDP2, activation checkpointing, torch.compile) is applied from
outside, one `model.model.layers[i]` block at a time; nothing here knows about it.

The forward takes a packed batch (rega_engine/batch.py): rows of tokens flattened to one stream,
`cu_seqlens` marking the documents, `position_ids` restarting per document. Attention runs
through `rega_engine.kernels.varlen_attention`, the loss through
`rega_engine.kernels.fused_linear_cross_entropy` on the hidden states, so the (tokens x vocab)
logits are never materialised in training.

Kernel backends. Every module that has a fused kernel carries a `backend` ("auto", "triton",
"torch"; CausalLM.attention_backend sets the decoder's, CausalLM.cross_entropy_backend the
loss's). "triton" (what "auto" picks on CUDA) runs the fused kernels: RMSNorm with the
attention output's residual add folded in, RoPE computed from the restarting position ids,
SwiGLU with its activation recomputed in backward. "torch" runs the plain PyTorch below, the
formulas those kernels are tested against. Attention and the loss are custom ops on either
backend. Every kernel is a torch.library custom op with a fake implementation, so
torch.compile traces a block, or the whole model with fullgraph=True, as one graph; nothing in
the forward reads a tensor's value on the host, and no Python int that changes from batch to
batch reaches the graph (the attention's length hint is the row length, a static shape).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from rega_engine.batch import IGNORE_INDEX
from rega_engine.kernels._triton_compat import resolve_backend
from rega_engine.kernels.attention import INTERPRETED, varlen_attention
from rega_engine.kernels.cross_entropy import fused_linear_cross_entropy
from rega_engine.kernels.rms_norm import rms_norm
from rega_engine.kernels.rope import rotary_embedding
from rega_engine.kernels.split_attention import split_varlen_attention
from rega_engine.kernels.swiglu import swiglu
from rega_engine.kernels.vocab_parallel_cross_entropy import (
    vocab_parallel_linear_cross_entropy,
    vocab_shard,
)
from rega_engine.model.args import ModelArgs, RopeArgs


def uses_kernels(backend: str, x: torch.Tensor, who: str) -> bool:
    """Whether `backend` means the fused Triton kernels for tensors like x ("auto": on CUDA)."""
    return resolve_backend(backend, x, who, INTERPRETED) == "triton"


# --------------------------------------------------------------------------------------------
# Building blocks


def local_weight(weight: torch.Tensor, partial_grad: bool = False) -> torch.Tensor:
    """A parameter as this rank's plain tensor: under tensor parallelism the modules our kernels
    run in hold Replicate DTensors (train/tensor_parallel.py). Where their computation is
    replicated the local gradient is the whole one; where each rank computes its share of the
    tokens (sequence parallelism: `partial_grad`) it is a partial sum, which FSDP2 sums over the
    tp ranks when it reduces the gradient. Anything else passes through."""
    # isinstance, not an attribute probe: Dynamo traces isinstance of a DTensor parameter
    if not isinstance(weight, DTensor):
        return weight
    if not partial_grad:
        return weight.to_local()
    return weight.to_local(grad_placements=[Partial()] * len(weight.placements))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.backend = "auto"
        # True under sequence parallelism (train/tensor_parallel.py): this rank normalises its
        # share of the tokens only, so its weight's gradient is a partial sum
        self.tokens_split = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual) in one pass."""
        weight = local_weight(self.weight, partial_grad=self.tokens_split)
        if uses_kernels(self.backend, x, "RMSNorm"):
            return rms_norm(x, weight, self.eps, residual=residual, backend="triton")
        if residual is not None:
            x = x + residual
        # Normalise in fp32, cast back before the gain: the order transformers uses, so that
        # bf16 runs round the same way as the reference implementation.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = weight * xf.to(x.dtype)
        return y if residual is None else (y, x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(rope: RopeArgs, head_dim: int, device) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with llama3 long-context scaling if set."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "llama3":
        # Llama 3.1: keep short wavelengths, divide long ones by `factor`, blend in between.
        old_len = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor,
                             inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= old_len / rope.high_freq_factor) & (
            wavelen <= old_len / rope.low_freq_factor)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, rope: RopeArgs, head_dim: int):
    """cos, sin of shape (T, head_dim / 2) in fp32 for flat position ids (T,).

    Computed per forward from the positions instead of a cached table: no buffer to rebuild
    after meta-device init or to keep in sync under FSDP, and the cost is a few tiny kernels.
    """
    inv_freq = rope_inv_freq(rope, head_dim, position_ids.device)
    angles = position_ids.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


class Rope(NamedTuple):
    """What attention needs to rotate q and k: flat position ids (T,) and inverse frequencies
    for the kernel, and on the PyTorch path their cos, sin (T, head_dim / 2), once per forward."""
    position_ids: torch.Tensor
    inv_freq: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (T, H, D) by the half-split convention of Hugging Face Llama checkpoints
    (dimension i pairs with i + D/2), in fp32, cast back to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.softmax_scale = args.head_dim ** -0.5
        self.backend = "auto"
        kw = {"device": device, "dtype": dtype}
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.qkv_bias, **kw)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.qkv_bias, **kw)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.qkv_bias, **kw)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=args.o_bias, **kw)

    def forward(self, x, rope: Rope, cu_seqlens, max_seqlen, context=None):
        t = x.shape[0]
        # -1 heads: under tensor parallelism the projections return this rank's heads only
        q = self.q_proj(x).view(t, -1, self.head_dim)
        k = self.k_proj(x).view(t, -1, self.head_dim)
        v = self.v_proj(x).view(t, -1, self.head_dim)
        if uses_kernels(self.backend, x, "Attention"):
            q, k = rotary_embedding(q, k, rope.position_ids, rope.inv_freq, backend="triton")
        else:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        if context is None:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True,
                                   softmax_scale=self.softmax_scale, backend=self.backend)
        else:   # this rank's queries against the whole row's keys (train/context_parallel.py)
            from rega_engine.train.context_parallel import gather_row
            k, v = gather_row(torch.cat((k, v), 1), context).chunk(2, 1)
            out = split_varlen_attention(q, k, v, context.cu_seqlens_q, cu_seqlens,
                                         context.q_positions, context.max_seqlen_q, max_seqlen,
                                         softmax_scale=self.softmax_scale, backend=self.backend)
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": args.mlp_bias}
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, **kw)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, **kw)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, **kw)
        self.backend = "auto"

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if uses_kernels(self.backend, x, "MLP"):
            return self.down_proj(swiglu(gate, up, backend="triton"))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One block: the unit FSDP2, activation checkpointing and torch.compile wrap."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.self_attn = Attention(args, device, dtype)
        self.mlp = MLP(args, device, dtype)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)

    def forward(self, x, rope: Rope, cu_seqlens, max_seqlen: int, context=None):
        attended = self.self_attn(self.input_layernorm(x), rope, cu_seqlens, max_seqlen, context)
        # x + attended and its norm in one pass (one kernel on the fused path)
        normed, x = self.post_attention_layernorm(attended, residual=x)
        return x + self.mlp(normed)


class DecoderModel(nn.Module):
    """transformers' `model.model`: embeddings, blocks, final norm."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device=device,
                                         dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, device, dtype)
                                    for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        # True under sequence parallelism (train/tensor_parallel.py): between the split matmuls
        # each tp rank holds an equal share of the tokens
        self.sequence_parallel = False

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int,
                context=None) -> torch.Tensor:
        """Flat (T,) ids and positions -> final normalised hidden states (T, hidden); under
        context parallelism (a ContextShard) T is this rank's tokens of the batch."""
        weight = self.embed_tokens.weight
        split = vocab_shard(weight)
        if split is None:   # the module's own call: its hooks run
            x = self.embed_tokens(input_ids)
        else:   # tensor parallelism: the table split by vocabulary rows
            from rega_engine.train.tensor_parallel import embed_split_vocabulary
            x = embed_split_vocabulary(input_ids, split, weight.device_mesh,
                                       self.sequence_parallel)
        rope = Rope(position_ids, rope_inv_freq(self.args.rope, self.args.head_dim,
                                                position_ids.device))
        if not all(uses_kernels(layer.self_attn.backend, x, "Attention") for layer in self.layers):
            angles = position_ids.float()[:, None] * rope.inv_freq[None, :]
            rope = rope._replace(cos=angles.cos(), sin=angles.sin())
        for layer in self.layers:
            x = layer(x, rope, cu_seqlens, max_seqlen, context)
        if not self.sequence_parallel:
            return self.norm(x)
        from rega_engine.train.tensor_parallel import gather_tokens
        return gather_tokens(self.norm(x), weight.device_mesh)   # every token, for the LM head


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    # Per-token cross-entropy (B, L), detached and unweighted, aligned with `labels`: entry t is
    # the loss of predicting labels[t] from position t - 1; 0 where ignored and at t = 0.
    token_losses: torch.Tensor | None = None
    logits: torch.Tensor | None = None   # (B, L, vocab), only when no labels are given


class CausalLM(nn.Module):
    """Llama-family causal LM on packed batches; parameter names are transformers'."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.model = DecoderModel(args, device, dtype)
        # Tied models have no lm_head module, as their checkpoints have no lm_head.weight.
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(
            args.hidden_size, args.vocab_size, bias=False, device=device, dtype=dtype)
        self.cross_entropy_backend = "auto"
        self.generation_config: dict | None = None   # generation_config.json, kept for saving

    # -- backends, settable by the training loop from its config --------------------------------
    @property
    def attention_backend(self) -> str:
        """The backend of the decoder's kernels: varlen attention, RoPE, RMSNorm (with the
        residual add), SwiGLU."""
        return self.model.layers[0].self_attn.backend if len(self.model.layers) else "auto"

    @attention_backend.setter
    def attention_backend(self, value: str) -> None:
        for module in self.model.modules():
            if isinstance(module, (Attention, MLP, RMSNorm)):
                module.backend = value

    @property
    def kernel_backend(self) -> str:
        """All five kernels at once (attention_backend and cross_entropy_backend)."""
        return self.attention_backend

    @kernel_backend.setter
    def kernel_backend(self, value: str) -> None:
        self.attention_backend = self.cross_entropy_backend = value

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _head_weight(self) -> torch.Tensor:
        """The LM head's weight as a plain tensor for the logits. Under tensor parallelism the
        head (tied or not) is split by vocabulary rows: it is gathered whole, and the gradient's
        way back keeps each rank's rows."""
        weight = self.lm_head_weight
        full_tensor = getattr(weight, "full_tensor", None)
        return weight if full_tensor is None else full_tensor()

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init as transformers does it (normal(0, initializer_range) for linears and
        embeddings, zero biases, unit norms), parameter by parameter in init_order. Works after
        `to_empty()` from the meta device, also on FSDP2 DTensor parameters with seed=None (seed
        torch's global RNG instead: a local generator is not supported there; build_model's
        sharded init reproduces the seeded CPU values instead)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.embed_tokens.weight.device)
            generator.manual_seed(seed)
        std = self.args.initializer_range
        for name, how in init_order(self):
            param = self.get_parameter(name)
            if how == INIT_NORMAL:
                param.normal_(0.0, std, generator=generator)
            elif how == INIT_ZEROS:
                nn.init.zeros_(param)
            else:
                nn.init.ones_(param)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                labels: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None,
                reduction: str = "mean", return_token_losses: bool = False,
                context=None) -> CausalLMOutput:
        """input_ids (B, L), or (1, T) for one flattened stream.

        Without `cu_seqlens` every row is one causal document (position_ids alone never split
        documents: pass cu_seqlens for packed rows). With it, `cu_seqlens` (int32) marks the
        segments of the flattened B * L tokens; `position_ids` restart per segment and are
        derived from `cu_seqlens` on the device if not given. `max_seqlen`, the longest
        segment, is optional: only a sliding-window config reads it (the attention kernels get
        the row length L as their length hint, so that no changing int reaches a compiled
        graph). Under torch.compile of the whole model mark `cu_seqlens` dynamic
        (`torch._dynamo.mark_dynamic(cu_seqlens, 0)`) so that another document count does
        not recompile; eagerly this forward marks it for compiled blocks itself.

        `labels` are unshifted (batch.py): position t predicts labels[t + 1] of its own row.
        `loss_weights` (B, L) is the weight of each label token. The loss is the fused linear
        cross-entropy with the kernel's `reduction`: "mean" (weighted sum / weight of the
        non-ignored labels), "sum", or "none" (B, L) aligned with labels like `token_losses`.
        Logits (B, L, vocab) are returned only when `labels` is None.

        `context` (train/context_parallel.ContextShard): context parallelism. Every argument
        still describes the whole micro-batch, as every rank of the cp group reads it; this
        rank computes its own tokens (context.index) against the row's gathered keys and values.
        The loss is this rank's share ("sum": the shares add up over the group; "mean" is
        refused), and logits, "none" losses and token losses are (B, L) with zeros at the other
        ranks' positions.
        """
        if context is not None and labels is not None and reduction == "mean":
            raise ValueError("context parallelism: reduction='mean' would average each rank's "
                             "share separately; use 'sum' and divide by the total weight")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape "
                             f"{tuple(input_ids.shape)}")
        b, l = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        cu_seqlens, max_seqlen, position_ids = packed_segments(input_ids, position_ids,
                                                               cu_seqlens, max_seqlen)
        if not torch.compiler.is_compiling():
            # blocks compiled on their own then take any document count without recompiling
            torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        self._check_sliding_window(cu_seqlens, max_seqlen, l, labels)
        ids, positions = input_ids.reshape(-1), position_ids.reshape(-1)
        if context is not None:   # this rank's tokens only, from here to the loss
            ids, positions = context.local(ids), context.local(positions)
        hidden = self.model(ids, positions, cu_seqlens, l, context)
        if labels is None:
            logits = F.linear(hidden, self._head_weight())
            if context is not None:
                logits = context.scatter(logits)
            return CausalLMOutput(logits=logits.view(b, l, -1))
        return self._loss(hidden, labels, loss_weights, reduction, return_token_losses, context)

    def _check_sliding_window(self, cu_seqlens: torch.Tensor, max_seqlen: int | None,
                              row_length: int, labels: torch.Tensor | None) -> None:
        window = self.args.sliding_window
        # segments lie within rows, so the row length bounds them when max_seqlen is not given
        if window is None or (max_seqlen if max_seqlen is not None else row_length) <= window:
            return
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        longest = int(lengths.max()) if lengths.numel() else 0   # host sync, rare branch
        if labels is not None and longest > window:
            # max_seqlen counts the padding runs, which are segments too (batch.py), so an
            # all-padding row is a segment of seq_len. A segment without a trained label changes
            # neither the loss nor any other token, so only segments that train must fit.
            longest = _longest_trained_segment(cu_seqlens, labels)   # host sync, rare branch
        if longest > window:
            raise ValueError(
                f"a segment of {longest} tokens exceeds sliding_window={window} of this "
                f"{self.args.model_type} config; the window is not implemented (documents "
                f"within it get exact attention), so use seq_len <= {window} or pack shorter "
                "documents")

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor,
              loss_weights: torch.Tensor | None, reduction: str,
              return_token_losses: bool, context=None) -> CausalLMOutput:
        """The fused linear cross-entropy of the hidden states (B * L, hidden) against labels;
        under context parallelism, of this rank's positions (their shares of "sum" and "mean"
        add up over the cp group only for "sum"; "none" and token losses come back (B, L) with
        zeros at the other ranks' positions)."""
        b, l = labels.shape
        # Shift the (small) labels rather than the (large) hidden states: position t of a row
        # is scored against labels[t + 1]; each row's last position gets IGNORE_INDEX.
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        weights = None
        if loss_weights is not None:
            if loss_weights.shape != labels.shape:
                raise ValueError(f"loss_weights shape {tuple(loss_weights.shape)} != labels "
                                 f"shape {tuple(labels.shape)}")
            weights = F.pad(loss_weights[:, 1:], (0, 1), value=0.0).reshape(-1)
        if context is not None:   # shifted on the whole row above: a chunk's last position
            target = context.local(target)   # predicts the next chunk's first label
            weights = None if weights is None else context.local(weights)
        # under tensor parallelism a head split by vocabulary rows is never gathered
        split = vocab_shard(self.lm_head_weight)
        if split is None:
            result = fused_linear_cross_entropy(
                hidden, self._head_weight(), target, ignore_index=IGNORE_INDEX,
                token_weights=weights, reduction=reduction, backend=self.cross_entropy_backend,
                return_token_losses=return_token_losses)
        else:
            rows, start, group = split
            result = vocab_parallel_linear_cross_entropy(
                hidden, rows, target, vocab_start=start, vocab_size=self.args.vocab_size,
                group=group, ignore_index=IGNORE_INDEX, token_weights=weights,
                reduction=reduction, backend=self.cross_entropy_backend,
                return_token_losses=return_token_losses)
        loss, token_losses = result if return_token_losses else (result, None)
        if context is not None:
            loss = context.scatter(loss) if reduction == "none" else loss
            token_losses = None if token_losses is None else context.scatter(token_losses)
        if reduction == "none":
            loss = _align_with_labels(loss, b, l)
        if token_losses is not None:
            token_losses = _align_with_labels(token_losses, b, l)
        return CausalLMOutput(loss=loss, token_losses=token_losses)

    # -- accounting ----------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Distinct parameters; `exclude_embeddings` leaves out the input embedding table
        (for tied models that table is also the LM head and is then left out too)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Matmul FLOPs per trained token, forward + backward: 6 x (non-embedding parameters,
        the LM head included even when tied). Attention scores come on top: attention_flops()."""
        head = self.args.vocab_size * self.args.hidden_size if self.lm_head is None else 0
        return 6 * (self.num_parameters(exclude_embeddings=True) + head)

    def attention_flops(self, doc_lengths: Sequence[int] | torch.Tensor) -> int:
        """Causal attention FLOPs, forward + backward, over documents of the given lengths.

        Per layer and head, a causal document of n tokens needs n^2 / 2 query-key dot products
        of head_dim multiply-adds for QK^T and as many for PV: 2 matmuls x 2 FLOPs x n^2/2 x
        head_dim forward; backward is twice the forward, so 3x in all:
            6 * n_layers * n_heads * head_dim * sum(n^2).
        Pass real document lengths only (not padding segments) for honest MFU.
        """
        if isinstance(doc_lengths, torch.Tensor):
            sum_sq = int((doc_lengths.to(torch.int64) ** 2).sum())
        else:
            sum_sq = sum(int(n) ** 2 for n in doc_lengths)
        a = self.args
        return 6 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * sum_sq


INIT_NORMAL, INIT_ZEROS, INIT_ONES = "normal", "zeros", "ones"


def init_order(model: nn.Module) -> Iterator[tuple[str, str]]:
    """(parameter name, how) for every parameter CausalLM.init_weights sets, in the order it sets
    them: INIT_NORMAL (`normal_(0, initializer_range)`, one call over the whole tensor, drawn from
    the init generator), INIT_ZEROS (biases) or INIT_ONES (RMSNorm gains); only the normal ones
    advance the generator. The one definition of that order: init_weights follows it, and so does
    the sharded random init of train/parallel.py, which walks a meta-device CausalLM of the same
    args and draws the same tensors whole, one at a time, keeping each rank's shard. The walk is
    `model.named_modules()` (each module once, in registration order), so for a model wrapped
    after construction (LoRA adapters are nn.Linear too) pass an unwrapped one of the same args."""
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield dot + "weight", INIT_NORMAL
            if getattr(module, "bias", None) is not None:
                yield dot + "bias", INIT_ZEROS
        elif isinstance(module, RMSNorm):
            yield dot + "weight", INIT_ONES


def packed_segments(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None,
                    max_seqlen: int | None) -> tuple[torch.Tensor, int | None, torch.Tensor]:
    """(cu_seqlens int32, max_seqlen, position_ids (B, L)) for a (B, L) batch, filling in what
    the caller left out as CausalLM.forward documents it, without a host sync (max_seqlen stays
    None when packed rows come without it)."""
    b, l = input_ids.shape
    device = input_ids.device
    if cu_seqlens is None:
        # One document per row; built on the device so no host sync happens.
        cu_seqlens = torch.arange(0, b + 1, device=device, dtype=torch.int32) * l
        max_seqlen = l
        if position_ids is None:
            position_ids = torch.arange(l, device=device).expand(b, l)
    else:
        if cu_seqlens.dtype != torch.int32:
            cu_seqlens = cu_seqlens.to(torch.int32)
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, b * l).view(b, l)
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids "
                         f"shape {tuple(input_ids.shape)}")
    # max_seqlen passes through untouched: int() on it would make torch.compile guard on its
    # value, and recompile when the next batch's longest document differs
    return cu_seqlens, max_seqlen, position_ids


def _align_with_labels(per_position: torch.Tensor, b: int, l: int) -> torch.Tensor:
    """(B * L,) values indexed by predicting position -> (B, L) indexed by the predicted label,
    so that they line up with labels, kind_ids and domain_ids."""
    return F.pad(per_position.view(b, l)[:, :-1], (1, 0), value=0.0)


def _longest_trained_segment(cu_seqlens: torch.Tensor, labels: torch.Tensor) -> int:
    """Length of the longest segment holding a label other than IGNORE_INDEX (0 if none)."""
    starts = cu_seqlens.to(torch.int64)
    lengths = starts[1:] - starts[:-1]
    trained = (labels.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]
    segment = torch.searchsorted(starts[1:], trained, right=True).clamp(max=lengths.numel() - 1)
    return int(lengths[segment].max()) if trained.numel() and lengths.numel() else 0


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Flat position ids (total,) restarting at every document start, without a host sync."""
    idx = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    starts = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(starts, idx, right=True) - 1
    return idx - starts[doc.clamp(0, starts.numel() - 1)]


def from_config(hf_config: dict | str | os.PathLike | ModelArgs, dtype: torch.dtype | None = None,
                device=None, seed: int | None = None) -> CausalLM:
    """A randomly initialised model for a Hugging Face config (dict, config.json or directory).
    On device="meta" nothing is initialised: call `to_empty(...)` then `init_weights()`."""
    args = hf_config if isinstance(hf_config, ModelArgs) else ModelArgs.from_hf_config(hf_config)
    model = CausalLM(args, device=device, dtype=dtype)
    if torch.device(device if device is not None else "cpu").type != "meta":
        model.init_weights(seed=seed)
    return model
