"""rega-engine's kernels and padding-free batches inside Hugging Face transformers (and TRL).

Three pieces, each usable alone:

* `apply_rega_kernels(model)` patches a Llama / Qwen2 / Mistral causal LM in place: attention goes
  through `rega_engine.kernels.varlen_attention` (registered in transformers' AttentionInterface
  as "rega_varlen"), the training loss through `fused_linear_cross_entropy`, which never
  materialises the (tokens x vocab) logits, and RMSNorm, rotary embedding and SwiGLU through
  their kernels (per-module forwards, see hf_layers.py).
* `PaddingFreeCollator` flattens a list of tokenized samples into one row with restarting
  `position_ids` and `cu_seq_lens_*`: the DataCollatorWithFlattening convention, so that the HF
  Trainer or TRL's SFTTrainer feed the patched model without a single padding token.
* `packed_batches_for_hf` / `PackedHFDataset` hand the batches of our own `PackedLoader` (fixed
  shape rows, whole documents) to a transformers model or Trainer.

Only public hooks that transformers 5.17 and 5.23 share are used: `AttentionInterface.register`,
`AttentionMaskInterface.register`, `PreTrainedModel.set_attn_implementation`, the causal LM's
`model` / `lm_head` attributes, and per-instance `forward`s of the norm, attention and MLP modules
that call the same submodules (q_proj, gate_proj, ...) HF's forwards call.
"""
from __future__ import annotations

import types
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..batch import IGNORE_INDEX, PackedBatch
from .hf_layers import effective_linear_weight, plan_rms_norms, plan_rope, plan_swiglu

ATTENTION_NAME = "rega_varlen"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Feature keys that mark the tokens to train on when a sample carries no `labels`; the first is what
# `tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` returns, the last TRL's.
MASK_KEYS = ("assistant_masks", "assistant_mask", "completion_mask")


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

