"""varlen_attention: the Triton kernel against the reference, and the reference against
attention written out by hand.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set
here and in conftest.py before the kernels are imported); on a CUDA machine the same tests run
compiled, on CUDA tensors. Shapes stay tiny because the interpreter is slow; its block sizes are
16/32 (INTERPRETER_BLOCKS), so documents of 1 to 50 tokens already cover partial blocks, several
blocks per document, diagonal blocks and documents shorter than one block.

Tolerances: fp32 agrees to 2e-5 absolute / 1e-4 relative (both sides accumulate in fp32, only
the summation order differs). fp16 inputs round P and dS to fp16 before their matrix products
while the reference runs in fp32: 1e-2 absolute and relative.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from rega_engine.kernels import attention as attn  # noqa: E402

DEVICE = "cpu" if attn.INTERPRETED else "cuda"
needs_kernel = pytest.mark.skipif(
    not attn.INTERPRETED and not torch.cuda.is_available(),
    reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA device")

FP32_TOL = dict(atol=2e-5, rtol=1e-4)
FP16_TOL = dict(atol=1e-2, rtol=1e-2)


def make_inputs(lens, num_heads, num_kv_heads, head_dim, tail=0, dtype=torch.float32, seed=0,
                device=None):
    device = device or DEVICE
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens) + tail
    q, k, v = (torch.randn(total, h, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for h in (num_heads, num_kv_heads, num_kv_heads))
    offsets = [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    return q, k, v, cu


def kernel_and_reference(q, k, v, cu, causal, softmax_scale=None, ref_dtype=torch.float32):
    """Outputs and (dq, dk, dv) of the kernel and of the reference (run in ref_dtype)."""
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    out = attn.varlen_attention(q, k, v, cu, max_len, causal=causal, softmax_scale=softmax_scale,
                                backend="triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_in = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
    ref = attn.varlen_attention_reference(*ref_in, cu, max_len, causal=causal,
                                          softmax_scale=softmax_scale)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.to(ref_dtype))
    return out, grads, ref, ref_grads


def assert_close_all(out, grads, ref, ref_grads, tol):
    torch.testing.assert_close(out.float(), ref.float(), **tol, msg=lambda m: f"output: {m}")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# The reference against attention written out by hand
# ---------------------------------------------------------------------------------------------

def dense_attention(q, k, v, cu, causal, scale):
    """Softmax over an explicit (tokens x tokens) mask: same document and, if causal, not after."""
    total = q.shape[0]
    doc = torch.full((total,), -1)
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        doc[s:e] = i
    pos = torch.arange(total)
    allowed = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, h // group].T * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of the tail: no keys
        out[:, h] = probs @ v[:, h // group]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_hand_written_masked_softmax(causal):
    q, k, v, cu = make_inputs([3, 1, 5], num_heads=4, num_kv_heads=2, head_dim=8, tail=2,
                              device="cpu")
    with torch.no_grad():
        ref = attn.varlen_attention_reference(q, k, v, cu, 5, causal=causal)
        dense = dense_attention(q, k, v, cu, causal, 1 / math.sqrt(8))
    torch.testing.assert_close(ref, dense, atol=1e-6, rtol=1e-5)
    assert torch.all(ref[-2:] == 0)


def test_reference_first_token_sees_only_itself():
    q, k, v, cu = make_inputs([4, 6], num_heads=2, num_kv_heads=1, head_dim=8, device="cpu")
    with torch.no_grad():
        ref = attn.varlen_attention_reference(q, k, v, cu, 6, causal=True)
    # The first token of each document attends to itself alone: its output is its own value.
    for start in (0, 4):
        torch.testing.assert_close(ref[start], v[start].expand(2, 8))


# ---------------------------------------------------------------------------------------------
# The Triton kernel against the reference
# ---------------------------------------------------------------------------------------------

KERNEL_CASES = {
    # name: (lens, Hq, Hkv, D, tail, causal)
    "gqa-causal-d64": ([1, 7, 33, 50, 16], 4, 2, 64, 5, True),
    "mqa-causal-d128-empty-doc": ([40, 0, 1, 17], 4, 1, 128, 0, True),
    "gqa-noncausal-d64": ([1, 7, 33, 50, 16], 4, 2, 64, 3, False),
    "mqa-noncausal-d32": ([19, 2, 35], 2, 1, 32, 0, False),
    "mha-causal-d128": ([64, 31], 2, 2, 128, 1, True),
}


@needs_kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_reference_fp32(case):
    lens, hq, hkv, d, tail, causal = KERNEL_CASES[case]
    q, k, v, cu = make_inputs(lens, hq, hkv, d, tail=tail)
    assert_close_all(*kernel_and_reference(q, k, v, cu, causal), FP32_TOL)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_reference_fp16(causal):
    q, k, v, cu = make_inputs([21, 1, 45], 4, 2, 64, tail=2, dtype=torch.float16)
    out, grads, ref, ref_grads = kernel_and_reference(q, k, v, cu, causal)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert_close_all(out, grads, ref, ref_grads, FP16_TOL)


@pytest.mark.skipif(not attn.INTERPRETED, reason="block sizes are autotuned when compiled")
def test_kernel_other_block_layouts(monkeypatch):
    """BLOCK_N > BLOCK_M in the query-side kernels and BLOCK_M > BLOCK_N in dK/dV: the diagonal
    then starts inside a key block (resp. query block) instead of at its edge."""
    monkeypatch.setitem(attn.INTERPRETER_BLOCKS, "fwd", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setitem(attn.INTERPRETER_BLOCKS, "dq", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setitem(attn.INTERPRETER_BLOCKS, "dkdv", {"BLOCK_M": 32, "BLOCK_N": 16})
    q, k, v, cu = make_inputs([50, 3, 20], 2, 1, 64, tail=1, seed=3)
    assert_close_all(*kernel_and_reference(q, k, v, cu, True), FP32_TOL)


@needs_kernel
def test_kernel_custom_softmax_scale():
    q, k, v, cu = make_inputs([30, 12], 2, 2, 32, seed=4)
    assert_close_all(*kernel_and_reference(q, k, v, cu, True, softmax_scale=0.37), FP32_TOL)


@needs_kernel
def test_single_token_documents_return_their_value():
    q, k, v, cu = make_inputs([1] * 6, 4, 2, 32, tail=1)
    out, grads, ref, ref_grads = kernel_and_reference(q, k, v, cu, True)
    # Softmax over one key is 1: each token's output is its own value row of its KV head.
    torch.testing.assert_close(out[:6], v[:6].repeat_interleave(2, dim=1).detach(), **FP32_TOL)
    assert_close_all(out, grads, ref, ref_grads, FP32_TOL)
    torch.testing.assert_close(grads[0], torch.zeros_like(grads[0]), **FP32_TOL)  # no dq: p == 1


@needs_kernel
def test_strided_inputs_from_a_fused_projection():
    """q, k, v as views of one fused (tokens, Hq + 2 Hkv, D) projection, the usual model layout."""
    lens, hq, hkv, d = [25, 9], 4, 2, 32
    qkv = torch.randn(sum(lens), hq + 2 * hkv, d, generator=torch.Generator().manual_seed(5))
    qkv = qkv.to(DEVICE).requires_grad_()
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    assert not q.is_contiguous()
    cu = torch.tensor([0, 25, 34], dtype=torch.int32, device=DEVICE)
    out = attn.varlen_attention(q, k, v, cu, 25, backend="triton")
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    ref_qkv = qkv.detach().clone().requires_grad_()
    rq, rk, rv = ref_qkv.split([hq, hkv, hkv], dim=1)
    ref = attn.varlen_attention_reference(rq, rk, rv, cu, 25)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_qkv)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    torch.testing.assert_close(grad, ref_grad, **FP32_TOL)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_no_attention_across_documents(causal):
    q, k, v, cu = make_inputs([20, 35, 9], 2, 1, 32, seed=6)
    cu_list = cu.tolist()
    run = lambda q_, k_, v_: attn.varlen_attention(q_, k_, v_, cu, 35, causal=causal,  # noqa: E731
                                                   backend="triton")
    with torch.no_grad():
        base = run(q, k, v)
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        s, e = cu_list[1], cu_list[2]  # scramble the middle document only
        k2[s:e] += 3.0 * torch.randn_like(k2[s:e])
        v2[s:e] -= 5.0
        q2[s:e] *= -2.0
        changed = run(q2, k2, v2)
    outside = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE)
    outside[s:e] = False
    assert torch.equal(changed[outside], base[outside])
    assert not torch.allclose(changed[s:e], base[s:e])
    # Gradients: a loss on the first document reaches no other document's tokens.
    out = run(q, k, v)
    grads = torch.autograd.grad(out[: cu_list[1]].sum(), (q, k, v))
    for g in grads:
        assert torch.all(g[cu_list[1]:] == 0)
        assert g[: cu_list[1]].abs().sum() > 0


@needs_kernel
def test_tail_tokens_get_zero_output_and_zero_gradients():
    q, k, v, cu = make_inputs([10, 20], 2, 2, 32, tail=7, seed=7)
    # Garbage in the tail must not leak anywhere (and uninitialised memory must not come out).
    with torch.no_grad():
        for t in (q, k, v):
            t[-7:] = 1e4
    out = attn.varlen_attention(q, k, v, cu, 20, backend="triton")
    assert torch.all(out[-7:] == 0)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g in grads:
        assert torch.all(g[-7:] == 0)
        assert torch.isfinite(g).all()


@needs_kernel
def test_no_documents_at_all_gives_zeros():
    q, k, v, _ = make_inputs([], 2, 1, 32, tail=5)
    out = attn.varlen_attention(q, k, v, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0,
                                backend="triton")
    assert torch.all(out == 0)
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert torch.all(g == 0)


@needs_kernel
def test_cached_work_table_follows_in_place_edits_of_cu_seqlens():
    q, k, v, cu = make_inputs([10, 22], 2, 1, 32, seed=8)
    with torch.no_grad():
        first = attn.varlen_attention(q, k, v, cu, 22, backend="triton")
        cu[1] = 20  # documents of 20 and 12 tokens now: a stale table would be wrong
        second = attn.varlen_attention(q, k, v, cu, 20, backend="triton")
        ref = attn.varlen_attention_reference(q, k, v, cu, 20)
    torch.testing.assert_close(second, ref, **FP32_TOL)
    assert not torch.allclose(first, second)


def test_work_table_lists_every_block_once_heaviest_first():
    cu = torch.tensor([0, 5, 5, 40, 41], dtype=torch.int32)  # pure torch: CPU is enough
    total, block = 50, 16
    cu_ext = attn._extended_cu_seqlens(cu, total)
    table = attn._build_work_table(cu_ext, total, [block], "q", causal=True)
    rows = table[attn._TABLE_BLOCKS.index(block)]
    items = [tuple(r) for r in rows.tolist() if r[0] >= 0]
    # Documents 0 (5 tokens), 1 (empty), 2 (35 tokens), 3 (1 token), then the tail (9 tokens).
    expected = {(0, 0), (2, 0), (2, 1), (2, 2), (3, 0), (4, 0)}
    assert sorted(items) == sorted(expected)
    assert len(rows) >= total // block + 4 + 1
    work = [min((b + 1) * block, [5, 0, 35, 1][d]) if d < 4 else 0 for d, b in items]
    assert work == sorted(work, reverse=True)


def test_auto_backend_on_cpu_runs_the_grouped_torch_path():
    q, k, v, cu = make_inputs([6, 9], 2, 1, 32, device="cpu")
    with torch.no_grad():
        auto = attn.varlen_attention(q, k, v, cu, 9)
        torch_backend = attn.varlen_attention(q, k, v, cu, 9, backend="torch")
        grouped = attn.varlen_attention_grouped(q, k, v, cu, 9)
    assert torch.equal(auto, grouped) and torch.equal(torch_backend, grouped)


# Short documents grouped under one mask, one longer than a group, empty documents at the start,
# middle and end, a group boundary falling exactly on group_tokens, and a tail.
GROUPED_CASES = [([0, 3, 5, 0, 8, 1, 40, 2, 2, 0], 7, 16), ([16, 16, 1], 0, 16), ([1] * 12, 3, 4),
                 ([30], 0, 16)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("lens,tail,group_tokens", GROUPED_CASES)
def test_grouped_torch_path_matches_the_reference(lens, tail, group_tokens, heads, causal):
    q, k, v, cu = make_inputs(lens, *heads, 32, tail=tail, device="cpu", seed=len(lens))
    max_len = max(lens, default=0)
    out = attn.varlen_attention_grouped(q, k, v, cu, max_len, causal=causal,
                                        group_tokens=group_tokens)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = attn.varlen_attention_reference(q, k, v, cu, max_len, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert_close_all(out, grads, ref, ref_grads, FP32_TOL)
    if tail:
        assert torch.count_nonzero(out[-tail:]) == 0


def test_grouped_torch_path_on_padding_alone_is_zeros():
    q, k, v, _ = make_inputs([], 2, 2, 32, tail=5, device="cpu")
    out = attn.varlen_attention_grouped(q, k, v, torch.tensor([0], dtype=torch.int32), 0)
    assert out.shape == q.shape and torch.count_nonzero(out) == 0


def test_document_groups_never_exceed_the_group_size_unless_one_document_does():
    offsets = [0, 3, 8, 8, 9, 40, 42, 44]
    assert attn._document_groups(offsets, 16) == [(0, 4), (4, 5), (5, 7)]
    assert attn._document_groups(offsets, 1) == [(0, 1), (1, 2), (3, 4), (4, 5), (5, 6), (6, 7)]


def test_head_dim_outside_the_kernel_still_works_on_the_reference():
    q, k, v, cu = make_inputs([6, 9], 2, 1, 48, device="cpu")
    out = attn.varlen_attention(q, k, v, cu, 9, backend="torch")
    assert out.shape == q.shape


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------

def _good():
    q, k, v, cu = make_inputs([4, 4], 4, 2, 32, device="cpu")
    return dict(q=q.detach(), k=k.detach(), v=v.detach(), cu_seqlens=cu, max_seqlen=4)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(q=a["q"][None]), "must be (total_tokens, heads, head_dim)"),
    (lambda a: a.update(k=torch.randn(8, 3, 32), v=torch.randn(8, 3, 32)),
     "positive multiple of key/value heads"),
    (lambda a: a.update(k=a["k"][:, :1]), "k and v must have the same shape"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), "int32"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 3], dtype=torch.int32)),
     "never decrease"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)),
     "end at or before total_tokens=8"),
    (lambda a: a.update(cu_seqlens=torch.tensor([1, 8], dtype=torch.int32)), "start at 0"),
    (lambda a: a.update(max_seqlen=-1), "max_seqlen"),
    (lambda a: a.update(max_seqlen=4.0), "max_seqlen"),
    (lambda a: a.update(k=a["k"].half(), v=a["v"].half()), "share a dtype"),
    (lambda a: a.update(q=a["q"][:7]), "agree on total_tokens"),
    (lambda a: a.update(softmax_scale=0.0), "softmax_scale"),
    (lambda a: a.update(backend="cuda"), "unknown backend"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=re.escape(message)):
        attn.varlen_attention(**args)


@needs_kernel
def test_unsupported_head_dim_raises_for_the_kernel():
    q, k, v, cu = make_inputs([4, 4], 2, 1, 48)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        attn.varlen_attention(q, k, v, cu, 4, backend="triton")
