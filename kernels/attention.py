"""Packed-sequence (varlen) causal flash attention: Triton forward and backward, plus the reference.

Layout is flash-attn's `flash_attn_varlen_func`: q is (total_tokens, Hq, D), k and v are
(total_tokens, Hkv, D) with Hq a multiple of Hkv (GQA, MQA), and int32 `cu_seqlens` marks where each
document starts and ends in the flattened token axis. No token attends across a document boundary.

Work is scheduled per (document, block) item, not per padded square row: a small device-side table
lists the items (heaviest first, so that long documents do not form the tail of the grid) and each
program walks only its own document's keys up to the causal limit. The grid is an upper bound on
the item count (total_tokens // BLOCK + documents + 1) so that nothing waits on the host; surplus
programs exit at once. Tokens after the last document form one extra "tail" segment whose
programs write zeros, so no output or gradient is left uninitialised.

Forward: online softmax in base 2 with the softmax scale folded into the exponent; the row
log-sum-exp (base 2) is kept for the backward. Backward: a small kernel for
delta = rowsum(dO * O), a dK/dV kernel (one program per key block and KV head, looping over the
query heads of its GQA group, so no atomics and no repeated K/V), and a dQ kernel. Causal masks
are applied only on the blocks that straddle the diagonal.
"""
import math
import numbers
import weakref

import torch
import torch.nn.functional as F

from ._triton_compat import (
    HAS_TRITON,
    device_guard,
    resolve_backend,
    tl,
    triton,
    unit_stride,
)

SUPPORTED_HEAD_DIMS = (32, 64, 128)
BACKENDS = ("auto", "triton", "torch")
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Integer arguments that change from batch to batch: Triton would otherwise compile a variant per
# divisibility-by-16 pattern of their values (and the autotuner cannot tell the variants apart).
_RUNTIME_INTS = ["num_docs", "total_tokens", "table_stride", "seq_bucket"]


# Every kernel reads its work item from the table row of its block size: the autotuner picks the
# block size only at launch, so the host fills one row per candidate size.
@triton.jit
def _work_item(TABLE, table_stride, BLOCK: tl.constexpr):
    # Rows hold block sizes 16, 32, 64, 128 in that order.
    row = (BLOCK >= 32) + (BLOCK >= 64) + (BLOCK >= 128)
    entry = TABLE + row * table_stride + 2 * tl.program_id(0)
    return tl.load(entry), tl.load(entry + 1)


# The prologue the three kernels share, after the surplus programs (doc < 0) have left: the
# helpers below are inlined by Triton, so the kernels compile to the code they had when each
# spelled it out.
@triton.jit
def _block_of_segment(CU, doc, blk, BLOCK: tl.constexpr):
    """Item `blk` of segment `doc`: the segment's first token (int64, since token * stride passes
    2**31 in long packed batches), its length, the block's first row, its rows and which of
    them lie inside the segment."""
    start = tl.load(CU + doc)
    seqlen = tl.load(CU + doc + 1) - start
    block_start = blk * BLOCK
    offs = block_start + tl.arange(0, BLOCK)
    return start.to(tl.int64), seqlen, block_start, offs, offs < seqlen


@triton.jit
def _head_base(BASE, start64, head, stride_t, stride_h):
    # The segment's first token in one head of a (tokens, heads, D) tensor.
    return BASE + start64 * stride_t + head * stride_h