def segments_from_position_ids(position_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor,
                                                                                     int]:
    """cu_seqlens (int32, over the flattened batch_size * L tokens) and the longest segment.

    A segment starts at every row start and wherever a position does not follow its predecessor
    by one, which covers restarts at 0 as well as DataCollatorWithFlattening's `position_ids_start`.
    """
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[0] != batch_size:
        pos = pos.expand(batch_size, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([pos.numel()], device=pos.device, dtype=first.dtype)
    cu_seqlens = torch.cat([first, total]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


class _SegmentsMemo:
    """Remembers the segments derived from the last few position_ids / padding-mask tensors.

    Every layer of one forward gets the very same tensor, so deriving once per forward saves a
    host synchronisation per layer, and handing the kernel the same cu_seqlens object lets it
    reuse its work tables. Entries hold the tensor weakly and check its version counter, so a
    freed or edited tensor never hits.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: dict = {}

    def get(self, source: torch.Tensor, batch_size: int, derive):
        key = (id(source), batch_size, derive)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is source and hit[1] == source._version:
            return hit[2]
        value = derive(source, batch_size)
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (weakref.ref(source), source._version, value)
        return value


_SEGMENTS = _SegmentsMemo()


def _checked_cu_seqlens(cu_seq_lens_q: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor,
                                                                              int]:
    """A padding-free collator's cu_seq_lens_q as int32, and its longest segment, after checking
    that it covers all `num_tokens` of the flattened batch: one host sync for both figures."""
    cu_seqlens = cu_seq_lens_q.to(torch.int32)
    if cu_seqlens.numel() < 2:
        end = int(cu_seqlens[-1]) if cu_seqlens.numel() else "nothing"
    else:
        end, longest = torch.stack([cu_seqlens[-1], (cu_seqlens[1:] - cu_seqlens[:-1]).max()]
                                   ).tolist()
    if cu_seqlens.numel() < 2 or end != num_tokens:
        raise ValueError(
            f"cu_seq_lens_q ends at {end} but the batch holds {num_tokens} tokens; "
            "cu_seq_lens_q must cover every token of the flattened batch (PaddingFreeCollator "
            "and PackedBatch.as_hf_kwargs do). With the HF Trainer on an iterable dataset, pass "
            "accelerator_config={'dispatch_batches': False}: dispatching slices every tensor, "
            "cu_seq_lens_q included, to the batch size")
    return cu_seqlens, longest


def _segments_from_padding_mask(attention_mask: torch.Tensor, batch_size: int):
    # Each row's real tokens are one document: (indices of real tokens, cu_seqlens, longest).
    real = attention_mask.to(torch.bool)
    keep = real.reshape(-1).nonzero().reshape(-1)
    lengths = real.sum(dim=1)
    lengths = lengths[lengths > 0]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return keep, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def _padding_mask_only(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, **kwargs):
    # Varlen attention needs no 4D mask: keep only a 2D padding mask (bool, True = real token), and
    # drop it when nothing is padded, as transformers does for its flash-attention implementations.
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _attention_with_cache(module, query, key, value, attention_mask, scaling, sliding_window):
    # Decoding / chunked prefill (queries fewer than keys): rare outside generation, so plain SDPA
    # with an explicit bottom-right causal mask is the right tool, not the training kernel.
    q_len, kv_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].to(torch.bool)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function over `rega_engine.kernels.varlen_attention`.

    query (B, Hq, L, D), key/value (B, Hkv, L, D). Document boundaries come, in this order, from a
    2D padding mask (one document per row), `cu_seq_lens_q` + `max_length_q` (padding-free
    collators), restarts in `position_ids`, or else one causal document per row. Returns
    (B, L, Hq, D) as transformers expects.
    """
    from rega_engine.kernels import varlen_attention

    if dropout:
        raise ValueError(
            f"{ATTENTION_NAME} attention has no dropout, but {type(module).__name__} asks for "
            f"p={dropout}: set config.attention_dropout=0.0 (the Llama/Qwen2/Mistral default)")
    if softcap is not None:
        raise ValueError(f"{ATTENTION_NAME} attention does not support attention logit softcapping "
                         f"(softcap={softcap}); keep this model on 'sdpa' or 'eager'")
    batch, q_heads, length, head_dim = query.shape
    if key.shape[2] != length:
        return _attention_with_cache(module, query, key, value, attention_mask, scaling,
                                     sliding_window)

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Under autocast with fp32 weights the rotary embedding leaves q and k in fp32 while v comes out
    # of its projection in the autocast dtype; SDPA would run in the autocast dtype, and so do we.
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    elif not query.dtype == key.dtype == value.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    q = query.transpose(1, 2).reshape(batch * length, q_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)

    keep = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{ATTENTION_NAME} attention expects no mask or a 2D padding mask, "
                             f"got shape {tuple(attention_mask.shape)}; pass `attention_mask` as "
                             "(batch, length) 0/1")
        # Padded rows: each row's real tokens are one document; drop the padding, run varlen on
        # what is left, and put zeros back where the padding was.
        keep, cu_seqlens, max_seqlen = _SEGMENTS.get(attention_mask, batch,
                                                     _segments_from_padding_mask)
        q, k, v = q.index_select(0, keep), k.index_select(0, keep), v.index_select(0, keep)
    elif kwargs.get("cu_seq_lens_q") is not None:
        # Checked once per batch, not per layer: every layer gets the same tensor, and reading
        # its end (and longest segment) from the GPU is a device-to-host sync each time.
        cu_seqlens, longest = _SEGMENTS.get(kwargs["cu_seq_lens_q"], batch * length,
                                            _checked_cu_seqlens)
        cu_seqlens = cu_seqlens.to(q.device)
        max_seqlen = kwargs.get("max_length_q")
        max_seqlen = longest if max_seqlen is None else int(max_seqlen)
    elif kwargs.get("position_ids") is not None:
        cu_seqlens, max_seqlen = _SEGMENTS.get(kwargs["position_ids"], batch,
                                               segments_from_position_ids)
        cu_seqlens = cu_seqlens.to(q.device)
    else:
        cu_seqlens = torch.arange(0, batch * length + 1, length, device=q.device, dtype=torch.int32)
        max_seqlen = length

    if sliding_window is not None and max_seqlen > sliding_window:
        raise ValueError(
            f"{type(module).__name__} uses a sliding window of {sliding_window} tokens but a "
            f"document here has {max_seqlen}; {ATTENTION_NAME} attention is full causal: shorten "
            "the documents or keep this model on 'sdpa'")

    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scaling,
                           backend=getattr(module, "_rega_backend", "auto"))
    if keep is not None:
        out = out.new_zeros(batch * length, q_heads, head_dim).index_copy(0, keep, out)
    return out.reshape(batch, length, q_heads, head_dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    # Without a mask function of its own a custom implementation gets no padding mask at all.
    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask_only)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def _fused_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                        past_key_values=None,
                        inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                        **kwargs):
    """The causal LM's forward, with the training loss taken straight from the hidden states.

    Same semantics as transformers' ForCausalLMLoss: labels are unshifted and shifted here (or
    `shift_labels` is given already shifted), the loss is the mean over non-ignored targets, or
    their sum divided by `num_items_in_batch` when the Trainer passes it. In eval mode, without
    labels or with `logits_to_keep`, the original forward runs unchanged (it returns logits).
    """
    shift_labels = kwargs.get("shift_labels")
    # transformers >= 5.24 calls it `cache` (then it is in kwargs) and warns at the old name:
    # passed on under the name the model's own forward takes.
    if past_key_values is not None:
        kwargs[_cache_name(type(self).forward)] = past_key_values
    if (labels is None and shift_labels is None) or not self.training or logits_to_keep:
        return self._rega_original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        # Appending one ignored label and dropping the first keeps every hidden state in place
        # (no copy of hidden[:, :-1]) while targetting labels[t + 1] from position t.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat_labels = shift_labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _lm_head_loss(self, hidden.reshape(-1, hidden.shape[-1]), flat_labels, reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    # The cache by its current field name: reading or setting `past_key_values` on transformers
    # >= 5.24's outputs logs a deprecation warning at every run's first step.
    cache_field = _cache_name(CausalLMOutputWithPast)
    result = CausalLMOutputWithPast(loss=loss, logits=None,
                                    **{cache_field: getattr(outputs, cache_field, None)},
                                    hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)
    return result.to_tuple() if return_dict is False else result


