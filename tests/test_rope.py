"""rotary_embedding: the Triton kernel and the ops' torch backend against the reference, the
reference against the model's rope (rope_inv_freq, rope_cos_sin, apply_rope), the custom ops
under opcheck and torch.compile.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set
here and in conftest.py before the kernels are imported); on a CUDA machine the same tests run
compiled, on CUDA tensors.

Tolerances:
- fp32: 1e-5 relative and absolute. Both sides take the same fp32 angle (position * inv_freq,
  one rounding) and compute in fp32; cos/sin implementations (numpy or libdevice against
  PyTorch's) differ by an ulp or two, and a fused multiply-add may round x1*c - x2*s once
  instead of three times.
- fp16: 1e-3 relative and absolute, one fp16 ulp: those fp32 differences can move a result
  across an fp16 rounding boundary.
Positions go up to ~8000 (so angles reach thousands of radians, where a careless range reduction
would show).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
from rega_engine.kernels import rotary_embedding, rotary_embedding_reference  # noqa: E402

from rega_engine.model.args import RopeArgs  # noqa: E402
from rega_engine.model.llama import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402

rope = importlib.import_module("rega_engine.kernels.rope")

DEVICE = "cpu" if rope.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not rope.INTERPRETED and not torch.cuda.is_available(),
    reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA device")

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
FP16_TOL = dict(rtol=1e-3, atol=1e-3)

LLAMA3 = RopeArgs(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=8192)
QWEN2 = RopeArgs(theta=1000000.0)
LLAMA2 = RopeArgs(theta=10000.0)
VARIANTS = {"llama3": LLAMA3, "qwen2": QWEN2, "llama2": LLAMA2}


def packed_positions(doc_lengths, scale=1):
    """position_ids of documents packed into one row: 0, 1, ... restarting per document."""
    return torch.cat([torch.arange(n) * scale for n in doc_lengths]).to(DEVICE)


def make_qk(tokens, n_q, n_k, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, n_q, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(tokens, n_k, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    return q, k


def run(fn, q, k, *args, **kwargs):
    q_out, k_out = fn(q, k, *args, **kwargs)
    gen = torch.Generator().manual_seed(1)
    ups = [torch.randn(t.shape, generator=gen).to(t) for t in (q_out, k_out)]
    return (q_out, k_out), torch.autograd.grad((q_out, k_out), (q, k), ups)


# --- the reference against the model -------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_models_rope(variant, dtype):
    rope_args = VARIANTS[variant]
    q, k = make_qk(37, 4, 2, 64, dtype)
    pos = packed_positions([20, 10, 7], scale=200)
    inv_freq = rope_inv_freq(rope_args, 64, DEVICE)
    cos, sin = rope_cos_sin(pos, rope_args, 64)
    q_ref, k_ref = rotary_embedding_reference(q, k, pos, inv_freq)
    assert torch.equal(q_ref, apply_rope(q, cos, sin))
    assert torch.equal(k_ref, apply_rope(k, cos, sin))


def test_default_inv_freq_helper_is_the_models():
    for theta in (10000.0, 1e6):
        assert torch.equal(rope.rope_inv_freq_default(128, theta),
                           rope_inv_freq(RopeArgs(theta=theta), 128, "cpu"))


def test_rotation_keeps_norms_and_relative_positions():
    # a rotation per pair: norms are kept, and q.k depends only on the position difference
    q, k = make_qk(2, 1, 1, 64)
    inv_freq = rope_inv_freq(LLAMA3, 64, DEVICE)
    dots = []
    for start in (0, 5, 1000):
        pos = torch.tensor([start + 3, start], device=DEVICE)
        q_out, k_out = rotary_embedding_reference(q, k, pos, inv_freq)
        torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), **FP32_TOL)
        dots.append((q_out[0] * k_out[1]).sum())
    torch.testing.assert_close(dots[1], dots[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dots[2], dots[0], rtol=1e-4, atol=1e-4)


# --- kernel and torch backend against the reference ------------------------------------------

# (tokens, query heads, key/value heads, head_dim): GQA as Llama 3, Qwen2.5-0.5B's 14/2 heads,
# MHA, a non-power-of-two head dim, more heads than one tile holds.
SHAPES = [(37, 6, 2, 128), (37, 14, 2, 64), (19, 3, 3, 80), (11, 2, 1, 96), (5, 40, 8, 64)]


@pytest.mark.parametrize("variant", ["llama3", "qwen2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp32(shape, variant, backend):
    tokens, n_q, n_k, head_dim = shape
    q, k = make_qk(tokens, n_q, n_k, head_dim)
    pos = packed_positions([tokens - tokens // 3, tokens // 3], scale=211)
    inv_freq = rope_inv_freq(VARIANTS[variant], head_dim, DEVICE)
    outs, grads = run(rotary_embedding, q, k, pos, inv_freq, backend=backend)
    ref_outs, ref_grads = run(rotary_embedding_reference, q, k, pos, inv_freq)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp16(head_dim, backend):
    q, k = make_qk(37, 6, 2, head_dim, torch.float16)
    pos = packed_positions([30, 7], scale=271)
    inv_freq = rope_inv_freq(LLAMA3, head_dim, DEVICE)
    outs, grads = run(rotary_embedding, q, k, pos, inv_freq, backend=backend)
    ref_outs, ref_grads = run(rotary_embedding_reference, q, k, pos, inv_freq)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, **FP16_TOL)


def test_positions_restart_per_document():
    # a document packed after others gets exactly the rotation it gets alone at the row start
    q, k = make_qk(12, 2, 1, 64)
    inv_freq = rope_inv_freq(QWEN2, 64, DEVICE)
    packed_q, packed_k = rotary_embedding(q, k, packed_positions([5, 7]), inv_freq,
                                          backend="triton")
    alone_q, alone_k = rotary_embedding(q[5:], k[5:], packed_positions([7]), inv_freq,
                                        backend="triton")
    assert torch.equal(packed_q[5:], alone_q) and torch.equal(packed_k[5:], alone_k)
    assert torch.equal(packed_q[0], q[0]) and torch.equal(packed_q[5], q[5])  # angle 0


def test_int32_and_2d_position_ids():
    q, k = make_qk(12, 2, 2, 64)
    inv_freq = rope_inv_freq(LLAMA3, 64, DEVICE)
    pos = packed_positions([5, 7])
    want = rotary_embedding(q, k, pos, inv_freq, backend="triton")
    for variant in (pos.to(torch.int32), pos.view(2, 6)):
        got = rotary_embedding(q, k, variant, inv_freq, backend="triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_strided_q_and_k_from_a_fused_projection():
    tokens, n_q, n_k, d = 9, 4, 2, 64
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (n_q + 2 * n_k) * d, generator=gen).to(DEVICE).requires_grad_()
    q = qkv[:, :n_q * d].view(tokens, n_q, d)
    k = qkv[:, n_q * d:(n_q + n_k) * d].view(tokens, n_k, d)
    assert not q.is_contiguous()
    pos = packed_positions([4, 5], scale=97)
    inv_freq = rope_inv_freq(LLAMA3, d, DEVICE)
    outs = rotary_embedding(q, k, pos, inv_freq, backend="triton")
    refs = rotary_embedding_reference(q, k, pos, inv_freq)
    grad = torch.autograd.grad(sum(o.sum() for o in outs), qkv)[0]
    grad_ref = torch.autograd.grad(sum(o.sum() for o in refs), qkv)[0]
    for got, want in zip(outs + (grad,), refs + (grad_ref,)):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_backward_is_the_inverse_rotation():
    q, k = make_qk(8, 2, 1, 64)
    pos = packed_positions([8], scale=500)
    inv_freq = rope_inv_freq(LLAMA3, 64, DEVICE)
    rotated = rope._rotary_embedding_op(q.detach(), k.detach(), pos, inv_freq, False, "triton")
    back = rope._rotary_embedding_op(*rotated, pos, inv_freq, True, "triton")
    torch.testing.assert_close(back[0], q.detach(), **FP32_TOL)
    torch.testing.assert_close(back[1], k.detach(), **FP32_TOL)


def test_double_backward():
    q, k = make_qk(6, 2, 1, 64)
    pos = packed_positions([6], scale=3)
    inv_freq = rope_inv_freq(LLAMA2, 64, DEVICE)
    q_out, k_out = rotary_embedding(q, k, pos, inv_freq, backend="triton")
    up = torch.randn(q_out.shape, device=DEVICE, requires_grad=True)
    (gq,) = torch.autograd.grad(q_out, q, up, create_graph=True)
    (gup,) = torch.autograd.grad(gq.sum(), up)
    # d/d up of sum(R^T up) = R 1: the rotation applied to ones
    want = rotary_embedding_reference(torch.ones_like(q), k.detach(), pos, inv_freq)[0]
    torch.testing.assert_close(gup, want, **FP32_TOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_rotates_the_given_tensors(backend):
    q, k = make_qk(13, 6, 2, 80, torch.float16)
    q, k = q.detach(), k.detach()
    pos = packed_positions([6, 7], scale=123)
    inv_freq = rope_inv_freq(LLAMA3, 80, DEVICE)
    want = rotary_embedding(q, k, pos, inv_freq, backend=backend)
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    got = rotary_embedding(q, k, pos, inv_freq, inplace=True, backend=backend)
    assert got[0] is q and got[1] is k and q.data_ptr() == q_ptr and k.data_ptr() == k_ptr
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


def test_inplace_refuses_tensors_that_need_a_gradient():
    q, k = make_qk(3, 1, 1, 64)
    inv_freq = rope_inv_freq(LLAMA2, 64, DEVICE)
    with pytest.raises(ValueError, match="no autograd"):
        rotary_embedding(q, k, packed_positions([3]), inv_freq, inplace=True)
    with torch.no_grad():
        rotary_embedding(q, k, packed_positions([3]), inv_freq, inplace=True)


def test_no_tokens():
    q, k = make_qk(0, 2, 1, 64)
    outs, grads = run(rotary_embedding, q, k, torch.zeros(0, dtype=torch.long, device=DEVICE),
                      rope_inv_freq(LLAMA2, 64, DEVICE), backend="triton")
    assert [t.shape for t in outs + grads] == [(0, 2, 64), (0, 1, 64)] * 2


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.ones(4, 2, 63)), "agree on"),
    (dict(q=torch.ones(4, 2, 7), k=torch.ones(4, 1, 7)), "even"),
    (dict(position_ids=torch.arange(5)), "one int64/int32 position per token"),
    (dict(position_ids=torch.zeros(4)), "one int64/int32 position per token"),
    (dict(inv_freq=torch.ones(64)), "inv_freq must be"),
    (dict(q=torch.ones(4, 64)), r"\(tokens, heads, head_dim\)"),
    (dict(backend="cuda"), "unknown backend"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = dict(q=torch.ones(4, 2, 64), k=torch.ones(4, 1, 64), position_ids=torch.arange(4),
                inv_freq=torch.ones(32), backend="torch") | change
    with pytest.raises(ValueError, match=message):
        rotary_embedding(args.pop("q"), args.pop("k"), args.pop("position_ids"),
                         args.pop("inv_freq"), **args)


# --- custom ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    q, k = make_qk(9, 4, 2, 16)
    pos = packed_positions([4, 3, 2])
    inv_freq = rope.rope_inv_freq_default(16, device=DEVICE)
    for inverse in (False, True):
        torch.library.opcheck(rope._rotary_embedding_op, (q, k, pos, inv_freq, inverse, backend))
    torch.library.opcheck(rope._rotary_embedding_inplace_op,
                          (q.detach().clone(), k.detach().clone(), pos, inv_freq, backend))


def test_torch_compile_fullgraph_without_graph_breaks():
    """Attention-shaped use (projections, rope, a score) compiles as one graph (inductor,
    forward and backward) with the op opaque, and gives eager's values."""
    import torch._dynamo

    backend = "triton" if DEVICE == "cuda" or rope.INTERPRETED else "torch"

    def scores(x, wq, wk, pos, inv_freq):
        t = x.shape[0]
        q, k = (x @ wq).view(t, 4, 16), (x @ wk).view(t, 2, 16)
        q, k = rotary_embedding(q, k, pos, inv_freq, backend=backend)
        return (q[:, :2] * k).sum()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 32, generator=gen).to(DEVICE).requires_grad_()
    wq = torch.randn(32, 64, generator=gen).to(DEVICE).requires_grad_()
    wk = torch.randn(32, 32, generator=gen).to(DEVICE).requires_grad_()
    args = (x, wq, wk, packed_positions([6, 5]), rope.rope_inv_freq_default(16, device=DEVICE))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(scores, fullgraph=True)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, (x, wq, wk))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want = scores(*args)
    want_grads = torch.autograd.grad(want, (x, wq, wk))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-3)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_torch_compile_inplace_under_no_grad():
    import torch._dynamo

    backend = "triton" if DEVICE == "cuda" or rope.INTERPRETED else "torch"

    def rotate(q, k, pos, inv_freq):
        rotary_embedding(q, k, pos, inv_freq, inplace=True, backend=backend)
        return q.sum() + k.sum()

    q, k = make_qk(7, 2, 1, 32)
    q, k = q.detach(), k.detach()
    pos, inv_freq = packed_positions([7], scale=9), rope.rope_inv_freq_default(32, device=DEVICE)
    want = rotary_embedding_reference(q, k, pos, inv_freq)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        torch.compile(rotate, fullgraph=True, backend="aot_eager")(q, k, pos, inv_freq)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(q, want[0], **FP32_TOL)
    torch.testing.assert_close(k, want[1], **FP32_TOL)
