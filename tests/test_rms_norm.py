"""rms_norm: the Triton kernels and the ops' torch backend against the reference, the reference
against the model's RMSNorm, the custom ops under opcheck and torch.compile.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set
here and in conftest.py before the kernels are imported); on a CUDA machine the same tests run
compiled, on CUDA tensors.

Tolerances:
- fp32: 1e-5 relative and absolute. Both sides compute in fp32; only the order of the row sums
  (mean of squares, the backward's row dot product, the dweight sum over rows) differs.
- fp16 forward against the fp16 reference (same rounding points): 1e-3 relative, 1e-3 absolute,
  one fp16 ulp (2**-10 relative), since a different fp32 summation order can move a value across
  a rounding boundary of the normalised row.
- fp16 dx (and d residual) against the reference run in fp32 on the same values: 2e-3
  relative and absolute. The kernel computes in fp32 and rounds once at the end (half an ulp,
  5e-4); the rounding of the normalised row before the gain does not enter dx. (fp16 autograd
  through the reference is not the yardstick: it rounds dy * weight to fp16 on the way and is
  itself off by a few ulps.)
- fp16 dweight against its exact fp16-semantics value, sum(dy * fp16(normalised row)) in fp32:
  1e-3 relative and absolute (the kernel's single final rounding). Against the unrounded fp32
  reference it would differ by up to 2**-11 per row, summed over rows.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
from rega_engine.kernels import rms_norm, rms_norm_reference  # noqa: E402

rn = importlib.import_module("rega_engine.kernels.rms_norm")

DEVICE = "cpu" if rn.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not rn.INTERPRETED and not torch.cuda.is_available(),
    reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA device")

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
FP16_FWD_TOL = dict(rtol=1e-3, atol=1e-3)
FP16_GRAD_TOL = dict(rtol=2e-3, atol=2e-3)
EPS = 1e-6


def make_inputs(shape, dtype=torch.float32, weight_dtype=None, seed=0, residual=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(DEVICE, weight_dtype or dtype)
    res = None
    if residual:
        res = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    return x, weight.requires_grad_(), res


def run(fn, x, weight, res, upstream_seed=1, **kwargs):
    """Outputs and gradients of (x, residual, weight) under random upstream gradients."""
    out = fn(x, weight, EPS, res, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(upstream_seed)
    ups = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    inputs = [t for t in (x, res, weight) if t is not None]
    return outs, torch.autograd.grad(outs, inputs, ups)


def upcast(*tensors):
    return [None if t is None else t.detach().float().requires_grad_() for t in tensors]


# --- the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_the_models_rmsnorm(dtype):
    from rega_engine.model.llama import RMSNorm

    x, weight, res = make_inputs((3, 5, 96), dtype, residual=True)
    norm = RMSNorm(96, EPS, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    assert torch.equal(rms_norm_reference(x, weight, EPS), norm(x))
    y, new_res = rms_norm_reference(x, weight, EPS, res)
    assert torch.equal(new_res, x + res)
    assert torch.equal(y, norm(x + res))


def test_reference_rows_have_unit_rms_before_the_gain():
    x, _, _ = make_inputs((4, 64))
    y = rms_norm_reference(x, torch.ones(64), 0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), **FP32_TOL)


# --- kernel and torch backend against the reference ------------------------------------------

SHAPES = [(37, 1000), (5, 64), (2, 3, 4096), (1, 17)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp32(shape, residual, backend):
    x, weight, res = make_inputs(shape, residual=residual)
    outs, grads = run(rms_norm, x, weight, res, backend=backend)
    ref_outs, ref_grads = run(rms_norm_reference, x, weight, res)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp16(residual, backend):
    x, weight, res = make_inputs((37, 1000), torch.float16, residual=residual)
    outs, grads = run(rms_norm, x, weight, res, backend=backend)
    ref_outs, _ = run(rms_norm_reference, x, weight, res)
    for got, want in zip(outs, ref_outs):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, **FP16_FWD_TOL)
    _, ref_grads = run(rms_norm_reference, *upcast(x, weight, res))
    for got, want in zip(grads[:-1], ref_grads[:-1]):  # dx (and d residual)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, **FP16_GRAD_TOL)
    # dweight = sum over rows of dy * (the normalised row as rounded to fp16), in fp32
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=gen).to(x)  # run()'s first upstream gradient
    rounded = rms_norm_reference(x.detach() if res is None else (x + res).detach(),
                                 torch.ones_like(weight), EPS)
    want_dw = (dy.float() * rounded.float()).sum(0)
    assert grads[-1].dtype == torch.float16
    torch.testing.assert_close(grads[-1].float(), want_dw, **FP16_FWD_TOL)


def test_kernel_and_torch_backend_agree_in_fp16():
    x, weight, res = make_inputs((37, 1000), torch.float16, residual=True)
    outs, grads = run(rms_norm, x, weight, res, backend="triton")
    t_outs, t_grads = run(rms_norm, x, weight, res, backend="torch")
    for got, want in zip(outs + grads, t_outs + t_grads):
        torch.testing.assert_close(got, want, **FP16_FWD_TOL)


def test_forward_rounds_like_the_model_in_fp16():
    # the normalised row is rounded to fp16 before the gain, as the model's RMSNorm does: the
    # kernel lands on the reference's value, not on the once-rounded fp32 product, nearly
    # everywhere (a different summation order may flip a rare rounding)
    x, weight, _ = make_inputs((64, 256), torch.float16)
    y = rms_norm(x, weight, EPS, backend="triton")
    want = rms_norm_reference(x, weight, EPS)
    xf = x.float()
    once = (weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).half()
    assert (y == want).float().mean() > 0.99
    assert (want != once).float().mean() > 0.05  # the two roundings do differ on these inputs


def test_fp32_gain_on_fp16_input_promotes_like_the_model():
    x, weight, _ = make_inputs((7, 96), torch.float16, weight_dtype=torch.float32)
    (y,), grads = run(rms_norm, x, weight, None, backend="triton")
    (y_ref,), ref_grads = run(rms_norm_reference, x, weight, None)
    assert y.dtype == torch.float32 and grads[0].dtype == torch.float16
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    _, up_grads = run(rms_norm_reference, *upcast(x, weight, None))
    for got, want in zip(grads, up_grads):
        torch.testing.assert_close(got.float(), want, **FP16_GRAD_TOL)


@pytest.mark.parametrize("programs", [1, 2, 37, 100])
def test_dweight_partial_sums_for_any_row_blocking(monkeypatch, programs):
    # one program for all rows, uneven blocks, one row each, more programs than rows
    monkeypatch.setattr(rn, "INTERPRETER_BWD_PROGRAMS", programs)
    if not rn.INTERPRETED:
        monkeypatch.setattr(rn, "_backward_programs", lambda n, device: max(1, min(n, programs)))
    x, weight, res = make_inputs((37, 200), residual=True)
    _, grads = run(rms_norm, x, weight, res, backend="triton")
    _, ref_grads = run(rms_norm_reference, x, weight, res)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_strided_rows_and_expanded_upstream_gradient():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(9, 160, generator=gen).to(DEVICE)
    x = big[:, 16:144].requires_grad_()  # row stride 160, a view into a wider buffer
    assert not x.is_contiguous()
    weight = torch.randn(128, generator=gen).to(DEVICE).requires_grad_()
    y = rms_norm(x, weight, EPS, backend="triton")
    grads = torch.autograd.grad(y.sum(), (x, weight))  # dy is ones with stride (0, 0)
    y_ref = rms_norm_reference(x, weight, EPS)
    ref_grads = torch.autograd.grad(y_ref.sum(), (x, weight))
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_residual_gradient_when_only_one_output_is_used():
    x, weight, res = make_inputs((6, 48), residual=True)
    for pick in (0, 1):
        got = torch.autograd.grad(rms_norm(x, weight, EPS, res, backend="triton")[pick].sum(),
                                  (x, res), allow_unused=True)
        want = torch.autograd.grad(rms_norm_reference(x, weight, EPS, res)[pick].sum(), (x, res))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32_TOL)
    # only the new residual: its gradient passes straight through to x and residual
    gx, gres = torch.autograd.grad(rms_norm(x, weight, EPS, res, backend="triton")[1].sum(),
                                   (x, res))
    assert torch.equal(gx, torch.ones_like(gx)) and torch.equal(gres, torch.ones_like(gres))


def test_empty_batch():
    x, weight, res = make_inputs((0, 64), residual=True)
    y, new_res = rms_norm(x, weight, EPS, res, backend="triton")
    assert y.shape == (0, 64) and new_res.shape == (0, 64)
    gx, gw = torch.autograd.grad(y.sum(), (x, weight))
    assert gx.shape == (0, 64) and torch.equal(gw, torch.zeros(64, device=DEVICE))


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(rn, "_forward_triton", boom)
    x, weight, _ = make_inputs((3, 32))
    y = rms_norm(x.detach().cpu(), weight.detach().cpu(), EPS)
    assert torch.equal(y, rms_norm_reference(x.detach().cpu(), weight.detach().cpu(), EPS))


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.ones(7)), "weight must be"),
    (dict(residual=torch.ones(4, 8, dtype=torch.float16)), "residual must match"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(eps=-1.0), "eps must be"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), "dtype"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = dict(x=torch.ones(4, 8), weight=torch.ones(8), eps=EPS, residual=None,
                backend="torch") | change
    with pytest.raises(ValueError, match=message):
        rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), args.pop("residual"),
                 **args)


def test_too_wide_rows_name_the_torch_backend():
    x = torch.ones(1, rn.MAX_TRITON_COLS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="backend='torch'"):
        rms_norm(x, torch.ones(x.shape[1], device=DEVICE), EPS, backend="triton")


# --- custom ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    x, weight, res = make_inputs((7, 48), residual=True)
    rstd = (torch.rand(7) + 0.5).to(DEVICE)
    d = x.detach()
    cases = [
        (rn._rms_norm_op, (x, weight, EPS, backend)),
        (rn._rms_norm_residual_op, (x, res, weight, EPS, backend)),
        (rn._rms_norm_backward_op, (d, None, d, weight.detach(), rstd, backend)),
        (rn._rms_norm_backward_op, (d, res.detach(), d, weight.detach(), rstd, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_without_graph_breaks():
    """A decoder-block-shaped function compiles as one graph (inductor, forward and backward),
    with the ops opaque, and gives eager's values."""
    import torch._dynamo

    backend = "triton" if DEVICE == "cuda" or rn.INTERPRETED else "torch"

    def block(h, res, w1, w2, proj):
        normed, h = rms_norm(h, w1, EPS, res, backend=backend)
        out = rms_norm(h + normed @ proj, w2, EPS, backend=backend)
        return out.sum()

    x, w1, res = make_inputs((11, 32), residual=True)
    w2 = torch.randn(32, device=DEVICE).requires_grad_()
    proj = torch.randn(32, 32, device=DEVICE) / 6
    args = (x, res, w1, w2, proj)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, (x, res, w1, w2))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want = block(*args)
    want_grads = torch.autograd.grad(want, (x, res, w1, w2))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, **FP32_TOL)
