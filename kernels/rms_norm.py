"""RMSNorm, optionally fused with the residual add before it: Triton forward and backward as
`torch.library` custom ops, plus the PyTorch reference.

Semantics are the model's RMSNorm (rega_engine/model/llama.py), which is transformers' order of
operations: statistics in fp32, the normalised row cast back to the input dtype, then the gain:

    r = x                      (or r = x + residual, rounded to x's dtype: the new residual)
    y = weight * (r.float() * rsqrt(mean(r.float() ** 2) + eps)).to(r.dtype)

`y` has dtype promote(x.dtype, weight.dtype), as `weight * tensor` has in eager PyTorch.

Forward: one program per row, the whole row in registers (BLOCK = next power of two of H), one
read of x (and residual) and one write of y (and the new residual); the row's 1/rms (fp32) is
kept for the backward, so the backward reads each row once and never recomputes the statistics.

Backward: each program walks a contiguous block of rows, accumulating its share of dweight in
fp32 registers, and writes one partial sum into a (programs, H) fp32 buffer that a torch `.sum(0)`
reduces: no atomics, so no contention on the H gain entries and a deterministic result. About two
programs per SM keep the partial buffer small (a few MiB at H = 8192).

With the residual variant the gradient of x and of residual is the same tensor (d new_residual
plus the normalisation's gradient), as for eager's `x + residual`.

The ops (`rega::rms_norm`, `rega::rms_norm_residual`, `rega::rms_norm_backward`) take the backend
as an argument: "triton" launches the kernels (CUDA, or CPU under TRITON_INTERPRET=1), "torch"
computes the same formulas with PyTorch ops. Both save only (r, weight, 1/rms) for backward.
torch.compile sees each op as one opaque node with a fake implementation, so it traces through
without a graph break.
"""
import functools
import math
import numbers

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

# Widest row the kernels hold in registers (Llama 3 405B has H = 16384).
MAX_TRITON_COLS = 16384
# ptxas spills of the compiled kernels that are understood and accepted, keyed as
# rega_engine.kernels.compile_check.spill_key (tests/test_small_kernels_compile.py fails on any
# other spill and on entries that no longer spill).
_WIDEST_BWD_SPILL = (
    "H > 8192 (Llama 3 405B): 1024 threads hold 16 fp32 values a thread of each live row "
    "(dy, r, the dweight accumulator) against the 64-register cap of a 1024-thread block, even "
    "with the gain reloaded per row (RELOAD_W); sm_90's ptxas fits it, sm_80's spills ~60 B a "
    "thread to L1-cached local memory, a small cost next to the row's DRAM traffic. A column-"
    "split backward would avoid it at the price of reading each row twice.")