@triton.jit
def _tile_ptrs(BASE, start64, head, stride_t, stride_h, offs, HEAD_DIM: tl.constexpr):
    # Rows `offs` of the segment in one head, every column (the head dim has unit stride).
    return (_head_base(BASE, start64, head, stride_t, stride_h) + offs[:, None] * stride_t
            + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _head_rows(BASE, head, total_tokens, start64):
    # The segment's first entry in one head's row of a (heads, tokens) fp32 tensor (LSE, DELTA).
    return BASE + head.to(tl.int64) * total_tokens + start64


@triton.jit
def _store_zero_tile(ptrs, ok, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    # The tail segment after the last document gets defined zeros, never stale memory.
    tl.store(ptrs, tl.zeros([ROWS, HEAD_DIM], ptrs.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _key_ranges(m_start, seqlen, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Keys a query block visits: whole unmasked key blocks in [0, full_end), then the masked
    ones (diagonal, end of document) in [full_end, masked_end)."""
    if CAUSAL:
        full_end = (m_start // BLOCK_N) * BLOCK_N
        masked_end = tl.minimum(m_start + BLOCK_M, seqlen)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        masked_end = seqlen
    return full_end, masked_end


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen,
                    qk_scale, lo, hi,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n < seqlen)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            keep = offs_n[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            # qk_scale > 0, so scaling the row maximum equals the maximum of the scaled row.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.exp2(qk)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n < seqlen)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_fwd_kernel(Q, K, V, O, LSE, CU, TABLE,
                     qk_scale, num_docs, total_tokens, table_stride, group, seq_bucket,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    doc, blk = _work_item(TABLE, table_stride, BLOCK_M)
    if doc < 0:  # surplus program of the upper-bound grid
        return
    head = tl.program_id(1)
    start64, seqlen, m_start, offs_m, row_ok = _block_of_segment(CU, doc, blk, BLOCK_M)
    o_ptrs = _tile_ptrs(O, start64, head, stride_ot, stride_oh, offs_m, HEAD_DIM)
    if doc == num_docs:  # tokens after the last document: defined zeros
        _store_zero_tile(o_ptrs, row_ok, BLOCK_M, HEAD_DIM)
        return

    kv_head = head // group
    q = tl.load(_tile_ptrs(Q, start64, head, stride_qt, stride_qh, offs_m, HEAD_DIM),
                mask=row_ok[:, None], other=0.0)
    k_base = _head_base(K, start64, kv_head, stride_kt, stride_kh)
    v_base = _head_base(V, start64, kv_head, stride_vt, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, masked_end = _key_ranges(m_start, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
    # Every row sees key 0 in the first block it visits, so m_i is finite before any fully
    # masked block comes along and exp2(m_i - m_new) never meets inf - inf.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                    seqlen, qk_scale, 0, full_end,
                                    HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                    seqlen, qk_scale, full_end, masked_end,
                                    HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(_head_rows(LSE, head, total_tokens, start64) + offs_m, m_i + tl.log2(l_i),
             mask=row_ok)


@triton.jit(do_not_specialize=["total_tokens"])
def _attn_bwd_delta_kernel(O, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < total_tokens
    rows = offs_t.to(tl.int64)
    o = tl.load(O + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    do = tl.load(DO + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total_tokens + offs_t, delta, mask=ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                         stride_dot, stride_doh, total_tokens, offs_n, seqlen, qk_scale,
                         m_lo, num_m, group,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    # One flat loop over (query head of the GQA group, query block): a loop nest here kept more
    # state alive and spilled registers at head_dim 128, and the flat loop also keeps the
    # software pipeline full across head changes.
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(0, group * num_m):
        g = it // num_m
        start_m = m_lo + (it - g * num_m) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen
        q = tl.load(q_base + g * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        # An infinite log-sum-exp zeroes the probabilities of rows past the document's end.
        lse = tl.load(lse_base + g * total_tokens + offs_m, mask=row_ok, other=float("inf"))
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                      - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_base + g * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + g * total_tokens + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, TABLE,
                          qk_scale, sm_scale, num_docs, total_tokens, table_stride, group,
                          seq_bucket,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    doc, blk = _work_item(TABLE, table_stride, BLOCK_N)
    if doc < 0:
        return
    kv_head = tl.program_id(1)
    start64, seqlen, n_start, offs_n, col_ok = _block_of_segment(CU, doc, blk, BLOCK_N)
    dk_ptrs = _tile_ptrs(DK, start64, kv_head, stride_dkt, stride_dkh, offs_n, HEAD_DIM)
    dv_ptrs = _tile_ptrs(DV, start64, kv_head, stride_dvt, stride_dvh, offs_n, HEAD_DIM)
    if doc == num_docs:
        _store_zero_tile(dk_ptrs, col_ok, BLOCK_N, HEAD_DIM)
        _store_zero_tile(dv_ptrs, col_ok, BLOCK_N, HEAD_DIM)
        return

    k = tl.load(_tile_ptrs(K, start64, kv_head, stride_kt, stride_kh, offs_n, HEAD_DIM),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_tile_ptrs(V, start64, kv_head, stride_vt, stride_vh, offs_n, HEAD_DIM),
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first_head = kv_head * group  # the GQA group's query heads follow it
    q_base = _head_base(Q, start64, first_head, stride_qt, stride_qh)
    do_base = _head_base(DO, start64, first_head, stride_dot, stride_doh)
    lse_base = _head_rows(LSE, first_head, total_tokens, start64)
    delta_base = _head_rows(DELTA, first_head, total_tokens, start64)
    if CAUSAL:
        # Query blocks that straddle this key block's diagonal (masked), then the ones wholly
        # below it; queries above the diagonal never see these keys.
        diag_lo = (n_start // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(n_start + BLOCK_N, seqlen)
        full_lo = diag_lo + tl.cdiv(diag_hi - diag_lo, BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      stride_qt, stride_qh, stride_dot, stride_doh, total_tokens,
                                      offs_n, seqlen, qk_scale, diag_lo,
                                      (full_lo - diag_lo) // BLOCK_M, group,
                                      HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    else:
        full_lo = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                  stride_qt, stride_qh, stride_dot, stride_doh, total_tokens,
                                  offs_n, seqlen, qk_scale, full_lo,
                                  tl.cdiv(seqlen - full_lo, BLOCK_M), group,
                                  HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen,
                       qk_scale, lo, hi,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n < seqlen)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n < seqlen)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                    - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, TABLE,
                        qk_scale, sm_scale, num_docs, total_tokens, table_stride, group, seq_bucket,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    doc, blk = _work_item(TABLE, table_stride, BLOCK_M)
    if doc < 0:
        return
    head = tl.program_id(1)
    start64, seqlen, m_start, offs_m, row_ok = _block_of_segment(CU, doc, blk, BLOCK_M)
    dq_ptrs = _tile_ptrs(DQ, start64, head, stride_dqt, stride_dqh, offs_m, HEAD_DIM)
    if doc == num_docs:
        _store_zero_tile(dq_ptrs, row_ok, BLOCK_M, HEAD_DIM)
        return

    kv_head = head // group
    q = tl.load(_tile_ptrs(Q, start64, head, stride_qt, stride_qh, offs_m, HEAD_DIM),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, start64, head, stride_dot, stride_doh, offs_m, HEAD_DIM),
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(_head_rows(LSE, head, total_tokens, start64) + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(_head_rows(DELTA, head, total_tokens, start64) + offs_m, mask=row_ok,
                    other=0.0)
    k_base = _head_base(K, start64, kv_head, stride_kt, stride_kh)
    v_base = _head_base(V, start64, kv_head, stride_vt, stride_vh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, masked_end = _key_ranges(m_start, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                            seqlen, qk_scale, 0, full_end,
                            HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                            seqlen, qk_scale, full_end, masked_end,
                            HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# Autotune configs per kernel and head-dim class (64 covers 32 and 64), as (BLOCK_M, BLOCK_N,
# num_warps, num_stages). Chosen from the compiled code without a GPU (ptxas registers and spills,
# software-pipelined loads, wgmma on sm_90) and the shared memory of sm_80/sm_90:
# tests/test_attention_compile.py compiles every one for both chips in fp16 and bf16, and
# benchmarks/results/ptxas_sm90.md lists the figures. Three configs that spilled on sm_90 gave way
# to their nearest clean neighbour: the forward's (128, 64, 4 warps) at head dim 64 (255
# registers with one warpgroup over 128 rows) became 8 warps; at head dim 128 (128, 128, 8, 2)
# became (128, 32, 8, 3) and (64, 64, 4, 3), which spilled on sm_80, 8 warps; the dK/dV
# (32, 128) at head dim 128 became (16, 128).
def _configs(*shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


AUTOTUNE_CONFIGS = {
    "fwd": {64: _configs((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
            128: _configs((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3))},
    "dkdv": {64: _configs((32, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 3)),
             128: _configs((32, 64, 8, 3), (64, 64, 8, 3), (16, 128, 8, 3))},
    "dq": {64: _configs((128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
           128: _configs((128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3))},
}


def _spill_label(head_dim, block_m, block_n, num_warps, num_stages):
    # A causal config as rega_engine.kernels.compile_check.config_label spells it.
    return (f"HEAD_DIM={head_dim},CAUSAL=True,DOT_PRECISION=tf32,BLOCK_M={block_m},"
            f"BLOCK_N={block_n},num_warps={num_warps},num_stages={num_stages}")


# The register spills ptxas reports for the configs above, each with why the config stays; the
# compile tests fail on any spill missing here and on an entry that no longer spills. Key:
# (kernel, "sm_<arch>", config label). All are sm_80 only: the lists are tuned for sm_90, where
# wgmma reads its operands from shared memory, while sm_80's mma holds them in registers, so the
# biggest tiles pass 255 registers there. An A100 autotunes each against the clean configs of the
# same list, so such a spill costs time only where the config still measures fastest.
_SM80_ONLY = "sm_80 only; clean on sm_90"
KNOWN_SPILLS = {
    ("_attn_fwd_kernel", "sm_80", _spill_label(128, 128, 64, 8, 3)):
        f"80 B; {_SM80_ONLY} (228 registers), the forward's main tile there",
    ("_attn_bwd_dkdv_kernel", "sm_80", _spill_label(64, 64, 128, 8, 3)):
        f"4 B, one register; {_SM80_ONLY} (231 registers), the largest dK/dV tile at d=64",
    ("_attn_bwd_dkdv_kernel", "sm_80", _spill_label(128, 16, 128, 8, 3)):
        f"8 B; {_SM80_ONLY} (238 registers), the one 128-key dK/dV tile at d=128 (no 128-key "
        "config is clean on both chips)",
    ("_attn_bwd_dq_kernel", "sm_80", _spill_label(128, 128, 64, 8, 3)):
        f"84 B; {_SM80_ONLY} (247 registers), the largest dQ tile at d=128",
}


def _head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def _pruner(kernel_name: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        return AUTOTUNE_CONFIGS[kernel_name][_head_dim_class(head_dim)]
    return prune


def _autotuned(kernel, kernel_name: str):
    # The key carries the head dim, causality, GQA group and a coarse max_seqlen bucket; the
    # autotuner adds the tensors' dtypes itself.
    every = [c for configs in AUTOTUNE_CONFIGS[kernel_name].values() for c in configs]
    return triton.autotune(configs=every, key=["HEAD_DIM", "CAUSAL", "group", "seq_bucket"],
                           prune_configs_by={"early_config_prune": _pruner(kernel_name)})(kernel)


if HAS_TRITON:
    _attn_fwd_tuned = _autotuned(_attn_fwd_kernel, "fwd")
    _attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv_kernel, "dkdv")
    _attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq_kernel, "dq")
    # Kernels built while TRITON_INTERPRET=1 was set run in the interpreter, whatever the
    # environment says later (test modules of other kernels may set it after this import).
    INTERPRETED = not isinstance(_attn_fwd_kernel, triton.runtime.jit.JITFunction)
else:
    INTERPRETED = False

# Under TRITON_INTERPRET=1 autotuning would run every config; the interpreter uses these fixed,
# small blocks instead. BLOCK_M != BLOCK_N on purpose, so both diagonal layouts get exercised.
INTERPRETER_BLOCKS = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 16},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 16},
}
_DELTA_BLOCK_T = 64
_TABLE_BLOCKS = (16, 32, 64, 128)  # row order of the work table, see _work_item


# ----------------------------------------------------------------------------------------------
# Work tables (device side, no host synchronisation)
# ----------------------------------------------------------------------------------------------

def _extended_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """cu_seqlens plus a final entry `total_tokens` (the zero-filled tail segment), forced into
    [0, total_tokens] and non-decreasing so that bad values on the GPU (which are not checked
    there, as that would synchronise) can never make a kernel read or write out of bounds."""
    cu = cu_seqlens.to(torch.int64).clamp(0, total_tokens)
    tail = torch.full((1,), total_tokens, dtype=torch.int64, device=cu.device)
    return torch.cummax(torch.cat([cu, tail]), 0).values.to(torch.int32)


def _build_work_table(cu_ext: torch.Tensor, total_tokens: int, blocks, side: str,
                      causal: bool, work_of=None) -> torch.Tensor:
    """Rows of (segment, block) items, one row per block size of `_TABLE_BLOCKS` (only the rows
    for `blocks` are filled). Segment `num_docs` is the tail after the last document; -1 marks a
    surplus item. Items are ordered by estimated work, largest first, so that the long causal
    blocks start early and the grid does not end on a straggler. work_of(seg, blk, block,
    seg_len), if given, estimates the work of the items instead of `side` and `causal`."""
    num_docs = cu_ext.numel() - 2
    capacity = total_tokens // min(_TABLE_BLOCKS) + num_docs + 1
    table = torch.full((len(_TABLE_BLOCKS), capacity, 2), -1, dtype=torch.int32,
                       device=cu_ext.device)
    starts = cu_ext[:-1].to(torch.int64)
    lengths = cu_ext[1:].to(torch.int64) - starts
    for block in sorted(set(blocks)):
        num_items = total_tokens // block + num_docs + 1  # >= sum(ceil(len / block))
        blocks_per_seg = (lengths + block - 1) // block
        ends = torch.cumsum(blocks_per_seg, 0)
        item = torch.arange(num_items, device=cu_ext.device)
        seg = torch.searchsorted(ends, item, right=True)
        valid = seg <= num_docs
        seg = seg.clamp(max=num_docs)
        blk = item - (ends[seg] - blocks_per_seg[seg])
        seg_len = lengths[seg]
        if work_of is not None:
            work = work_of(seg, blk, block, seg_len)
        elif not causal:
            work = seg_len
        elif side == "q":  # a query block reads keys up to its own end
            work = torch.minimum((blk + 1) * block, seg_len)
        else:  # a key block is read by every query from its start to the document's end
            work = seg_len - blk * block
        work = torch.where(seg == num_docs, 0, work)
        work = torch.where(valid, work, -1)
        order = torch.argsort(work, descending=True, stable=True)
        rows = torch.stack([torch.where(valid, seg, -1), torch.where(valid, blk, 0)], 1)
        table[_TABLE_BLOCKS.index(block), :num_items] = rows[order].to(torch.int32)
    return table


class _TableCache:
    """Remembers the tables of the last few cu_seqlens tensors: every layer of a model step sees
    the same cu_seqlens, so the tables are built once per step instead of once per call. Entries
    hold the tensor weakly and check its version counter, so a freed or edited tensor never hits."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: dict = {}

    def get(self, cu_seqlens: torch.Tensor, total_tokens: int, blocks, side: str, causal: bool):
        def build():
            cu_ext = _extended_cu_seqlens(cu_seqlens, total_tokens)
            return cu_ext, _build_work_table(cu_ext, total_tokens, blocks, side, causal)
        return self.lookup((cu_seqlens,), (total_tokens, tuple(sorted(set(blocks))), side, causal),
                           build)

    def lookup(self, tensors, key, build):
        """build()'s value for these tensors (as they are now) and the hashable `key`."""
        key = (*(id(t) for t in tensors), *key)
        hit = self.entries.get(key)
        if hit is not None:
            refs, versions, value = hit
            if all(r() is t and version == t._version
                   for r, version, t in zip(refs, versions, tensors)):
                return value
        value = build()
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = ([weakref.ref(t) for t in tensors], [t._version for t in tensors],
                             value)
        return value


_TABLES = _TableCache()


def _table_blocks(kernel_name: str, block_name: str, head_dim: int):
    """The block sizes a kernel may launch with, hence the work-table rows it needs."""
    if INTERPRETED:
        return (INTERPRETER_BLOCKS[kernel_name][block_name],)
    return tuple(c.kwargs[block_name]
                 for c in AUTOTUNE_CONFIGS[kernel_name][_head_dim_class(head_dim)])


def _seq_bucket(max_seqlen: int) -> int:
    """Coarse autotune bucket: powers of 4 from 256 to 16384."""
    bucket = 256
    while bucket < max_seqlen and bucket < 16384:
        bucket *= 4
    return bucket


def _launch(tuned, plain, grid_of, args, constexprs, interpreter_kernel):
    if INTERPRETED:
        blocks = INTERPRETER_BLOCKS[interpreter_kernel]
        plain[grid_of(blocks)](*args, **constexprs, **blocks, num_warps=4, num_stages=1)
    else:
        tuned[grid_of](*args, **constexprs)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs exist for testing: keep them exact instead of silently rounding to tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
    total, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    cu_ext, table = _TABLES.get(cu_seqlens, total, _table_blocks("fwd", "BLOCK_M", head_dim),
                                "q", causal)
    num_docs = cu_seqlens.numel() - 1
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # zeros, not empty: the tail tokens after the last document get a defined value (opcheck
    # and the compiled graph compare it), for a memset of heads x tokens x 4 bytes
    lse = torch.zeros((num_heads, total), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, cu_ext, table,
            sm_scale * _LOG2E, num_docs, total, table.stride(0), group, _seq_bucket(max_seqlen),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1))
    constexprs = dict(HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype))
    _launch(_attn_fwd_tuned, _attn_fwd_kernel,
            lambda meta: (total // meta["BLOCK_M"] + num_docs + 1, num_heads),
            args, constexprs, "fwd")
    return o, lse


def _attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, sm_scale,
                        need_dq, need_dkdv):
    total, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_docs = cu_seqlens.numel() - 1
    delta = torch.empty((num_heads, total), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total, _DELTA_BLOCK_T), num_heads)](
        o, do, delta, total, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=_DELTA_BLOCK_T, num_warps=4)
    constexprs = dict(HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype))
    common = (sm_scale * _LOG2E, sm_scale, num_docs, total)
    bucket = _seq_bucket(max_seqlen)
    dq = dk = dv = None
    if need_dkdv:
        cu_ext, table = _TABLES.get(cu_seqlens, total,
                                    _table_blocks("dkdv", "BLOCK_N", head_dim), "kv", causal)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        args = (q, k, v, do, lse, delta, dk, dv, cu_ext, table, *common,
                table.stride(0), group, bucket,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1))
        _launch(_attn_bwd_dkdv_tuned, _attn_bwd_dkdv_kernel,
                lambda meta: (total // meta["BLOCK_N"] + num_docs + 1, num_kv_heads),
                args, constexprs, "dkdv")
    if need_dq:
        cu_ext, table = _TABLES.get(cu_seqlens, total,
                                    _table_blocks("dq", "BLOCK_M", head_dim), "q", causal)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        args = (q, k, v, do, lse, delta, dq, cu_ext, table, *common,
                table.stride(0), group, bucket,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1))
        _launch(_attn_bwd_dq_tuned, _attn_bwd_dq_kernel,
                lambda meta: (total // meta["BLOCK_M"] + num_docs + 1, num_heads),
                args, constexprs, "dq")
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# The PyTorch path (the "torch" backend): short documents grouped under a block-diagonal mask
# ----------------------------------------------------------------------------------------------

# Documents shorter than this are attended in groups (one attention call per group, a
# block-diagonal mask): on a CPU, a call per 20-token document costs far more in overhead than
# the few extra masked scores, and short SFT samples are the common case.
GROUP_TOKENS = 128


def _document_groups(offsets: list[int], group_tokens: int) -> list[tuple[int, int]]:
    """Runs [i, j) of consecutive documents spanning at most group_tokens tokens each (a longer
    document is a run of its own); empty documents are skipped."""
    runs, i, n = [], 0, len(offsets) - 1
    while i < n:
        if offsets[i + 1] == offsets[i]:
            i += 1
            continue
        j = i + 1
        while j < n and offsets[j + 1] - offsets[i] <= group_tokens:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _group_spans(cu_seqlens: torch.Tensor, group_tokens: int):
    """(start, end, additive mask or None) per document group; the mask (a float tensor, -inf
    across documents, causality left to the kernel) only for groups of several documents."""
    offsets = cu_seqlens.tolist()
    for i, j in _document_groups(offsets, group_tokens):
        start, end = offsets[i], offsets[j]
        bounds = None
        if j - i > 1:
            bounds = torch.tensor(offsets[i + 1:j]) - start
        yield start, end, bounds


def _block_diagonal_mask(bounds, length, causal, dtype, device):
    position = torch.arange(length, device=device)
    document = torch.bucketize(position, bounds.to(device), right=True)
    allowed = document[:, None] == document[None, :]
    if causal:
        allowed &= position[:, None] >= position[None, :]
    return torch.zeros((length, length), dtype=dtype, device=device).masked_fill_(~allowed,
                                                                                float("-inf"))


def _heads_first(t, start, end, repeat):
    # (len, heads, D) slice -> (1, heads * repeat, len, D), the layout of the aten kernels, as
    # a dense copy: the CPU flash kernels get the plain layout SDPA gives them most often
    t = t[start:end].transpose(0, 1)
    if repeat > 1:
        t = t.repeat_interleave(repeat, 0)
    return t.contiguous()[None]


def _math_attention(q, k, v, mask, causal, scale):
    """(out, natural-log lse) of (1, H, n, D) inputs, fp32 softmax; for devices without the CPU
    flash kernel (backend="torch" on a GPU is a reference, not a fast path)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    elif causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device)
                                    .triu_(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None])
    return (probs @ v.float()).to(q.dtype), lse, probs


def _attend(q, k, v, mask, causal, scale):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal and mask is None, attn_mask=mask, scale=scale)
    out, lse, _ = _math_attention(q, k, v, mask, causal and mask is None, scale)
    return out, lse


def _attend_backward(do, q, k, v, out, lse, mask, causal, scale):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal and mask is None, attn_mask=mask, scale=scale)
    _, _, probs = _math_attention(q, k, v, mask, causal and mask is None, scale)
    dof = do.float()
    dv = probs.transpose(-1, -2) @ dof
    dp = dof @ v.float().transpose(-1, -2)
    ds = probs * (dp - (dof * out.float()).sum(-1, keepdim=True)) * scale
    return (ds @ k.float()).to(q.dtype), (ds.transpose(-1, -2) @ q.float()).to(k.dtype), \
        dv.to(v.dtype)


def _torch_forward(q, k, v, cu_seqlens, causal, scale, group_tokens=GROUP_TOKENS):
    """(out (T, Hq, D), lse (Hq, T) fp32, natural log): one aten flash-attention call per
    document group, on the CPU the same kernel F.scaled_dot_product_attention picks there."""
    repeat = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)
    lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for start, end, bounds in _group_spans(cu_seqlens, group_tokens):
        mask = None if bounds is None else _block_diagonal_mask(bounds, end - start, causal,
                                                                q.dtype, q.device)
        o, l = _attend(_heads_first(q, start, end, 1), _heads_first(k, start, end, repeat),
                       _heads_first(v, start, end, repeat), mask, causal, scale)
        out[start:end] = o[0].transpose(0, 1)
        lse[:, start:end] = l[0]
    return out, lse


def _torch_backward(do, q, k, v, out, lse, cu_seqlens, causal, scale,
                    group_tokens=GROUP_TOKENS):
    repeat = q.shape[1] // k.shape[1]
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for start, end, bounds in _group_spans(cu_seqlens, group_tokens):
        mask = None if bounds is None else _block_diagonal_mask(bounds, end - start, causal,
                                                                q.dtype, q.device)
        gq, gk, gv = _attend_backward(
            _heads_first(do, start, end, 1), _heads_first(q, start, end, 1),
            _heads_first(k, start, end, repeat), _heads_first(v, start, end, repeat),
            _heads_first(out, start, end, 1), lse[None, :, start:end].contiguous(), mask, causal,
            scale)
        dq[start:end] = gq[0].transpose(0, 1)
        n, kv_heads = end - start, k.shape[1]
        # the query heads of a GQA group share their K/V head: their gradients add up
        dk[start:end] = gk[0].view(kv_heads, repeat, n, -1).sum(1).transpose(0, 1)
        dv[start:end] = gv[0].view(kv_heads, repeat, n, -1).sum(1).transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops: fake implementations and autograd
# ----------------------------------------------------------------------------------------------
# One opaque node for torch.compile: Dynamo never traces the work-table cache, the autotuned
# launches or the host-side grouping, so a compiled block or model is one graph, and neither the
# number of documents (cu_seqlens' length) nor their lengths recompile it. max_seqlen is a
# SymInt: a dynamic value is accepted without a recompile.

@torch.library.custom_op("rega::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                         softmax_scale: float, backend: str,
                         group_tokens: int = GROUP_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, Hq, D), lse (Hq, T) fp32); lse is the backend's own (base 2 for Triton, natural
    for torch) and only meant for the backward op. group_tokens: the torch path's grouping."""
    if backend == "triton":
        if q.shape[0] == 0:
            return q.new_empty(q.shape), q.new_empty((q.shape[1], 0), dtype=torch.float32)
        q, k, v = (unit_stride(t) for t in (q, k, v))
        with device_guard(q):
            return _attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    return _torch_forward(q, k, v, cu_seqlens, causal, softmax_scale, group_tokens)


@torch.library.custom_op("rega::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                                  softmax_scale: float, need_dq: bool, need_dkdv: bool,
                                  backend: str, group_tokens: int = GROUP_TOKENS
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's out and lse; a gradient not asked for (need_dq,
    need_dkdv) comes back as an empty (0,) tensor and, on the Triton path, costs nothing."""
    if backend == "triton" and q.shape[0] > 0:
        q, k, v, out, do = (unit_stride(t) for t in (q, k, v, out, do))
        with device_guard(q):
            dq, dk, dv = _attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                             causal, softmax_scale, need_dq, need_dkdv)
    elif backend == "triton":
        dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    else:
        dq, dk, dv = _torch_backward(do, q, k, v, out, lse, cu_seqlens, causal, softmax_scale,
                                     group_tokens)
    return (dq if need_dq else q.new_empty(0), dk if need_dkdv else k.new_empty(0),
            dv if need_dkdv else v.new_empty(0))


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, backend, group_tokens=GROUP_TOKENS):
    return (q.new_empty(q.shape),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@_varlen_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, need_dq, need_dkdv,
      backend, group_tokens=GROUP_TOKENS):
    return (q.new_empty(q.shape if need_dq else (0,)),
            k.new_empty(k.shape if need_dkdv else (0,)),
            v.new_empty(v.shape if need_dkdv else (0,)))


def _setup_varlen_attention(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, backend, group_tokens = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, causal, softmax_scale)
    ctx.backend, ctx.group_tokens = backend, group_tokens


def _backward_varlen_attention(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv = _varlen_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens, *ctx.args,
                                               need_dq, need_dkdv, ctx.backend, ctx.group_tokens)
    return (dq if need_dq else None, dk if need_dkdv else None, dv if need_dkdv else None,
            None, None, None, None, None, None)


_varlen_attention_op.register_autograd(_backward_varlen_attention,
                                       setup_context=_setup_varlen_attention)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _check_qkv(q, k, v, others, who: str, same_tokens: bool = True) -> None:
    """Shapes and dtypes of q, k and v, and that q, k, v and the named tensors in `others`
    ((name, value) pairs) are tensors."""
    for name, t in (("q", q), ("k", k), ("v", v), *others):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{who}: {name} must be (total_tokens, heads, head_dim), got shape "
                             f"{tuple(t.shape)}; flatten (batch, seq) into one token axis first")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if same_tokens and (q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]):
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         "total_tokens (dim 0) and head_dim (dim 2)")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         "head_dim (dim 2)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{who}: query heads ({q.shape[1]}) must be a positive multiple of "
                         f"key/value heads ({k.shape[1]}) for grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{who}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{who}: dtype {q.dtype} is not supported; use bfloat16, float16 or "
                         "float32")


def _check_offsets_tensor(cu, name: str, who: str) -> None:
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{who}: {name} must be a 1-D int32 tensor of documents + 1 offsets, "
                         f"got dtype {cu.dtype} and shape {tuple(cu.shape)}; "
                         "use .to(torch.int32)")


def _check_max_seqlen(value, name: str, who: str) -> None:
    if (isinstance(value, bool)
            or not isinstance(value, (numbers.Integral, torch.SymInt)) or value < 0):
        raise ValueError(f"{who}: {name} must be a non-negative int (the longest document), "
                         f"got {value!r}; a tensor would need .item(), which synchronises "
                         "on the GPU, so compute it on the host")


def _values_checkable(t: torch.Tensor) -> bool:
    # Free to check on the CPU; on the GPU it would cost a synchronisation per call, and under
    # torch.compile reading values would break the graph.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_offset_values(offsets: list, name: str, total: int, total_name: str,
                         who: str) -> None:
    if offsets[0] != 0 or offsets[-1] > total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{who}: {name} must start at 0, never decrease and end at or "
                         f"before {total_name}={total}, got {offsets[:8]}"
                         f"{'...' if len(offsets) > 8 else ''} (last {offsets[-1]})")


def _softmax_scale(softmax_scale, head_dim: int, who: str) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(softmax_scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{who}: softmax_scale must be a positive finite number, got "
                         f"{softmax_scale!r}")
    return scale


def _check_arguments(q, k, v, cu_seqlens, max_seqlen, softmax_scale, who: str) -> float:
    """Validate shapes, dtypes and devices (never values on the GPU: that would synchronise);
    return the softmax scale to use."""
    _check_qkv(q, k, v, [("cu_seqlens", cu_seqlens)], who)
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"{who}: q, k, v and cu_seqlens must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}, {cu_seqlens.device}")
    _check_offsets_tensor(cu_seqlens, "cu_seqlens", who)
    _check_max_seqlen(max_seqlen, "max_seqlen", who)
    if _values_checkable(cu_seqlens):
        _check_offset_values(cu_seqlens.tolist(), "cu_seqlens", q.shape[0], "total_tokens", who)
    return _softmax_scale(softmax_scale, q.shape[2], who)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = True, softmax_scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over documents packed along one token axis (flash-attn's varlen layout).

    q: (total_tokens, Hq, D); k, v: (total_tokens, Hkv, D) with Hq % Hkv == 0.
    cu_seqlens: int32 (documents + 1,), cu_seqlens[0] == 0, non-decreasing, last <= total_tokens.
    max_seqlen: the longest document (an autotuning hint; it never limits what is computed).
    Returns (total_tokens, Hq, D) in q's dtype; tokens after cu_seqlens[-1] get zeros.

    backend: "auto" runs Triton on CUDA tensors and the PyTorch path elsewhere; "triton" forces
    the kernel (CPU tensors need TRITON_INTERPRET=1); "torch" forces the PyTorch path (short
    documents grouped, one aten attention call per group: the reference's result, fast on a
    CPU). Either way it is the custom op `rega::varlen_attention` with its fake and autograd:
    torch.compile keeps it as one node (fullgraph), and neither the number of documents nor
    their lengths recompile a graph around it (max_seqlen may be a SymInt).
    cu_seqlens values are checked on CPU only: on the GPU a check would synchronise, so there bad
    offsets are clamped into range instead (no out-of-bounds access, but meaningless output).
    """
    who = "varlen_attention"
    scale = _check_arguments(q, k, v, cu_seqlens, max_seqlen, softmax_scale, who)
    backend = resolve_backend(backend, q, who, INTERPRETED)
    if backend == "triton" and q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{who}: head_dim {q.shape[2]} is not supported by the Triton "
                         f"kernel (supported: {SUPPORTED_HEAD_DIMS}); use backend='torch'")
    out, _ = _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, bool(causal), scale, backend)
    return out


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_span(q, k, v, start: int, end: int, group: int, scale: float, **mask) -> torch.Tensor:
    """SDPA over the tokens [start, end) of the packed stream; `mask` is is_causal or attn_mask."""
    qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, D)
    if group > 1 and not _SDPA_HAS_GQA:
        kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
    extra = {"enable_gqa": True} if group > 1 and _SDPA_HAS_GQA else {}
    out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale, **mask, **extra)
    return out.transpose(0, 1)


