"""split_varlen_attention: the unsplit special case against varlen_attention, zigzag
context-parallel layouts against the unsplit op, argument errors, opcheck, and the Triton kernels
compiled for sm_80/sm_90.

Without a GPU the Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1, as in
test_attention.py), with 16/32 blocks, so the tiny rows here already put both chunks of a zigzag
rank into one query block. The interpreter's bf16 tl.dot is wrong, so Triton runs fp32 and fp16.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import re  # noqa: E402

import pytest  # noqa: E402
from kernel_compile import ARCHS, assert_all_fit, compile_in_subprocess  # noqa: E402
from rega_engine.kernels import attention as attn  # noqa: E402
from rega_engine.kernels import split_attention as split  # noqa: E402
from rega_engine.kernels.split_attention import split_varlen_attention  # noqa: E402

DEVICE = "cpu" if attn.INTERPRETED else "cuda"
TRITON_HERE = attn.INTERPRETED or torch.cuda.is_available()
needs_kernel = pytest.mark.skipif(
    not TRITON_HERE, reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA "
    "device")

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def device_for(backend):
    return DEVICE if backend == "triton" else "cpu"


def packed_row(lens, tail, hq, hkv, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens) + tail
    q, k, v = (torch.randn(total, h, head_dim, generator=gen).to(device, dtype)
               for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    return q, k, v, cu


def attention_and_grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_close(name, got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype],
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The special case: one segment per document, positions = row indices
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32)])
def test_unsplit_layout_equals_varlen_attention(backend, dtype):
    if backend == "triton" and not TRITON_HERE:
        pytest.skip("no Triton here")
    device = device_for(backend)
    lens = [1, 7, 0, 33, 40]
    q, k, v, cu = packed_row(lens, 5, 4, 2, 64, dtype, device)
    positions = torch.arange(q.shape[0], dtype=torch.int32, device=device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    got = attention_and_grads(
        lambda q, k, v: split_varlen_attention(q, k, v, cu, cu, positions, 40, 40,
                                               backend=backend), q, k, v, grad_out)
    want = attention_and_grads(
        lambda q, k, v: attn.varlen_attention(q, k, v, cu, 40, backend=backend), q, k, v,
        grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(name, g, w, dtype)
    assert torch.count_nonzero(got[0][-5:]) == 0


# ---------------------------------------------------------------------------------------------
# Zigzag context parallelism: rank i holds chunks i and 2cp-1-i of the packed row
# ---------------------------------------------------------------------------------------------

# 96 rows: 8 chunks of 12 for cp=4, 4 of 24 for cp=2. The 30- and 41-token documents cross every
# boundary they meet; the 3-, 5- and 7-token ones fit inside a chunk; then a 10-row padding tail.
CP_LENS, CP_TAIL = [30, 5, 7, 41, 3], 10


def zigzag_rank(cu_full: torch.Tensor, total: int, cp: int, rank: int):
    """(rows, cu_seqlens_q, q_positions) of `rank`'s queries; rows ascend, so each document's rows
    form one segment and the padding rows come last."""
    chunk = total // (2 * cp)
    rows = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)])
    offsets = cu_full.cpu().to(torch.int64)
    counts = [int(((rows >= a) & (rows < b)).sum()) for a, b in zip(offsets, offsets[1:])]
    cu_q = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    return rows, cu_q, rows.to(torch.int32)


def check_zigzag(cp, hq, hkv, head_dim, dtype, backend, seed=0):
    device = device_for(backend)
    q, k, v, cu = packed_row(CP_LENS, CP_TAIL, hq, hkv, head_dim, dtype, device, seed)
    total, longest = q.shape[0], max(CP_LENS)
    assert total % (2 * cp) == 0
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q)
    out, dq, dk, dv = attention_and_grads(
        lambda q, k, v: attn.varlen_attention(q, k, v, cu, longest, backend=backend), q, k, v,
        grad_out)
    dk_sum = torch.zeros(dk.shape, dtype=torch.float32, device=device)
    dv_sum = torch.zeros_like(dk_sum)
    for rank in range(cp):
        rows, cu_q, positions = zigzag_rank(cu, total, cp, rank)
        rows_d = rows.to(device)
        cu_q, positions = cu_q.to(device), positions.to(device)
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
        r_out, r_dq, r_dk, r_dv = attention_and_grads(
            lambda q_, k_, v_: split_varlen_attention(q_, k_, v_, cu_q, cu, positions, max_q,
                                                      longest, backend=backend),
            q[rows_d], k, v, grad_out[rows_d])
        assert_close(f"rank {rank} out", r_out, out[rows_d], dtype)
        assert_close(f"rank {rank} dq", r_dq, dq[rows_d], dtype)
        # documents without a query on this rank get no key gradient from it
        for j in range(len(CP_LENS)):
            if cu_q[j] == cu_q[j + 1]:
                assert torch.count_nonzero(r_dk[cu[j]:cu[j + 1]]) == 0
        assert torch.count_nonzero(r_dk[cu[-1]:]) == 0 and torch.count_nonzero(r_dv[cu[-1]:]) == 0
        dk_sum += r_dk.float()
        dv_sum += r_dv.float()
    assert_close("sum of dk", dk_sum, dk, dtype)
    assert_close("sum of dv", dv_sum, dv, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_ranks_match_the_unsplit_op_torch(cp, head_dim, dtype):
    check_zigzag(cp, 4, 2, head_dim, dtype, "torch")


@needs_kernel
@pytest.mark.parametrize("cp,head_dim,dtype,heads", [
    (2, 64, torch.float32, (4, 2)),
    pytest.param(4, 128, torch.float32, (4, 2), marks=pytest.mark.slow),
    pytest.param(4, 64, torch.float16, (4, 1), marks=pytest.mark.slow),
    (2, 128, torch.float16, (2, 2)),
])
def test_zigzag_ranks_match_the_unsplit_op_triton(cp, head_dim, dtype, heads):
    check_zigzag(cp, *heads, head_dim, dtype, "triton")


@needs_kernel
def test_triton_matches_torch_on_scattered_positions(seed=0):
    """Queries at a random ~40% of each document's rows (gaps of any size, inside and across
    blocks), then two padding rows whose positions mean nothing."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 60, (5,), generator=gen).tolist()
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    rows = torch.nonzero(torch.rand(int(cu_k[-1]), generator=gen) < 0.4).flatten()
    counts = [int(((rows >= a) & (rows < b)).sum()) for a, b in zip(cu_k, cu_k[1:])]
    cu_q = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([rows, torch.tensor([5, 0])]).to(torch.int32)
    q = torch.randn(len(positions), 4, 32, generator=gen)
    k, v = (torch.randn(sum(lens) + 3, 2, 32, generator=gen) for _ in range(2))
    grad_out = torch.randn(q.shape, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        device = device_for(backend)
        results[backend] = [t.cpu() for t in attention_and_grads(
            lambda q_, k_, v_: split_varlen_attention(
                q_, k_, v_, cu_q.to(device), cu_k.to(device), positions.to(device), max(counts),
                max(lens), backend=backend),
            q.to(device), k.to(device), v.to(device), grad_out.to(device))]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["triton"], results["torch"]):
        assert_close(name, got, want, torch.float32)
    out, dq = results["triton"][:2]
    assert torch.count_nonzero(out[-2:]) == 0 and torch.count_nonzero(dq[-2:]) == 0


