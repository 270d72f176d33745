"""The per-module patches behind `apply_rega_kernels(rms_norm=, rope=, swiglu=)` and the effective
LM-head weight the fused loss reads (also under PEFT adapters).

Every patch replaces the `forward` of one module *instance* (never a transformers class or
function, so unpatched models in the same process are untouched) and calls the same submodules
HF's forward calls (`q_proj`, `gate_proj`, ...), so PEFT adapters wrapped around those
submodules, before or after patching, keep working:

* RMSNorm: each `*RMSNorm` module (input_layernorm, post_attention_layernorm, the final norm)
  becomes `rms_norm(x, weight, eps)`. Plain, not the fused-residual variant: in HF's decoder
  layer the residual add happens outside the norm module, so fusing it means replacing the
  decoder layer's forward (and, across layers, the model's), i.e. copying HF's per-version layer
  code (cache keyword renames, output capturing, gradient checkpointing) to save one elementwise
  add per norm. Our own model (rega_engine.model) fuses it, where we own the layer code.
* RoPE: each attention module's forward becomes HF's (projections, attention interface,
  o_proj) with `rotary_embedding(q, k, position_ids, inv_freq)` in place of
  `apply_rotary_pos_emb(q, k, cos, sin)`. The position_ids are the ones HF passes down to every
  attention layer (restarting per document in padding-free rows, so rope restarts with them);
  inv_freq is the model's `rotary_emb.inv_freq`, in which HF has already folded the rope type
  (Llama 3 scaling, Qwen2's theta), copied once into a non-persistent buffer of each attention
  module. Rope types whose inv_freq changes at run time (dynamic, longrope) or that scale
  cos/sin (yarn: attention_scaling != 1) are refused. With a KV cache (generation) the original
  forward runs, so the cache API of each transformers release stays HF's business.
* SwiGLU: each MLP's forward becomes `down_proj(swiglu(gate_proj(x), up_proj(x)))`; an MLP
  whose act_fn is not SiLU is refused.
"""
from __future__ import annotations

import sys
import types

import torch

# Rope types with a fixed inv_freq and unscaled cos/sin (HF's attention_scaling == 1).
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def _name_of(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or type(module).__name__
    return type(module).__name__


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------

def _rms_norm_forward(self, hidden_states):
    from rega_engine.kernels.rms_norm import rms_norm
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self._rega_backend)


def rms_norm_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """Every RMSNorm module of the model (by class name), checked to be HF's plain RMSNorm."""
    found = []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(module,
            "variance_epsilon"):
            raise TypeError(f"apply_rega_kernels(rms_norm=True): {name} ({type(module).__name__}) "
                            "is not the plain RMSNorm (a 1-D `weight` and `variance_epsilon`) "
                            "that the fused kernel replaces; pass rms_norm=False")
        found.append((name, module))
    if not found:
        raise TypeError(f"apply_rega_kernels(rms_norm=True): {type(model).__name__} has no "
                        "*RMSNorm module; pass rms_norm=False")
    return found


def plan_rms_norms(model):
    """Checks the model; returns the function that patches it (backend) -> None."""
    norms = rms_norm_modules(model)

    def patch(backend: str) -> None:
        for _, module in norms:
            module._rega_backend = backend
            module.forward = types.MethodType(_rms_norm_forward, module)
    return patch


# --------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------

def _attention_modules(model):
    return [(name, module) for name, module in model.named_modules()
            if all(hasattr(module, attr) for attr in ("q_proj", "k_proj", "v_proj", "o_proj"))]