def _fused_head_loss(model, hidden: torch.Tensor, labels: torch.Tensor,
                     reduction: str) -> torch.Tensor:
    """fused_linear_cross_entropy of (tokens, hidden) states over the LM head's effective weight,
    where that weight's parameters are whole tensors (see _lm_head_loss)."""
    from rega_engine.kernels import fused_linear_cross_entropy

    name = f"{type(model).__name__}.lm_head"
    split = _vocabulary_split_head(model.lm_head)
    if split is not None:
        return _vocab_parallel_head_loss(model, split, hidden, labels, reduction)
    _check_head_parameters(model.lm_head, name, in_forward=True)
    # The effective weight: under a PEFT LoRA adapter on the LM head, W + scaling * B @ A, so that
    # the adapter gets its gradient through the fused loss (plain `lm_head.weight` would drop it).
    weight = effective_linear_weight(model.lm_head, name)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX,
                                      reduction=reduction, backend=model._rega_backend)


def _vocabulary_split_head(head: torch.nn.Module):
    """vocab_shard of a plain nn.Linear LM head whose weight tensor parallelism split by
    vocabulary rows (ColwiseParallel on lm_head: Shard(0) over a 1-D mesh), else None."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    from rega_engine.kernels.vocab_parallel_cross_entropy import vocab_shard
    return vocab_shard(head.weight)


def _vocab_parallel_head_loss(model, split, hidden: torch.Tensor, labels: torch.Tensor,
                              reduction: str) -> torch.Tensor:
    """The loss over a vocabulary-split LM head without gathering it or the full logits: every
    rank of the head's group holds the same hidden states and labels and gets the same loss."""
    from rega_engine.kernels import vocab_parallel_linear_cross_entropy
    rows, start, group = split
    if getattr(hidden, "full_tensor", None) is not None:   # sequence-parallel hidden states
        hidden = hidden.full_tensor()
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, rows = hidden.to(dtype), rows.to(dtype)
    elif rows.dtype != hidden.dtype:
        rows = rows.to(hidden.dtype)
    return vocab_parallel_linear_cross_entropy(
        hidden, rows, labels, vocab_start=start, vocab_size=model.lm_head.weight.shape[0],
        group=group, ignore_index=IGNORE_INDEX, reduction=reduction, backend=model._rega_backend)


