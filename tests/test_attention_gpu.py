"""varlen_attention on a CUDA device at realistic sizes, bf16 and fp16, against the reference.
Skipped without CUDA.

Compile budget: every (dtype, head dim, causal, GQA group) is a new set of autotuned kernels (3
configs x forward, dK/dV and dQ: 9 compiles of 1-2 s each for sm_90 on a 2-core CPU; fp32 with
"ieee" dots takes 10-45 s each, 170 s for the set at head dim 128), and `make gpu-check` has
minutes for all GPU tests. So each case below adds one
thing the others do not cover: bf16 at head dim 128 with GQA, fp16 at head dim 64 with MQA, bf16
at head dim 64 and group 4 (the layout the model and training tests use too, whose compiled kernels
they then find in Triton's cache), non-causal; the fp32 exactness check is `slow` (make test-gpu
runs it; the interpreter checks fp32 on CPU in test_attention.py).

Tolerances: the kernel rounds P and dS to the input dtype before their matrix products, as every
flash attention does, so it is compared with the fp32 reference next to PyTorch's own attention
in the same low precision (the reference run on the bf16/fp16 inputs): its relative error
(Frobenius norm) may be at most twice that baseline's error plus a floor (1e-3 fp16, 4e-3 bf16),
and never above 5e-2.
"""
import pytest
import torch
from rega_engine.kernels import attention as attn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(attn.INTERPRETED, reason="kernels were built for the Triton interpreter"),
]
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


def packed_inputs(lens, num_heads, num_kv_heads, head_dim, dtype, tail=0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lens) + tail
    q, k, v = (torch.randn(total, h, head_dim, device="cuda", generator=gen, dtype=dtype)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    offsets = [0, *torch.tensor(lens).cumsum(0).tolist()]
    cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    grad_out = torch.randn(total, num_heads, head_dim, device="cuda", generator=gen, dtype=dtype)
    return q, k, v, cu, grad_out


def forward_backward(fn, q, k, v, cu, grad_out, causal, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    max_len = int((cu[1:] - cu[:-1]).max())
    out = fn(*leaves, cu, max_len, causal=causal)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return [out.float(), *(g.float() for g in grads)]


def rel_err(x, ref):
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_against_reference(q, k, v, cu, grad_out, causal):
    dtype = q.dtype
    kernel = forward_backward(
        lambda *a, **kw: attn.varlen_attention(*a, **kw, backend="triton"),
        q, k, v, cu, grad_out, causal, dtype)
    exact = forward_backward(attn.varlen_attention_reference, q, k, v, cu, grad_out, causal,
                             torch.float32)
    lowp = forward_backward(attn.varlen_attention_reference, q, k, v, cu, grad_out, causal, dtype)
    for name, x, ref, base in zip(("out", "dq", "dk", "dv"), kernel, exact, lowp):
        err, base_err = rel_err(x, ref), rel_err(base, ref)
        assert err <= min(2 * base_err + FLOOR[dtype], 5e-2), (
            f"{name}: relative error {err:.2e} vs fp32 reference; torch {dtype} attention has "
            f"{base_err:.2e}")
    end = int(cu[-1])
    for name, x in zip(("out", "dq", "dk", "dv"), kernel):
        assert torch.all(x[end:] == 0), f"{name} is not zero on the tokens after the last document"


@pytest.mark.parametrize(("dtype", "heads"), [(torch.bfloat16, (32, 8, 128)),
                                              (torch.float16, (16, 1, 64))],
                         ids=["bf16-gqa-d128", "fp16-mqa-d64"])
def test_realistic_documents_match_reference(dtype, heads):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1000, 3001, (8,), generator=gen).tolist()
    check_against_reference(*packed_inputs(lens, *heads, dtype, tail=37), causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_many_short_documents_match_reference(causal):
    gen = torch.Generator().manual_seed(2)
    lens = torch.randint(1, 300, (100,), generator=gen).tolist() + [1, 1, 4096]
    check_against_reference(*packed_inputs(lens, 8, 2, 64, torch.bfloat16, tail=5, seed=3),
                            causal=causal)


@pytest.mark.slow
def test_fp32_is_exact_up_to_summation_order():
    q, k, v, cu, grad_out = packed_inputs([300, 1, 129, 700], 4, 2, 128, torch.float32, tail=3)
    kernel = forward_backward(
        lambda *a, **kw: attn.varlen_attention(*a, **kw, backend="triton"),
        q, k, v, cu, grad_out, True, torch.float32)
    exact = forward_backward(attn.varlen_attention_reference, q, k, v, cu, grad_out, True,
                             torch.float32)
    for x, ref in zip(kernel, exact):
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_no_host_synchronisation():
    """Launching forward and backward never waits for the GPU, also with fresh cu_seqlens (the
    work tables are built on the device)."""
    q, k, v, cu, grad_out = packed_inputs([1500, 700, 2000], 16, 4, 128, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attn.varlen_attention(*leaves, cu, 2000)  # autotunes (which does synchronise)
    torch.autograd.grad(out, leaves, grad_out)
    fresh_cu = cu.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn.varlen_attention(*leaves, fresh_cu, 2000)
        torch.autograd.grad(out, leaves, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