@pytest.mark.skipif(not attn.INTERPRETED, reason="block sizes are autotuned when compiled")
def test_zigzag_triton_other_block_layouts(monkeypatch):
    """BLOCK_N > BLOCK_M in the query-side kernels and BLOCK_M > BLOCK_N in dK/dV."""
    monkeypatch.setitem(attn.INTERPRETER_BLOCKS, "fwd", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setitem(attn.INTERPRETER_BLOCKS, "dq", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setitem(attn.INTERPRETER_BLOCKS, "dkdv", {"BLOCK_M": 32, "BLOCK_N": 16})
    check_zigzag(4, 2, 1, 64, torch.float32, "triton", seed=3)


def test_grouped_short_documents_match_one_group_each():
    """The torch path's groups of short documents (one masked call) against a call each."""
    q, k, v, cu = packed_row(CP_LENS, CP_TAIL, 4, 2, 64, torch.float32, "cpu")
    rows, cu_q, positions = zigzag_rank(cu, q.shape[0], 4, 1)
    args = (q[rows], k, v, cu_q, cu, positions, 24, 41, 0.125, "torch")
    grouped, _ = split._split_attention_op(*args, 128)
    alone, _ = split._split_attention_op(*args, 1)
    torch.testing.assert_close(grouped, alone, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_dq_or_only_dkdv(backend):
    if backend == "triton" and not TRITON_HERE:
        pytest.skip("no Triton here")
    device = device_for(backend)
    q, k, v, cu = packed_row([20, 9], 3, 2, 1, 32, torch.float32, device)
    rows, cu_q, positions = zigzag_rank(cu, q.shape[0], 2, 0)
    q_rank = q[rows.to(device)].requires_grad_()
    out = split_varlen_attention(q_rank, k, v, cu_q.to(device), cu, positions.to(device), 8, 20,
                                 backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), q_rank)
    k.requires_grad_()
    out = split_varlen_attention(q_rank.detach(), k, v, cu_q.to(device), cu,
                                 positions.to(device), 8, 20, backend=backend)
    (dk,) = torch.autograd.grad(out.sum(), k)
    assert dq.shape == q_rank.shape and dk.shape == k.shape and dk.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# opcheck and argument errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    if backend == "triton" and not TRITON_HERE:
        pytest.skip("no Triton here")
    device = device_for(backend)
    q, k, v, cu = packed_row([12, 3, 9], 0, 4, 2, 32, torch.float32, device)
    rows, cu_q, positions = zigzag_rank(cu, 24, 2, 1)  # rows 6..11 and 12..17
    q_rank = q[rows.to(device)].requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    torch.library.opcheck(split._split_attention_op,
                          (q_rank, k, v, cu_q.to(device), cu, positions.to(device), 6, 12, 0.2,
                           backend))


def _good():
    q, k, v, cu = packed_row([4, 4], 0, 4, 2, 32, torch.float32, "cpu")
    # rank-like: rows 2, 3 of document 0 and row 6 of document 1
    return dict(q=q[:3], k=k, v=v, cu_seqlens_q=torch.tensor([0, 2, 3], dtype=torch.int32),
                cu_seqlens_k=cu, q_positions=torch.tensor([2, 3, 6], dtype=torch.int32),
                max_seqlen_q=2, max_seqlen_k=4)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(q=a["q"][None]), "q must be (total_tokens, heads, head_dim)"),
    (lambda a: a.update(q=a["q"][..., :16]), "must agree on head_dim"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)),
     "cu_seqlens_q and cu_seqlens_k must have the same length"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].long()), "cu_seqlens_k must be a 1-D int32"),
    (lambda a: a.update(q_positions=a["q_positions"].long()), "q_positions must be an int32"),
    (lambda a: a.update(q_positions=a["q_positions"][:2]), "shape (Tq,) = (3,)"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)),
     "cu_seqlens_q must start at 0, never decrease and end at or before Tq=3"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)),
     "end at or before Tk=8"),
    (lambda a: a.update(q_positions=torch.tensor([2, 4, 6], dtype=torch.int32)),
     "q_positions[1] = 4 lies outside its document's keys [0, 4)"),
    (lambda a: a.update(q_positions=torch.tensor([3, 2, 6], dtype=torch.int32)),
     "q_positions must strictly increase within a segment"),
    (lambda a: a.update(max_seqlen_k=-1), "max_seqlen_k"),
    (lambda a: a.update(max_seqlen_q=2.0), "max_seqlen_q"),
    (lambda a: a.update(softmax_scale=float("inf")), "softmax_scale"),
    (lambda a: a.update(backend="cuda"), "unknown backend"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=re.escape(message)):
        split_varlen_attention(**args)