def _fsdp_units(head: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units (FSDPModule) at or below the LM head, outermost first:
    `fully_shard(lm_head)`, `fully_shard([embed_tokens, lm_head])` for tied embeddings, a PEFT
    LoRA wrapper sharded as a unit, or units inside it (its base_layer, ...)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:     # a torch built without distributed
        return []
    return [module for module in head.modules() if isinstance(module, FSDPModule)]


def _lm_head_loss(model, hidden: torch.Tensor, labels: torch.Tensor,
                  reduction: str) -> torch.Tensor:
    """The fused loss, with the LM head's parameters unsharded where FSDP2 shards them.

    The fused loss reads the LM head's weight instead of calling `lm_head(hidden)`. FSDP2 unshards
    a unit's parameters only around that unit's forward, so when the LM head is a unit of its own
    (Accelerate's FSDP2 plugin, torchtitan-style trainers) its weight is a sharded DTensor here.
    `register_fsdp_forward_method` is FSDP2's public way to make another method of a unit behave
    like its forward: pre-forward all-gathers the parameters and registers the post-backward
    (gradient reduce-scatter) on the inputs, post-forward reshards and registers the pre-backward
    unshard on the output, so that the loss's backward (which recomputes logits from the weight)
    finds the weight all-gathered again and its gradient lands on the unsharded parameter, to be
    reduce-scattered as FSDP2 does for lm_head(hidden). Each unit at or below the LM head gets
    such a method, and the loss runs nested inside all of them. When the LM head belongs to an
    enclosing unit (the root), that unit's forward is running now, so its parameters are already
    whole and nothing needs doing.
    """
    units = _fsdp_units(model.lm_head)
    if not units:
        return _fused_head_loss(model, hidden, labels, reduction)
    from torch.distributed.fsdp import register_fsdp_forward_method

    def through(index):
        if index == len(units):
            return lambda h, y, r: _fused_head_loss(model, h, y, r)
        unit = units[index]
        if not unit.__dict__.get("_rega_loss_method"):
            # Once per unit; registered at the first forward, so that sharding after patching
            # works the same as patching a sharded model.
            unit._rega_fused_loss = types.MethodType(_run_inside_method, unit)
            register_fsdp_forward_method(unit, "_rega_fused_loss")
            unit._rega_loss_method = True
        inner = through(index + 1)
        return lambda h, y, r: unit._rega_fused_loss(inner, h, y, r)

    return through(0)(hidden, labels, reduction)


def _run_inside_method(self, continuation, hidden, labels, reduction):
    # The forward method registered on each FSDP2 unit (see _lm_head_loss): FSDP2's hooks run
    # around it, and it hands the (possibly cast) inputs on to the next unit or to the loss.
    return continuation(hidden, labels, reduction)


def _has_fsdp_unit(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _check_head_parameters(head: torch.nn.Module, name: str, in_forward: bool,
                           fsdp_in_model: bool = False) -> None:
    """Refuses LM-head parameters that the fused loss would read as something other than the whole
    weight: DeepSpeed ZeRO-3 partitions, and DTensors that are still sharded where the loss runs
    (tensor parallelism, or an FSDP2 layout that leaves them sharded during the forward)."""
    dtensor = _dtensor_type()
    for pname, param in head.named_parameters():
        where = f"{name}.{pname}"
        # DeepSpeed is not imported for this: ZeRO-3 marks each partitioned parameter.
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            raise TypeError(
                f"{where} is partitioned by DeepSpeed ZeRO-3 (it carries `ds_id`): the fused "
                "cross-entropy reads the LM head's weight outside lm_head's forward, where "
                "ZeRO-3 holds only this rank's partition, so the loss would be wrong. Use "
                "apply_rega_kernels(model, cross_entropy=False) (the other kernels run inside "
                "their modules' forwards and work under ZeRO-3), or ZeRO stage 1/2, or FSDP2")
        if dtensor is None or not isinstance(param, dtensor):
            continue
        # In the forward every FSDP2 unit that manages the head has unsharded it (see
        # _lm_head_loss), so a DTensor left is tensor parallel (or a layout FSDP2 leaves sharded).
        # At patch time an FSDP2-sharded weight is a DTensor too, and telling it from a TP one
        # would take FSDP2's internals: only a model without any FSDP2 unit is refused then.
        if _vocabulary_split_head(head) is not None:
            continue   # tensor parallelism over the vocabulary: the vocabulary-parallel loss
        if in_forward or not fsdp_in_model:
            raise NotImplementedError(_tp_message(where, param))


def _tp_message(where: str, param) -> str:
    return (f"{where} is a DTensor with placements {tuple(param.placements)} on mesh "
            f"{param.device_mesh} where the fused cross-entropy reads it, a layout it does not "
            "handle: the vocabulary-parallel loss takes a plain nn.Linear LM head (no bias, no "
            "adapter) split by rows over a 1-D mesh (ColwiseParallel), and FSDP2 needs lm_head "
            "to be a fully_shard unit of its own or part of the root's. Otherwise pass "
            "apply_rega_kernels(model, cross_entropy=False)")


def _cache_name(target) -> str:
    """"cache" where a forward (its parameters) or an output class (its fields) knows it, as
    transformers >= 5.24 does; "past_key_values" before."""
    import inspect

    fields = getattr(target, "__dataclass_fields__", None)
    names = fields if fields is not None else inspect.signature(target).parameters
    return "cache" if "cache" in names else "past_key_values"


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------

def apply_rega_kernels(model, attention: bool = True, cross_entropy: bool = True,
                       rms_norm: bool = True,
                       rope: bool = True, swiglu: bool = True, backend: str = "auto",
                       fp8: bool = False, fp8_recipe: str = "tensorwise"):
    """Patch a transformers Llama, Qwen2 or Mistral causal LM in place to use rega-engine's kernels.

    attention: route every attention layer through varlen attention (padding-free batches keep
        documents apart; padded batches are unpadded on the fly).
    cross_entropy: in training mode with labels, compute the loss with the fused linear
        cross-entropy over the LM head's effective weight (a PEFT LoRA adapter on `lm_head`
        included); `outputs.logits` is then None.
    rms_norm: every RMSNorm module runs the fused RMSNorm kernel (fp32 statistics).
    rope: every attention layer rotates q and k with the rotary kernel at the position_ids HF
        passes down (restarting per document in padding-free rows), with the model's own
        inv_freq (Llama 3 scaling, Qwen2 theta); generation with a KV cache keeps HF's rope.
    swiglu: every MLP computes silu(gate_proj(x)) * up_proj(x) with the SwiGLU kernel.
    backend: the kernels' backend, "auto" (Triton on CUDA, the PyTorch reference elsewhere),
        "triton" or "torch"; a later call may change it.
    fp8: the decoder blocks' linear layers (not lm_head, norms, embeddings or LoRA adapters)
        train in FP8 with torchao's float8 `fp8_recipe` ("tensorwise", "rowwise" or
        "rowwise_with_gw_hp"), as train.precision = "fp8" does (rega_engine/train/fp8.py:
        apply_fp8_to_hf_model); off by default, refused below compute capability 8.9, on CPU slow.
    Calling it again is harmless; a False switch leaves that part as it is. Returns the model.
    What a kernel cannot do exactly (a non-SiLU MLP, a yarn/dynamic rope, DoRA or LoRA dropout on
    the LM head, an LM head partitioned by DeepSpeed ZeRO-3, ...) is refused with a
    ValueError/TypeError naming the module. A tensor-parallel LM head split by vocabulary rows
    (ColwiseParallel, a plain nn.Linear) gets the vocabulary-parallel loss, which never gathers
    it; other DTensor layouts where the loss runs raise NotImplementedError. FSDP2
    (`fully_shard`), before or after patching, is supported: an LM
    head that is a unit of its own (also tied with the embedding, or under a LoRA wrapper) is
    unsharded around the fused loss through FSDP2's forward hooks (see _lm_head_loss). A PEFT
    wrapper (LoRA, ...) gets its base model patched; adapters added after patching work too.
    """
    if callable(getattr(model, "get_base_model", None)):
        apply_rega_kernels(model.get_base_model(), attention=attention, cross_entropy=cross_entropy,
                           rms_norm=rms_norm, rope=rope, swiglu=swiglu, backend=backend, fp8=fp8,
                           fp8_recipe=fp8_recipe)
        return model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            "apply_rega_kernels supports transformers models of type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got {type(model).__name__} (model_type={model_type!r}). Load one of those (e.g. "
            "AutoModelForCausalLM.from_pretrained on a Llama checkpoint) or leave this model "
            "unpatched")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"apply_rega_kernels: backend={backend!r}; choose 'auto', 'triton' or "
                         "'torch'")
    patched = model.__dict__.setdefault("_rega_patched", set())
    if cross_entropy and "cross_entropy" not in patched:
        missing = [name for name in ("model", "lm_head") if not isinstance(getattr(model, name,
            None), torch.nn.Module)]
        if missing:
            raise TypeError("apply_rega_kernels(cross_entropy=True) needs a causal LM with "
                            f"`model` and `lm_head` (like {model_type.capitalize()}ForCausalLM); "
                            f"{type(model).__name__} lacks {', '.join(missing)}. Patch the "
                            "ForCausalLM model, or pass cross_entropy=False")
        # refuse an LM head the fused loss cannot read before patching anything; structure only:
        # on a model sharded already its parameters are shards, to be whole in the forward.
        head_name = f"{type(model).__name__}.lm_head"
        _check_head_parameters(model.lm_head, head_name, in_forward=False,
                               fsdp_in_model=_has_fsdp_unit(model))
        with torch.no_grad():
            effective_linear_weight(model.lm_head, head_name, check_only=True)
    # Every check runs before anything is patched: a refused switch leaves the model as it was.
    plans = [(name, plan(model)) for name, plan, wanted in (
        ("rms_norm", plan_rms_norms, rms_norm), ("rope", plan_rope, rope), ("swiglu", plan_swiglu,
                                                                            swiglu))
        if wanted]
    if fp8 and "fp8" not in patched:   # its checks (device, recipe) come before any conversion
        from rega_engine.train.fp8 import apply_fp8_to_hf_model
        apply_fp8_to_hf_model(model, fp8_recipe)
        patched.add("fp8")
    # transformers >= 5.25 kernelizes a loaded model with Hugging Face hub kernels by default and
    # kernelizes it again at every train()/eval() switch, which puts HF's forwards back over the
    # ones patched below (silently: measured on a Llama's RMSNorms). Our kernels replace those
    # layers, so hub kernelization is turned off first (the setter restores HF's own forwards).
    if getattr(model, "use_kernels", False):
        model.use_kernels = False
    model._rega_backend = backend
    for name, patch in plans:
        patch(backend)
        patched.add(name)
    if attention and "attention" not in patched:
        _register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError(f"{type(model).__name__} refused "
                               f"attn_implementation={ATTENTION_NAME!r} "
                               f"(kept {model.config._attn_implementation!r})")
        patched.add("attention")
    for module in model.modules():
        # Attention functions and patched forwards are shared; each module carries its backend.
        if hasattr(module, "_rega_backend") or (hasattr(module, "q_proj") and hasattr(module,
                                                                                      "o_proj")):
            module._rega_backend = backend
    if cross_entropy and "cross_entropy" not in patched:
        model._rega_original_forward = model.forward
        model.forward = types.MethodType(_fused_loss_forward, model)
        patched.add("cross_entropy")
    return model


