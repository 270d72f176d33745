"""swiglu: the Triton kernels and the ops' torch backend against the reference (the model's
`F.silu(gate) * up`), the custom ops under opcheck and torch.compile.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set
here and in conftest.py before the kernels are imported); on a CUDA machine the same tests run
compiled, on CUDA tensors.

Tolerances:
- fp32: 1e-5 relative and absolute (the kernel's sigmoid through exp against PyTorch's silu;
  a few fp32 ulps).
- fp16 forward against the fp16 reference (same rounding points): 1e-3 relative and absolute,
  one fp16 ulp, since an ulp-level fp32 difference in silu can flip the rounding of silu(gate)
  or of the product.
- fp16 gradients against the reference run in fp32 on the same values: 2e-3 relative and
  absolute. The kernel computes them in fp32 and rounds once (d up uses silu rounded to fp16 as
  the forward does: half an ulp more); fp16 autograd rounds dy * up on the way and is not the
  yardstick.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rega_engine.kernels import swiglu, swiglu_reference  # noqa: E402

sw = importlib.import_module("rega_engine.kernels.swiglu")

DEVICE = "cpu" if sw.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not sw.INTERPRETED and not torch.cuda.is_available(),
    reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA device")

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
FP16_FWD_TOL = dict(rtol=1e-3, atol=1e-3)
FP16_GRAD_TOL = dict(rtol=2e-3, atol=2e-3)


def make_inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # gate over a wide range: silu's negative tail, its minimum near -1.28, the linear side
    gate = (torch.randn(shape, generator=gen) * 4).to(DEVICE, dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    return gate, up


def run(fn, gate, up, **kwargs):
    y = fn(gate, up, **kwargs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return y, torch.autograd.grad(y, (gate, up), dy)


def test_reference_is_the_models_mlp_activation():
    gate, up = make_inputs((5, 33), torch.bfloat16)
    assert torch.equal(swiglu_reference(gate, up), F.silu(gate) * up)


def test_backward_formula_against_fp64_autograd():
    gate, up = make_inputs((7, 19))
    gate64, up64 = (t.detach().double().requires_grad_() for t in (gate, up))
    y = F.silu(gate64) * up64
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dg, du = torch.autograd.grad(y, (gate64, up64), dy.double())
    for backend in ("triton", "torch"):
        got_dg, got_du = sw._swiglu_backward_op(dy, gate.detach(), up.detach(), backend)
        torch.testing.assert_close(got_dg.double(), dg, **FP32_TOL)
        torch.testing.assert_close(got_du.double(), du, **FP32_TOL)


# odd sizes: a partial last block, one element, several full blocks plus a tail
SHAPES = [(37, 1000), (1,), (3, 5, 7), (4, 1024 + 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp32(shape, backend):
    gate, up = make_inputs(shape)
    y, grads = run(swiglu, gate, up, backend=backend)
    y_ref, ref_grads = run(swiglu_reference, gate, up)
    for got, want in zip((y, *grads), (y_ref, *ref_grads)):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp16(backend):
    gate, up = make_inputs((37, 1000), torch.float16)
    y, grads = run(swiglu, gate, up, backend=backend)
    y_ref, _ = run(swiglu_reference, gate, up)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, **FP16_FWD_TOL)
    up32 = [t.detach().float().requires_grad_() for t in (gate, up)]
    _, ref_grads = run(swiglu_reference, *up32)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, **FP16_GRAD_TOL)


def test_forward_rounds_like_eager_in_fp16():
    # silu(gate) is rounded to fp16 before the product, as F.silu(gate) * up does: the kernel
    # lands on eager's value, not on the once-rounded fp32 product, nearly everywhere
    gate, up = make_inputs((64, 256), torch.float16)
    y = swiglu(gate, up, backend="triton")
    eager = F.silu(gate) * up
    once = (F.silu(gate.float()) * up.float()).half()
    assert (y == eager).float().mean() > 0.99
    assert (eager != once).any()  # the two roundings do differ on these inputs


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(9, 2 * 40, generator=gen).to(DEVICE).requires_grad_()
    gate, up = gate_up[:, :40], gate_up[:, 40:]  # a fused gate/up projection's halves
    y = swiglu(gate, up, backend="triton")
    assert y.is_contiguous()
    grad = torch.autograd.grad(y.sum(), gate_up)[0]
    want = swiglu_reference(gate, up)
    torch.testing.assert_close(y, want, **FP32_TOL)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), gate_up)[0], **FP32_TOL)


def test_backward_leaves_the_saved_inputs_alone():
    gate, up = make_inputs((3, 50))
    before = (gate.detach().clone(), up.detach().clone())
    y = swiglu(gate, up, backend="triton")
    y.sum().backward(retain_graph=True)
    first = (gate.grad.clone(), up.grad.clone())
    y.sum().backward()
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])
    torch.testing.assert_close(gate.grad, 2 * first[0])
    torch.testing.assert_close(up.grad, 2 * first[1])


def test_empty():
    gate, up = make_inputs((0, 16))
    y, grads = run(swiglu, gate, up, backend="triton")
    assert y.shape == (0, 16) and all(g.shape == (0, 16) for g in grads)


@pytest.mark.parametrize("change, message", [
    (dict(up=torch.ones(4, 7)), "share shape"),
    (dict(up=torch.ones(4, 8, dtype=torch.float16)), "share shape"),
    (dict(gate=torch.ones(4, 8, dtype=torch.int32), up=torch.ones(4, 8, dtype=torch.int32)),
     "not supported"),
    (dict(backend="cuda"), "unknown backend"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = dict(gate=torch.ones(4, 8), up=torch.ones(4, 8), backend="torch") | change
    with pytest.raises(ValueError, match=message):
        swiglu(args.pop("gate"), args.pop("up"), **args)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    gate, up = make_inputs((5, 33))
    torch.library.opcheck(sw._swiglu_op, (gate, up, backend))
    dy = torch.randn(5, 33, device=DEVICE)
    torch.library.opcheck(sw._swiglu_backward_op, (dy, gate.detach(), up.detach(), backend))
    # non-contiguous inputs: the outputs' strides still match the fake implementation's
    gu = torch.randn(5, 66, device=DEVICE)
    torch.library.opcheck(sw._swiglu_op, (gu[:, :33], gu[:, 33:], backend))


def test_torch_compile_fullgraph_without_graph_breaks():
    """An MLP (gate/up/down projections around swiglu) compiles as one graph (inductor, forward
    and backward) with the op opaque, and gives eager's values."""
    import torch._dynamo

    backend = "triton" if DEVICE == "cuda" or sw.INTERPRETED else "torch"

    def mlp(x, w_gate, w_up, w_down):
        return (swiglu(x @ w_gate, x @ w_up, backend=backend) @ w_down).sum()

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen).to(DEVICE).requires_grad_()
              for shape in ((11, 32), (32, 40), (32, 40), (40, 32))]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss = torch.compile(mlp, fullgraph=True)(*params)
    grads = torch.autograd.grad(loss, params)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want = mlp(*params)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-2)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