def test_good_arguments_pass_and_positions_may_jump():
    args = _good()
    out = split_varlen_attention(**args, backend="torch")
    q, k, v = args["q"], args["k"], args["v"]
    # row 2 of the 4-token document 1 (key row 6) sees keys 4..6
    want = torch.nn.functional.scaled_dot_product_attention(
        q[2:3].transpose(0, 1), k[4:7].repeat_interleave(2, 1).transpose(0, 1),
        v[4:7].repeat_interleave(2, 1).transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(out[2:3], want, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# The kernels compile for sm_80 and sm_90 in every autotune config and fit shared memory
# ---------------------------------------------------------------------------------------------

SPLIT_KERNELS = {"fwd": "_split_fwd_kernel", "dkdv": "_split_dkdv_kernel",
                 "dq": "_split_dq_kernel"}
_POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "QPOS": "*i32",
             "TABLE": "*i32"}


def split_job(name, config, head_dim, arch, dtype):
    kernel = SPLIT_KERNELS[name]
    constexprs = dict(HEAD_DIM=head_dim, DOT_PRECISION="tf32", **config.kwargs)
    signature = {}
    for arg in getattr(split, kernel).arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("qk_scale", "sm_scale"):
            signature[arg] = "fp32"
        elif arg.isupper():
            signature[arg] = _POINTERS.get(arg, "*" + dtype)
        else:
            signature[arg] = "i32"
    return {"module": split.__name__, "kernel": kernel, "dtype": dtype, "arch": arch,
            "signature": signature, "constexprs": constexprs, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "expect_wgmma": True}


@pytest.mark.slow
def test_every_autotune_config_compiles_and_fits():
    # fp16 and bf16 alternate over (chip, head dim), as in test_attention_compile.py
    jobs = [split_job(name, config, head_dim, arch,
                      "fp16" if (arch == ARCHS[0]) == (head_dim == 64) else "bf16")
            for name in SPLIT_KERNELS for head_dim in (64, 128)
            for config in attn.AUTOTUNE_CONFIGS[name][head_dim] for arch in ARCHS]
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)


@pytest.mark.slow
def test_one_node_under_torch_compile_fullgraph():
    q, k, v, cu = packed_row([20, 9], 3, 2, 1, 32, torch.float32, "cpu")
    rows, cu_q, positions = zigzag_rank(cu, q.shape[0], 2, 1)
    q_rank = q[rows]

    def step(q_, k_, v_):
        return split_varlen_attention(q_, k_, v_, cu_q, cu, positions, 8, 20).square().sum()

    inputs = [t.clone().requires_grad_() for t in (q_rank, k, v)]
    compiled_inputs = [t.clone().requires_grad_() for t in (q_rank, k, v)]
    grads = torch.autograd.grad(step(*inputs), inputs)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(*compiled_inputs), compiled_inputs)
    for g, c in zip(grads, compiled_grads):
        torch.testing.assert_close(c, g)