KNOWN_SPILLS: dict = {
    ("_rms_norm_bwd_kernel", "sm_80",
     f"BLOCK=16384,HAS_DRES={has_dres},RELOAD_W=True,num_warps=32,num_stages=3"):
        _WIDEST_BWD_SPILL
    for has_dres in (False, True)
}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(X, RES, W, Y, RES_OUT, RSTD,
                         stride_x, stride_res, stride_y, stride_res_out, n_cols, eps,
                         BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 on long packed batches
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0)
        # rounded to the input dtype before the statistics, as eager's `x + residual` is
        x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES_OUT + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, R, W, RSTD, DRES, DX, DW_PARTIAL,
                         stride_dy, stride_r, stride_dres, stride_dx,
                         n_rows, n_cols, rows_per_program,
                         BLOCK: tl.constexpr, HAS_DRES: tl.constexpr, RELOAD_W: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if not RELOAD_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # 64-bit loop variable: row * stride
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        normed = r * rstd
        # the gain multiplied the normalised row after its rounding to the input dtype
        dw += dy * normed.to(R.dtype.element_ty).to(tl.float32)
        if RELOAD_W:  # an L1/L2 hit per row instead of BLOCK / threads more live registers
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dn = dy * w
        dr = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
        if HAS_DRES:
            dr += tl.load(DRES + row64 * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dr.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


INTERPRETED = is_interpreted(_rms_norm_fwd_kernel)

# Backward programs per SM on a GPU, and programs in the interpreter (a small odd count, so that
# tests meet blocks of several rows and a short last block).
BWD_PROGRAMS_PER_SM = 2
INTERPRETER_BWD_PROGRAMS = 3


# --------------------------------------------------------------------------------------------
# Host side of the Triton path
# --------------------------------------------------------------------------------------------

def row_kernel_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the forward for rows of n_cols: the whole row in one block, 8 to 16
    elements a thread (16- or 32-byte loads in bf16) once the row is wide enough to feed 8 or 16
    warps; it holds one row (x, then the gain) at a time, 24 to 82 registers."""
    block = next_power_of_2(n_cols)
    if block <= 1024:
        return block, 4
    if block <= 4096:
        return block, 8
    return block, 16


def bwd_kernel_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the backward: it keeps four rows' worth of fp32 values live (dy,
    r, the gain, the dweight accumulator), so 8 elements a thread (BLOCK / 256 warps, up to 32):
    16 a thread took 128 to 186 registers at H = 4096 and 8192. At BLOCK = 16384 even 32 warps
    (the most a block has) leave 16 a thread against a 64-register cap: see KNOWN_SPILLS."""
    block = next_power_of_2(n_cols)
    return block, min(32, max(4, block // 256))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        programs = BWD_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                                   else torch.cuda.current_device())
    else:
        programs = INTERPRETER_BWD_PROGRAMS
    return max(1, min(n_rows, programs))


def _forward_triton(x, residual, weight, eps):
    n_rows, n_cols = x.shape
    x = unit_stride(x)
    weight = weight.contiguous()
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype),
                    device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    res_out = None
    if residual is not None:
        residual = unit_stride(residual)
        res_out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows:
        block, num_warps = row_kernel_config(n_cols)
        res_in = residual if residual is not None else x
        res_dst = res_out if res_out is not None else x  # never written without HAS_RESIDUAL
        with device_guard(x):
            _rms_norm_fwd_kernel[(n_rows,)](
                x, res_in, weight, y, res_dst, rstd,
                x.stride(0), res_in.stride(0), y.stride(0), res_dst.stride(0), n_cols, float(eps),
                BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps)
    return y, res_out, rstd


def _backward_triton(dy, dres, r, weight, rstd):
    n_rows, n_cols = r.shape
    dy, r, weight = unit_stride(dy), unit_stride(r), weight.contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=r.dtype, device=r.device)
    if not n_rows:
        return dx, torch.zeros_like(weight)
    if dres is not None:
        dres = unit_stride(dres)
    programs = _backward_programs(n_rows, r.device)
    rows_per_program = -(-n_rows // programs)
    programs = -(-n_rows // rows_per_program)  # no program without rows
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=r.device)
    block, num_warps = bwd_kernel_config(n_cols)
    dres_in = dres if dres is not None else dy
    with device_guard(r):
        _rms_norm_bwd_kernel[(programs,)](
            dy, r, weight, rstd, dres_in, dx, partial,
            dy.stride(0), r.stride(0), dres_in.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program,
            BLOCK=block, HAS_DRES=dres is not None, RELOAD_W=block > 8192,
            num_warps=num_warps)
    return dx, partial.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# The same computations in PyTorch (the ops' "torch" backend)
# --------------------------------------------------------------------------------------------

def _forward_torch(x, residual, weight, eps):
    r = x + residual if residual is not None else x
    rf = r.float()
    rstd = torch.rsqrt(rf.pow(2).mean(-1) + eps)
    y = weight * (rf * rstd[:, None]).to(r.dtype)
    # contiguous like the kernel's outputs (and the fakes), whatever the inputs' strides
    return y.contiguous(), (r.contiguous() if residual is not None else None), rstd


def _backward_torch(dy, dres, r, weight, rstd):
    rf, dyf = r.float(), dy.float()
    normed = rf * rstd[:, None]
    dw = (dyf * normed.to(r.dtype).float()).sum(0)
    dn = dyf * weight.float()
    dr = rstd[:, None] * (dn - normed * (dn * normed).mean(-1, keepdim=True))
    if dres is not None:
        dr = dr + dres.float()
    return dr.to(r.dtype).contiguous(), dw.to(weight.dtype)


def _forward(x, residual, weight, eps, backend):
    if backend == "triton":
        return _forward_triton(x, residual, weight, eps)
    return _forward_torch(x, residual, weight, eps)


# --------------------------------------------------------------------------------------------
# Custom ops: fake implementations and autograd
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("rega::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """(y, rstd) of x (N, H); rstd (N,) fp32 is kept for the backward."""
    y, _, rstd = _forward(x, None, weight, eps, backend)
    return y, rstd


@torch.library.custom_op("rega::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, new_residual = x + residual, rstd) of x, residual (N, H)."""
    return _forward(x, residual, weight, eps, backend)


@torch.library.custom_op("rega::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, dresidual: Tensor | None, r: Tensor, weight: Tensor,
                          rstd: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(d r, d weight) from dy, the saved normalised input r and its rstd; `dresidual`, the
    gradient reaching the new residual, is added to d r (the residual variant)."""
    if backend == "triton":
        return _backward_triton(dy, dresidual, r, weight, rstd)
    return _backward_torch(dy, dresidual, r, weight, rstd)


def _fake_outputs(x, weight):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape[:1], dtype=torch.float32))


@_rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return _fake_outputs(x, weight)


@_rms_norm_residual_op.register_fake
def _(x, residual, weight, eps, backend):
    y, rstd = _fake_outputs(x, weight)
    return y, x.new_empty(x.shape), rstd


@_rms_norm_backward_op.register_fake
def _(dy, dresidual, r, weight, rstd, backend):
    return r.new_empty(r.shape), weight.new_empty(weight.shape)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _eps, backend = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend


def _backward_rms_norm(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, None, x, weight, rstd, ctx.backend)
    return dx, dw, None, None


def _setup_rms_norm_residual(ctx, inputs, output):
    _x, _residual, weight, _eps, backend = inputs
    _y, new_residual, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(new_residual, weight, rstd)
    ctx.backend = backend


def _backward_rms_norm_residual(ctx, dy, dnew_residual, _drstd):
    r, weight, rstd = ctx.saved_tensors
    dr, dw = _rms_norm_backward_op(dy, dnew_residual, r, weight, rstd, ctx.backend)
    return dr, dr, dw, None, None


_rms_norm_op.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)
_rms_norm_residual_op.register_autograd(_backward_rms_norm_residual,
                                        setup_context=_setup_rms_norm_residual)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _check_arguments(x, weight, eps, residual, who):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{who}: x must be (..., H) with H > 0, got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{who}: weight must be (H,) = ({x.shape[-1]},) to match x's last "
                         f"dimension, got shape {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{who}: {name} has dtype {t.dtype}; use bfloat16, float16 or "
                             "float32")
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != x.shape \
                or residual.dtype != x.dtype:
            got = (f"{tuple(residual.shape)} {residual.dtype}" if isinstance(residual, Tensor)
                   else type(residual).__name__)
            raise ValueError(f"{who}: residual must match x ({tuple(x.shape)} {x.dtype}), got "
                             f"{got}")
    devices = {x.device, weight.device} | ({residual.device} if residual is not None else set())
    if len(devices) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
            math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{who}: eps must be a finite number >= 0, got {eps!r}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, *,
             backend: str = "auto"):
    """RMSNorm of x (..., H) with gain weight (H,), as the model's RMSNorm computes it.

    Without `residual`: returns y = weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype), the
    statistics in fp32. With `residual` (same shape and dtype as x): returns (y, new_residual)
    where new_residual = x + residual (in x's dtype) and y is the RMSNorm of new_residual, which
    fuses a decoder block's `h = h + sublayer(h); norm(h)` into one pass. y has dtype
    promote(x.dtype, weight.dtype).

    backend: "auto" runs Triton on CUDA tensors and PyTorch elsewhere; "triton" forces the kernel
    (CPU tensors need TRITON_INTERPRET=1); "torch" forces the PyTorch formulas. Differentiable in
    x, residual and weight; torch.compile traces through it without a graph break.
    """
    who = "rms_norm"
    _check_arguments(x, weight, eps, residual, who)
    backend = resolve_backend(backend, x, who, INTERPRETED)
    n_cols = x.shape[-1]
    if backend == "triton" and n_cols > MAX_TRITON_COLS:
        raise ValueError(f"{who}: H = {n_cols} is wider than the Triton kernel holds "
                         f"(MAX_TRITON_COLS = {MAX_TRITON_COLS}); use backend='torch'")
    rows = x.reshape(-1, n_cols)
    if residual is None:
        y, _ = _rms_norm_op(rows, weight, float(eps), backend)
        return y.view(x.shape)
    y, new_residual, _ = _rms_norm_residual_op(rows, residual.reshape(-1, n_cols), weight,
                                               float(eps), backend)
    return y.view(x.shape), new_residual.view(x.shape)


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """Plain differentiable PyTorch with the semantics of `rms_norm` (the model's RMSNorm, with
    the residual add before it when `residual` is given)."""
    _check_arguments(x, weight, eps, residual, "rms_norm_reference")
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, x)
