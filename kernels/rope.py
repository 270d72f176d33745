"""Rotary position embedding of q and k on packed rows: a Triton kernel as `torch.library` custom
ops, plus the PyTorch reference.

Layout is the model's (rega_engine/model/llama.py `apply_rope`): q (T, Hq, D) and k (T, Hk, D)
over the flattened tokens of a packed batch, `position_ids` (T,) restarting at 0 per document,
and the half-split convention of Hugging Face Llama checkpoints: dimension i pairs with
i + D/2, and with angle = position * inv_freq[i] (fp32),

    out[i]       = x[i] * cos(angle) - x[i + D/2] * sin(angle)
    out[i + D/2] = x[i + D/2] * cos(angle) + x[i] * sin(angle)

in fp32, cast back to x's dtype. The kernel computes cos/sin from position_ids and inv_freq on the
fly, once per token for all its heads: positions restart per document, so there is no table to
index by a global offset and nothing to rebuild when the sequence length changes. All rope
variants live in `inv_freq` (D/2,), computed once on the host: plain rope with its theta (Llama 2,
Qwen2's theta = 1e6), Llama 3.1 long-context scaling (rega_engine.model.llama.rope_inv_freq).

The backward of a rotation is the rotation by -angle, so the op's backward is the op itself with
`inverse=True`: nothing is saved but position_ids and inv_freq, and double backward works.

In place or functional. torch.library cannot attach autograd to an op that mutates its inputs
(register_autograd refuses non-functional schemas), and Dynamo/AOTAutograd functionalise a
mutation anyway. So there are two ops:

- `rega::rotary_embedding` (functional, returns new q and k, with autograd): the training path.
  It costs one read and one write of q and k, the same memory traffic as in place; the pre-rope
  q and k (projection outputs) die right after, so the only extra is a transient allocation.
- `rega::rotary_embedding_` (mutates q and k, returns nothing, no autograd): the same kernel
  writing over its input (each element is read and written by the same thread), for inference
  and generation where no gradient is wanted. `rotary_embedding(..., inplace=True)` uses it and
  refuses tensors that need a gradient.
"""
import math

import torch
from torch import Tensor

from ._triton_compat import (
    device_guard,
    is_interpreted,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
    unit_stride,
)

# Elements of one half-head tile per loop step (BLOCK_H heads x BLOCK_HALF dims): 8 per thread
# at 4 warps, so each thread moves 16 bytes per half in bf16.
TILE_ELEMENTS = 1024
NUM_WARPS = 4
# ptxas spills of the compiled kernel that are understood and accepted (none); see
# rega_engine.kernels.compile_check and tests/test_small_kernels_compile.py.
KNOWN_SPILLS: dict = {}


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(X, OUT, token, stride_xt, stride_xh, stride_ot, stride_oh, n_heads, cos, sin,
                  offs_d, d_mask, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    x_base = X + token * stride_xt
    o_base = OUT + token * stride_ot
    for h_start in range(0, n_heads, BLOCK_H):
        offs_h = h_start + tl.arange(0, BLOCK_H)
        mask = (offs_h < n_heads)[:, None] & d_mask[None, :]
        x_ptrs = x_base + offs_h[:, None] * stride_xh + offs_d[None, :]
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        o_ptrs = o_base + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, Q_OUT, K_OUT, POS, INV_FREQ, n_q_heads, n_k_heads,
                 stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_qot, stride_qoh, stride_kot, stride_koh,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 INVERSE: tl.constexpr):
    """One program per token: cos/sin of its position once, then every head of q and of k.

    q and k go through tiles of one shape (BLOCK_H heads), so cos and sin live in one register
    layout for both loops; separate q and k tile heights kept two copies alive and made sm_90
    spill."""
    token = tl.program_id(0).to(tl.int64)  # token * stride passes 2**31 on long packed batches
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    # the same fp32 product as eager's position_ids.float() * inv_freq
    angle = tl.load(POS + token).to(tl.float32) * tl.load(INV_FREQ + offs_d, mask=d_mask,
                                                          other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, Q_OUT, token, stride_qt, stride_qh, stride_qot, stride_qoh, n_q_heads,
                  cos, sin, offs_d, d_mask, HALF, BLOCK_H)
    _rotate_heads(K, K_OUT, token, stride_kt, stride_kh, stride_kot, stride_koh, n_k_heads,
                  cos, sin, offs_d, d_mask, HALF, BLOCK_H)


