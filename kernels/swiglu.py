"""SwiGLU, silu(gate) * up: Triton forward and backward as `torch.library` custom ops, plus the
PyTorch reference.

Semantics are the model's MLP (`F.silu(gate) * up`) including its intermediate rounding: silu is
computed in fp32, rounded to the input dtype, then multiplied by `up` in fp32 and rounded again,
which is what eager PyTorch does on bf16/fp16 tensors.

Forward: a flat elementwise kernel, one read of gate and up and one write of the output.
Backward: the activation is recomputed from the saved gate and up (nothing else is saved, so the
op keeps no (tokens x intermediate) activation besides its inputs, which the projections' backward
holds anyway):

    sig = sigmoid(gate)
    d up   = dy * silu(gate)                         (silu rounded as in the forward)
    d gate = dy * up * sig * (1 + gate * (1 - sig))

The gradients go to new tensors, not over the saved gate and up: those may be used elsewhere
(retain_graph, a fused gate/up projection's other consumers).
"""
import torch
from torch import Tensor

from ._triton_compat import (
    device_guard,
    is_interpreted,
    resolve_backend,
    tl,
    triton,
)

# Elements per program: 8 per thread at 4 warps, one 16-byte load per tensor in bf16.
BLOCK = 1024
NUM_WARPS = 4
# ptxas spills of the compiled kernels that are understood and accepted (none); see
# rega_engine.kernels.compile_check and tests/test_small_kernels_compile.py.
KNOWN_SPILLS: dict = {}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(GATE, UP, Y, n_elements, BLOCK: tl.constexpr):
    # 64-bit offsets: tokens x intermediate passes 2**31 elements on long batches of big models
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, GATE, UP, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DUP + offs, (dy * silu.to(GATE.dtype.element_ty).to(tl.float32))
             .to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty),
             mask=mask)


INTERPRETED = is_interpreted(_swiglu_fwd_kernel)


# --------------------------------------------------------------------------------------------
# Host side of the Triton path
# --------------------------------------------------------------------------------------------

def _grid(n: int) -> tuple[int]:
    return (-(-n // BLOCK),)


def _forward_triton(gate, up):
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        with device_guard(gate):
            _swiglu_fwd_kernel[_grid(n)](gate, up, y, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def _backward_triton(dy, gate, up):
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    n = gate.numel()
    if n:
        with device_guard(gate):
            _swiglu_bwd_kernel[_grid(n)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK,
                                         num_warps=NUM_WARPS)
    return dgate, dup


# --------------------------------------------------------------------------------------------
# The same computations in PyTorch (the ops' "torch" backend)
# --------------------------------------------------------------------------------------------

def _backward_torch(dy, gate, up):
    g, dyf = gate.float(), dy.float()
    sig = torch.sigmoid(g)
    silu = (g * sig).to(gate.dtype).float()
    dgate = dyf * up.float() * sig * (1.0 + g * (1.0 - sig))
    return (dgate.to(gate.dtype).contiguous(),
            (dyf * silu).to(up.dtype).contiguous())


# --------------------------------------------------------------------------------------------
# Custom ops: fake implementations and autograd
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("rega::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        return _forward_triton(gate, up)
    # contiguous like the kernel's output (and the fake), whatever the inputs' strides
    return (torch.nn.functional.silu(gate) * up).contiguous()


@torch.library.custom_op("rega::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor,
                        backend: str) -> tuple[Tensor, Tensor]:
    """(d gate, d up), recomputing the activation from gate and up."""
    if backend == "triton":
        return _backward_triton(dy, gate, up)
    return _backward_torch(dy, gate, up)


@_swiglu_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_swiglu_backward_op.register_fake
def _(dy, gate, up, backend):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_swiglu(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward_swiglu(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward_op(dy, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_op.register_autograd(_backward_swiglu, setup_context=_setup_swiglu)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _check_arguments(gate, up, who):
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"{who}: gate and up must share shape, dtype and device, got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and "
                         f"{tuple(up.shape)} {up.dtype} {up.device}")
    if gate.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{who}: dtype {gate.dtype} is not supported; use bfloat16, float16 or "
                         "float32")


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """silu(gate) * up for gate, up of one shape and dtype (the Llama MLP's activation), rounded
    as eager PyTorch rounds `F.silu(gate) * up`. The backward recomputes the activation from
    gate and up instead of storing it. Non-contiguous inputs are copied once; the output is
    contiguous.

    backend: "auto" runs Triton on CUDA tensors and PyTorch elsewhere; "triton" forces the kernel
    (CPU tensors need TRITON_INTERPRET=1); "torch" forces PyTorch. torch.compile traces through
    it without a graph break.
    """
    who = "swiglu"
    _check_arguments(gate, up, who)
    return _swiglu_op(gate, up, resolve_backend(backend, gate, who, INTERPRETED))


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------

def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """Plain differentiable PyTorch: the model's `F.silu(gate) * up`."""
    _check_arguments(gate, up, "swiglu_reference")
    return torch.nn.functional.silu(gate) * up