def _rope_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                            *args, **kwargs):
    position_ids = kwargs.get("position_ids")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None or position_ids is None or args:
        # Generation (the cache's update API differs between transformers releases) or a caller
        # that does not pass position_ids: HF's own forward, with HF's rope.
        return self._rega_original_forward(hidden_states, position_embeddings, attention_mask,
                                           *args, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rega_engine.kernels.rope import rotary_embedding

    kwargs = {key: value for key, value in kwargs.items() if key not in ("cache",
                                                                         "past_key_values")}
    input_shape = hidden_states.shape[:-1]
    batch, length = input_shape
    tokens = batch * length
    q = self.q_proj(hidden_states).reshape(tokens, -1, self.head_dim)
    k = self.k_proj(hidden_states).reshape(tokens, -1, self.head_dim)
    v = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
    positions = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch, length).reshape(-1)
    q, k = rotary_embedding(q, k, positions, self._rega_inv_freq, backend=self._rega_backend)
    q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)
    k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)

    implementation = self.config._attn_implementation
    if implementation == "eager" or implementation is None:
        attention = sys.modules[type(self).__module__].eager_attention_forward
    else:
        attention = ALL_ATTENTION_FUNCTIONS[implementation]
    # Qwen2 keeps the window per layer (None on full-attention layers), Mistral in its config.
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, sliding_window=sliding_window, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def check_rope(model) -> torch.Tensor:
    """The inv_freq of the model's rotary embedding, refusing what the kernel cannot do exactly."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    where = f"{type(model).__name__}.model.rotary_emb"
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise TypeError(f"apply_rega_kernels(rope=True): {type(model).__name__} has no "
                        "`model.rotary_emb` with an "
                        "`inv_freq` buffer (HF's rotary embedding module); pass rope=False")
    rope_type = getattr(rotary, "rope_type", "default")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if rope_type not in STATIC_ROPE_TYPES or scaling != 1.0:
        raise ValueError(f"apply_rega_kernels(rope=True): {where} has rope_type={rope_type!r} "
                         f"(attention_scaling={scaling}); the rotary kernel covers "
                         f"{', '.join(STATIC_ROPE_TYPES)} "
                         "(a fixed inv_freq, unscaled cos/sin). Pass rope=False for this model")
    return rotary.inv_freq.detach().float().clone()


def plan_rope(model):
    """Checks the model; returns the function that patches it (backend) -> None."""
    inv_freq = check_rope(model)
    attention = _attention_modules(model)
    if not attention:
        raise TypeError(f"apply_rega_kernels(rope=True): {type(model).__name__} has no attention "
                        "module with q_proj/k_proj/v_proj/o_proj; pass rope=False")
    for name, module in attention:
        if inv_freq.numel() * 2 != getattr(module, "head_dim", -1):
            raise ValueError(f"apply_rega_kernels(rope=True): {name} has "
                             f"head_dim={getattr(module, 'head_dim', None)} but the rotary "
                             f"embedding rotates {inv_freq.numel() * 2} dimensions (partial "
                             "rotary); pass rope=False")

    def patch(backend: str) -> None:
        for _, module in attention:
            module._rega_backend = backend
            if "_rega_original_forward" not in module.__dict__:
                module._rega_original_forward = module.forward
                module.register_buffer("_rega_inv_freq", inv_freq.clone(), persistent=False)
                module.forward = types.MethodType(_rope_attention_forward, module)
    return patch


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------

def _swiglu_forward(self, x):
    from rega_engine.kernels.swiglu import swiglu
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype:
        up = up.to(gate.dtype)
    return self.down_proj(swiglu(gate, up, backend=self._rega_backend))


def plan_swiglu(model):
    """Checks the model; returns the function that patches it (backend) -> None."""
    mlps = [(name, module) for name, module in model.named_modules()
            if all(hasattr(module, attr) for attr in ("gate_proj", "up_proj", "down_proj"))]
    if not mlps:
        raise TypeError(f"apply_rega_kernels(swiglu=True): {type(model).__name__} has no MLP with "
                        "gate_proj/up_proj/down_proj; pass swiglu=False")
    for name, module in mlps:
        act = getattr(module, "act_fn", None)
        # ACT2FN maps "silu" to transformers' SiLUActivation and "swish" to nn.SiLU.
        if not (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"):
            hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
            raise ValueError(f"apply_rega_kernels(swiglu=True): {name} has act_fn "
                             f"{type(act).__name__} (config.hidden_act={hidden_act!r}); the SwiGLU "
                             "kernel computes silu(gate) * up. Pass swiglu=False for this model")

    def patch(backend: str) -> None:
        for _, module in mlps:
            module._rega_backend = backend
            module.forward = types.MethodType(_swiglu_forward, module)
    return patch


# --------------------------------------------------------------------------------------------
# The LM head's effective weight (plain, PEFT LoRA, PEFT modules_to_save)
# --------------------------------------------------------------------------------------------

def effective_linear_weight(module: torch.nn.Module, name: str = "lm_head",
                            training: bool = True, check_only: bool = False) -> torch.Tensor:
    """The weight W such that module(x) == x @ W.T, with autograd reaching every trainable tensor.

    A PEFT LoRA layer gives W + sum over active adapters of scaling * B @ A (so the adapters get
    their gradients through the fused loss); a `modules_to_save` wrapper the active copy. What
    has no exact single-matrix form is refused with the module's name: LoRA dropout in training,
    DoRA and other LoRA variants, a LoRA bias, fan_in_fan_out, other PEFT tuner layers, quantized
    base weights. check_only: make every check but return the base weight without adding the
    adapters (apply_rega_kernels on a sharded model, whose parameters are shards until the forward).
    """
    kind = type(module).__name__
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        # peft.utils.other.ModulesToSaveWrapper: its forward picks one of these.
        active = list(module.active_adapters)
        if module.disable_adapters or not active or any(a not in module.modules_to_save
                                                        for a in active):
            return effective_linear_weight(module.original_module, name, training, check_only)
        return effective_linear_weight(module.modules_to_save[active[0]], name, training,
                                        check_only)
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        base = effective_linear_weight(module.base_layer, name, training, check_only)
        if module.disable_adapters or module.merged:
            return base
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{name} ({kind}) is a LoRA layer with fan_in_fan_out=True, which the "
                             "fused cross-entropy does not handle; pass cross_entropy=False")
        weight = base
        for adapter in module.active_adapters:
            if adapter not in module.lora_A.keys():
                continue
            where = f"{name} (LoRA adapter {adapter!r})"
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora",
                                                                         {}).get(adapter, False):
                raise ValueError(f"{where} uses a LoRA variant (e.g. DoRA) that has no exact "
                                 "effective weight for the fused cross-entropy; leave the LM head "
                                 "out of target_modules or pass cross_entropy=False")
            dropout = module.lora_dropout[adapter]
            if training and not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p",
                                                                                   0.0) > 0:
                raise ValueError(f"{where} has lora_dropout={dropout.p}, which in training drops a "
                                 "different part of every token's input, so no single weight "
                                 "gives the same loss; use lora_dropout=0 for the LM head, leave "
                                 "it out of target_modules, or pass cross_entropy=False")
            lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
            if getattr(lora_B, "bias", None) is not None or not isinstance(lora_A, torch.nn.Linear):
                raise ValueError(f"{where} has a LoRA bias or a non-linear lora_A; the fused "
                                 "cross-entropy takes a weight only; pass cross_entropy=False")
            if check_only:
                continue
            delta = (lora_B.weight @ lora_A.weight) * module.scaling[adapter]
            weight = weight + delta.to(weight.dtype)
        return weight
    if type(module).__module__.startswith("peft."):
        raise TypeError(f"{name} is a PEFT {kind} layer, whose effective weight the fused "
                        "cross-entropy cannot form; pass cross_entropy=False")
    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} is a {kind}, not a torch.nn.Linear; the fused cross-entropy needs "
                        "the LM head's weight matrix; pass cross_entropy=False")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} holds a quantized {weight.dtype} weight; the fused cross-entropy "
                        "needs a float weight; pass cross_entropy=False")
    if module.bias is not None:
        raise TypeError(f"{name} has a bias, which the fused linear cross-entropy does not take; "
                        "pass cross_entropy=False")
    return weight