INTERPRETED = is_interpreted(_rope_kernel)


# --------------------------------------------------------------------------------------------
# Host side of the Triton path
# --------------------------------------------------------------------------------------------

def kernel_config(head_dim: int, n_q_heads: int, n_k_heads: int) -> dict:
    """The constexprs a launch uses: the half head dim padded to a power of two, and as many
    heads per loop step as fit TILE_ELEMENTS (fewer when the model has fewer heads; k's last
    tile may run partly masked)."""
    block_half = next_power_of_2(head_dim // 2)
    heads = max(1, TILE_ELEMENTS // block_half)
    return dict(HALF=head_dim // 2, BLOCK_HALF=block_half,
                BLOCK_H=min(heads, next_power_of_2(max(n_q_heads, n_k_heads))))


def _launch(q, k, q_out, k_out, position_ids, inv_freq, inverse):
    tokens, n_q_heads, head_dim = q.shape
    if tokens == 0:
        return
    with device_guard(q):
        _rope_kernel[(tokens,)](
            q, k, q_out, k_out, position_ids, inv_freq, n_q_heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            INVERSE=inverse, **kernel_config(head_dim, n_q_heads, k.shape[1]),
            num_warps=NUM_WARPS)


# --------------------------------------------------------------------------------------------
# The same computation in PyTorch (the ops' "torch" backend)
# --------------------------------------------------------------------------------------------

def _cos_sin(position_ids, inv_freq, inverse):
    angles = position_ids.float()[:, None] * inv_freq.float()[None, :]
    sin = angles.sin()
    return angles.cos(), (-sin if inverse else sin)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Custom ops: fake implementations and autograd
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("rega::rotary_embedding", mutates_args=())
def _rotary_embedding_op(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor,
                         inverse: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(rotated q, rotated k); `inverse` rotates by -angle (the backward)."""
    if backend == "triton":
        q, k = unit_stride(q), unit_stride(k)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        _launch(q, k, q_out, k_out, position_ids, inv_freq, inverse)
        return q_out, k_out
    cos, sin = _cos_sin(position_ids, inv_freq, inverse)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@_rotary_embedding_op.register_fake
def _(q, k, position_ids, inv_freq, inverse, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_rotary(ctx, inputs, output):
    _q, _k, position_ids, inv_freq, inverse, backend = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.inverse, ctx.backend = inverse, backend


def _backward_rotary(ctx, dq_out, dk_out):
    position_ids, inv_freq = ctx.saved_tensors
    dq, dk = _rotary_embedding_op(dq_out, dk_out, position_ids, inv_freq, not ctx.inverse,
                                  ctx.backend)
    return dq, dk, None, None, None, None


_rotary_embedding_op.register_autograd(_backward_rotary, setup_context=_setup_rotary)


@torch.library.custom_op("rega::rotary_embedding_", mutates_args=("q", "k"))
def _rotary_embedding_inplace_op(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor,
                                 backend: str) -> None:
    """Rotates q and k in place (no autograd: see the module docstring)."""
    if backend == "triton" and q.stride(-1) == 1 and k.stride(-1) == 1:
        _launch(q, k, q, k, position_ids, inv_freq, False)
        return
    cos, sin = _cos_sin(position_ids, inv_freq, False)
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))


@_rotary_embedding_inplace_op.register_fake
def _(q, k, position_ids, inv_freq, backend):
    return None


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _check_arguments(q, k, position_ids, inv_freq, who):
    for name, t in (("q", q), ("k", k), ("position_ids", position_ids), ("inv_freq", inv_freq)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{who}: {name} must be (tokens, heads, head_dim), got shape "
                             f"{tuple(t.shape)}; flatten (batch, seq) into one token axis first")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{who}: {name} has dtype {t.dtype}; use bfloat16, float16 or "
                             "float32")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         "tokens (dim 0) and head_dim (dim 2)")
    head_dim = q.shape[2]
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"{who}: head_dim must be even and > 0 (dimension i pairs with "
                         f"i + head_dim/2), got {head_dim}")
    if position_ids.numel() != q.shape[0] or position_ids.dtype not in (torch.int64,
                                                                         torch.int32):
        raise ValueError(f"{who}: position_ids must hold one int64/int32 position per token "
                         f"({q.shape[0]}), got shape {tuple(position_ids.shape)} dtype "
                         f"{position_ids.dtype}")
    if inv_freq.shape != (head_dim // 2,) or not inv_freq.dtype.is_floating_point:
        raise ValueError(f"{who}: inv_freq must be a float (head_dim / 2,) = ({head_dim // 2},) "
                         f"tensor, got shape {tuple(inv_freq.shape)} dtype {inv_freq.dtype}; "
                         "see rega_engine.model.llama.rope_inv_freq")
    devices = {q.device, k.device, position_ids.device, inv_freq.device}
    if len(devices) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")


def rotary_embedding(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, *,
                     inplace: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rotary embedding of q (T, Hq, D) and k (T, Hk, D) at `position_ids` (T,) (any shape with T
    elements, int64 or int32; positions restart per document in packed rows), with
    `inv_freq` (D/2,) fp32 from rega_engine.model.llama.rope_inv_freq (plain, Qwen2 theta or
    Llama 3 scaling). Same result as the model's `apply_rope(x, *rope_cos_sin(...))`: the
    half-split convention, fp32 math, cast back to each input's dtype.

    Returns (q_rotated, k_rotated), new tensors. With inplace=True q and k are rotated in place
    and returned; that path has no autograd, so it refuses tensors that need a gradient (use it
    for inference). backend: "auto" runs Triton on CUDA tensors and PyTorch elsewhere; "triton"
    forces the kernel (CPU tensors need TRITON_INTERPRET=1); "torch" forces PyTorch.
    """
    who = "rotary_embedding"
    _check_arguments(q, k, position_ids, inv_freq, who)
    backend = resolve_backend(backend, q, who, INTERPRETED)
    position_ids = position_ids.reshape(-1).contiguous()
    inv_freq = inv_freq.to(torch.float32).contiguous()
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError(f"{who}: inplace=True has no autograd (an op that mutates its "
                             "inputs cannot carry a backward in torch.library); call it under "
                             "torch.no_grad() or use inplace=False for training")
        _rotary_embedding_inplace_op(q, k, position_ids, inv_freq, backend)
        return q, k
    return _rotary_embedding_op(q, k, position_ids, inv_freq, False, backend)


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------

def rotary_embedding_reference(q: Tensor, k: Tensor, position_ids: Tensor,
                               inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """Plain differentiable PyTorch with the semantics of `rotary_embedding` (the model's
    rope_cos_sin + apply_rope with the given inv_freq)."""
    _check_arguments(q, k, position_ids, inv_freq, "rotary_embedding_reference")
    cos, sin = _cos_sin(position_ids.reshape(-1), inv_freq, False)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_inv_freq_default(head_dim: int, theta: float = 10000.0,
                          device: torch.device | None = None) -> Tensor:
    """Plain rope's inverse frequencies theta ** (-2i / D), (D/2,) fp32, computed as the model's
    rope_inv_freq does for rope_type "default" (a convenience for users of this module alone)."""
    if head_dim <= 0 or head_dim % 2 or not (math.isfinite(theta) and theta > 1):
        raise ValueError(f"rope_inv_freq_default: need an even head_dim > 0 and theta > 1, got "
                         f"head_dim={head_dim}, theta={theta}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents)