def _join_with_tail(pieces: list, q: torch.Tensor, covered: int) -> torch.Tensor:
    """The documents' outputs in order, then zeros for the tokens after the last document."""
    if covered < q.shape[0]:
        pieces.append(q.new_zeros((q.shape[0] - covered, *q.shape[1:])))
    return torch.cat(pieces, 0) if pieces else q.new_zeros(q.shape)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, max_seqlen: int | None = None, *,
                               causal: bool = True,
                               softmax_scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch varlen attention: one scaled_dot_product_attention per document.

    Same contract as `varlen_attention` (any head dim, any device, differentiable). Reads
    cu_seqlens on the host, so on a GPU it synchronises once per call.
    """
    if max_seqlen is None:
        max_seqlen = 0
    scale = _check_arguments(q, k, v, cu_seqlens, max_seqlen, softmax_scale,
                             "varlen_attention_reference")
    group = q.shape[1] // k.shape[1]
    offsets = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(offsets, offsets[1:]):
        if end == start:
            continue
        pieces.append(_sdpa_span(q, k, v, start, end, group, scale, is_causal=bool(causal)))
    return _join_with_tail(pieces, q, offsets[-1] if offsets else 0)


def varlen_attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: torch.Tensor, max_seqlen: int | None = None, *,
                             causal: bool = True, softmax_scale: float | None = None,
                             group_tokens: int = GROUP_TOKENS) -> torch.Tensor:
    """The "torch" backend of `varlen_attention` with its grouping as a parameter: short
    neighbouring documents are attended together under a block-diagonal (causal) mask, one aten
    flash-attention call per group (the kernel F.scaled_dot_product_attention runs on a CPU);
    the reference's result. Same contract as the reference."""
    if max_seqlen is None:
        max_seqlen = 0
    scale = _check_arguments(q, k, v, cu_seqlens, max_seqlen, softmax_scale,
                             "varlen_attention_grouped")
    if not (isinstance(group_tokens, int) and group_tokens >= 1):
        raise ValueError(f"varlen_attention_grouped: group_tokens must be an int >= 1, got "
                         f"{group_tokens!r}")
    return _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, bool(causal), scale, "torch",
                                group_tokens)[0]