# --------------------------------------------------------------------------------------------
# Padding-free batches
# --------------------------------------------------------------------------------------------

def _as_list(value, what: str, index: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    elif hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"feature {index}: `{what}` must be a list, tensor or array of ints, got "
                        f"{type(value).__name__}")
    if value and isinstance(value[0], (list, tuple)):
        raise ValueError(f"feature {index}: `{what}` is nested; give one flat sequence per feature "
                         "(tokenize without return_tensors, or take row 0)")
    return list(value)


class PaddingFreeCollator:
    """Flattens tokenized samples into one padding-free row for the HF Trainer or TRL's SFTTrainer.

    Each feature needs `input_ids` and either `labels` (unshifted, -100 = ignored), one of
    `assistant_masks` / `assistant_mask` / `completion_mask` (1 = train on that token), or neither
    (train on every token). The batch is the DataCollatorWithFlattening layout: `input_ids`,
    `labels`, `position_ids` of shape (1, T), `cu_seq_lens_q/k` (int32) and `max_length_q/k`
    (int), and the first token of every sample is labelled -100 so that no prediction crosses a
    sample boundary. A feature that is itself packed, as TRL's `pack_dataset` (padding_free) writes
    it, names its documents' lengths in `seq_lengths`: each is then a document of its own (positions
    restart, its first label is -100, one cu_seq_lens segment), and lengths that do not sum to the
    feature's length are refused.

    pad_to_multiple_of: pad T up to a multiple (steadier shapes for torch.compile / CUDA graphs);
        the padding is one extra segment of its own with labels -100, as in PackedBatch.
    With the Trainer, keep `remove_unused_columns=False` when samples carry an assistant mask:
    the Trainer otherwise drops every column the model's forward does not name.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 ignore_index: int = IGNORE_INDEX):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.ignore_index = ignore_index

    def _labels(self, feature: Mapping[str, Any], ids: list[int], index: int) -> list[int]:
        if feature.get("labels") is not None:
            labels = _as_list(feature["labels"], "labels", index)
        else:
            mask_key = next((key for key in MASK_KEYS if feature.get(key) is not None), None)
            if mask_key is None:
                labels = list(ids)
            else:
                mask = _as_list(feature[mask_key], mask_key, index)
                if len(mask) != len(ids):
                    raise ValueError(f"feature {index}: `{mask_key}` has {len(mask)} entries but "
                                     f"`input_ids` has {len(ids)}; they must align token for token")
                labels = [tok if keep else self.ignore_index for tok, keep in zip(ids, mask)]
        if len(labels) != len(ids):
            raise ValueError(f"feature {index}: `labels` has {len(labels)} entries but `input_ids` "
                             f"has {len(ids)}; labels are unshifted and align with input_ids")
        return labels

    @staticmethod
    def _document_lengths(feature: Mapping[str, Any], n_tokens: int, index: int) -> list[int]:
        # TRL's pack_dataset (padding_free) puts several documents in one example and records
        # their lengths in `seq_lengths`; without it the example is one document.
        if feature.get("seq_lengths") is None:
            return [n_tokens]
        lengths = _as_list(feature["seq_lengths"], "seq_lengths", index)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"feature {index}: `seq_lengths` must be positive ints (one per "
                             f"packed document), got {lengths}")
        if sum(lengths) != n_tokens:
            raise ValueError(f"feature {index}: `seq_lengths` {lengths} sum to {sum(lengths)} but "
                             f"`input_ids` has {n_tokens} tokens; they must cover the example "
                             "exactly (as TRL's pack_dataset writes them)")
        return lengths

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("PaddingFreeCollator got an empty list of features")
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        cu_seqlens = [0]
        for index, feature in enumerate(features):
            if "input_ids" not in feature:
                raise KeyError(f"feature {index} has no `input_ids` (keys: {sorted(feature)}); "
                               "tokenize the "
                               "samples first (with the Trainer, also check remove_unused_columns)")
            ids = _as_list(feature["input_ids"], "input_ids", index)
            if not ids:
                raise ValueError(f"feature {index} has empty `input_ids`; filter empty samples out "
                                 "of the dataset")
            lengths = self._document_lengths(feature, len(ids), index)
            sample_labels = self._labels(feature, ids, index)
            start = 0
            for n in lengths:
                # No prediction crosses a document boundary: each document's first label is ignored.
                sample_labels[start] = self.ignore_index
                position_ids += range(n)
                cu_seqlens.append(cu_seqlens[-1] + n)
                start += n
            input_ids += ids
            labels += sample_labels
        if self.pad_to_multiple_of:
            pad = -len(input_ids) % self.pad_to_multiple_of
            if pad:
                input_ids += [self.pad_token_id] * pad
                labels += [self.ignore_index] * pad
                position_ids += range(pad)
                cu_seqlens.append(cu_seqlens[-1] + pad)
        max_length = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
        cu = torch.tensor(cu_seqlens, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max_length, "max_length_k": max_length,
        }


def packed_batches_for_hf(loader: Iterable[PackedBatch], device: torch.device | str
                          | None = None) -> Iterator[dict]:
    """The batches of a PackedLoader (or any iterable of PackedBatch) as transformers model kwargs.

    Each PackedBatch becomes one flattened padding-free row (`PackedBatch.as_hf_kwargs`): pass it as
    `model(**kwargs)` to a model patched with `apply_rega_kernels`. The rows' trailing padding is a
    segment of its own with labels -100, so it neither attends to documents nor adds to the loss.
    """
    for batch in loader:
        if not isinstance(batch, PackedBatch):
            raise TypeError("packed_batches_for_hf expects PackedBatch items (from PackedLoader), "
                            f"got {type(batch).__name__}")
        if device is not None:
            batch = batch.to(device)
        yield batch.as_hf_kwargs()


class PackedHFDataset(torch.utils.data.IterableDataset):
    """A PackedLoader as a Trainer train_dataset: each item is already a whole padding-free batch.

    Use it with `data_collator=PackedHFDataset.collate`, `per_device_train_batch_size=1` (the
    loader decides the batch), `max_steps` (an iterable dataset has no length) and
    `accelerator_config={"dispatch_batches": False}`: accelerate otherwise reads iterable datasets
    on the main process and slices every tensor of a batch, `cu_seq_lens_q` included, to the batch
    size; the loader shards by rank itself.
    """

    def __init__(self, loader: Iterable[PackedBatch]):
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        return packed_batches_for_hf(self.loader)

    @staticmethod
    def collate(items: Sequence[dict]) -> dict:
        if len(items) != 1:
            raise ValueError("PackedHFDataset items are whole batches, but the DataLoader grouped "
                             f"{len(items)} of them: set per_device_train_batch_size=1")
        return items[0]
