"""Causal attention whose queries and keys are segmented separately, for context parallelism.

q is (Tq, Hq, D) and k, v are (Tk, Hkv, D). cu_seqlens_q and cu_seqlens_k have the same length
n + 1: query segment j (rows [cu_q[j], cu_q[j+1]), possibly empty) belongs to document j of the
keys (rows [cu_k[j], cu_k[j+1])). q_positions[r] is the key row of query r's own token, so row r
attends keys cu_k[j] <= t <= q_positions[r]. Positions increase within a segment but need not be
contiguous: under a zigzag context-parallel split a rank holds two separate chunks of a document.
With cu_q == cu_k and q_positions == arange(T) this is causal `varlen_attention`.

The Triton kernels are those of attention.py with the causal limit of a row taken from its
position: the forward and dQ run one program per (segment, query block) and query head, dK/dV one
per (document, key block) and KV head, looping over the GQA group's query heads (no atomics).
Query rows after cu_q[n] get zeros, and so do the gradients of keys that no query attends.
"""
import torch

from ._triton_compat import HAS_TRITON, device_guard, resolve_backend, tl, triton, unit_stride
from .attention import (
    _DELTA_BLOCK_T,
    _LOG2E,
    _RUNTIME_INTS,
    _TABLES,
    AUTOTUNE_CONFIGS,
    GROUP_TOKENS,
    INTERPRETED,
    SUPPORTED_HEAD_DIMS,
    _attend,
    _attend_backward,
    _attn_bwd_delta_kernel,
    _attn_bwd_dq_inner,
    _attn_fwd_inner,
    _block_of_segment,
    _build_work_table,
    _check_max_seqlen,
    _check_offset_values,
    _check_offsets_tensor,
    _check_qkv,
    _document_groups,
    _dot_precision,
    _extended_cu_seqlens,
    _head_base,
    _head_rows,
    _heads_first,
    _launch,
    _pruner,
    _seq_bucket,
    _softmax_scale,
    _store_zero_tile,
    _table_blocks,
    _tile_ptrs,
    _values_checkable,
    _work_item,
)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _document_keys(CU_K, doc):
    """Document `doc`'s first key row (int64) and its number of keys."""
    start = tl.load(CU_K + doc)
    return start.to(tl.int64), tl.load(CU_K + doc + 1) - start


@triton.jit
def _row_positions(QPOS, q_start64, offs_m, row_ok, k_start64, k_len):
    """Positions of the block's query rows relative to their document's first key, forced into
    [0, k_len) so that unchecked bad positions on the GPU never read out of bounds; rows past
    the segment get 0, so that every row sees key 0 and no softmax row is empty."""
    pos = tl.load(QPOS + q_start64 + offs_m, mask=row_ok, other=0).to(tl.int64) - k_start64
    pos = tl.minimum(tl.maximum(pos, 0), k_len - 1)
    return tl.where(row_ok, pos, 0).to(tl.int32)


@triton.jit
def _query_key_ranges(pos, row_ok, BLOCK_N: tl.constexpr):
    """Keys a query block visits: whole unmasked key blocks in [0, full_end), which its first
    (smallest) position sees entirely, then masked ones up to its largest position."""
    first = tl.min(tl.where(row_ok, pos, 2147483647), 0)
    last = tl.max(pos, 0)
    return ((first + 1) // BLOCK_N) * BLOCK_N, last + 1


@triton.jit
def _first_row_at_least(QPOS_SEG, q_len, target):
    """The first row of a segment whose position is >= target (q_len if none): positions
    increase within a segment, so a binary search."""
    lo = q_len * 0
    hi = q_len
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(QPOS_SEG + mid).to(tl.int64) < target
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _split_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, QPOS, TABLE,
                      qk_scale, num_docs, total_tokens, table_stride, group, seq_bucket,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh,
                      HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    doc, blk = _work_item(TABLE, table_stride, BLOCK_M)
    if doc < 0:  # surplus program of the upper-bound grid
        return
    head = tl.program_id(1)
    q_start64, q_len, m_start, offs_m, row_ok = _block_of_segment(CU_Q, doc, blk, BLOCK_M)
    o_ptrs = _tile_ptrs(O, q_start64, head, stride_ot, stride_oh, offs_m, HEAD_DIM)
    if doc == num_docs:  # query rows after the last segment: defined zeros
        _store_zero_tile(o_ptrs, row_ok, BLOCK_M, HEAD_DIM)
        return

    kv_head = head // group
    k_start64, k_len = _document_keys(CU_K, doc)
    pos = _row_positions(QPOS, q_start64, offs_m, row_ok, k_start64, k_len)
    q = tl.load(_tile_ptrs(Q, q_start64, head, stride_qt, stride_qh, offs_m, HEAD_DIM),
                mask=row_ok[:, None], other=0.0)
    k_base = _head_base(K, k_start64, kv_head, stride_kt, stride_kh)
    v_base = _head_base(V, k_start64, kv_head, stride_vt, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, masked_end = _query_key_ranges(pos, row_ok, BLOCK_N)
    # Every row sees key 0 in the first block visited, so m_i is finite before any fully masked
    # block comes along. The inner loops take a row's position where attention.py passes its
    # row index: that is all their causal mask reads.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, pos,
                                    k_len, qk_scale, 0, full_end,
                                    HEAD_DIM, BLOCK_N, True, False, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, pos,
                                    k_len, qk_scale, full_end, masked_end,
                                    HEAD_DIM, BLOCK_N, True, True, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(_head_rows(LSE, head, total_tokens, q_start64) + offs_m, m_i + tl.log2(l_i),
             mask=row_ok)


@triton.jit
def _split_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, qpos_base,
                      stride_qt, stride_qh, stride_dot, stride_doh, total_tokens, key_rows, q_len,
                      qk_scale, m_lo, num_m, group,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    # attention.py's flat (query head, query block) loop; the causal test compares the query
    # rows' positions with the key rows instead of row indices.
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(0, group * num_m):
        g = it // num_m
        start_m = m_lo + (it - g * num_m) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q = tl.load(q_base + g * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        # An infinite log-sum-exp zeroes the probabilities of rows past the segment's end.
        lse = tl.load(lse_base + g * total_tokens + offs_m, mask=row_ok, other=float("inf"))
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                      - lse[None, :])
        if CAUSAL_MASK:
            pos = tl.load(qpos_base + offs_m, mask=row_ok, other=0)
            p_t = tl.where(pos[None, :] >= key_rows[:, None], p_t, 0.0)
        do = tl.load(do_base + g * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + g * total_tokens + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _split_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, QPOS, TABLE,
                       qk_scale, sm_scale, num_docs, total_tokens, table_stride, group,
                       seq_bucket,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                       HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # total_tokens is Tq here: the row length of LSE and DELTA.
    doc, blk = _work_item(TABLE, table_stride, BLOCK_N)
    if doc < 0:
        return
    kv_head = tl.program_id(1)
    k_start64, k_len, n_start, offs_n, col_ok = _block_of_segment(CU_K, doc, blk, BLOCK_N)
    dk_ptrs = _tile_ptrs(DK, k_start64, kv_head, stride_dkt, stride_dkh, offs_n, HEAD_DIM)
    dv_ptrs = _tile_ptrs(DV, k_start64, kv_head, stride_dvt, stride_dvh, offs_n, HEAD_DIM)
    if doc == num_docs:  # keys after the last document
        _store_zero_tile(dk_ptrs, col_ok, BLOCK_N, HEAD_DIM)
        _store_zero_tile(dv_ptrs, col_ok, BLOCK_N, HEAD_DIM)
        return

    q_start = tl.load(CU_Q + doc)
    q_len = tl.load(CU_Q + doc + 1) - q_start
    q_start64 = q_start.to(tl.int64)
    k = tl.load(_tile_ptrs(K, k_start64, kv_head, stride_kt, stride_kh, offs_n, HEAD_DIM),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_tile_ptrs(V, k_start64, kv_head, stride_vt, stride_vh, offs_n, HEAD_DIM),
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first_head = kv_head * group  # the GQA group's query heads follow it
    q_base = _head_base(Q, q_start64, first_head, stride_qt, stride_qh)
    do_base = _head_base(DO, q_start64, first_head, stride_dot, stride_doh)
    lse_base = _head_rows(LSE, first_head, total_tokens, q_start64)
    delta_base = _head_rows(DELTA, first_head, total_tokens, q_start64)
    qpos_base = QPOS + q_start64
    key_rows = k_start64 + offs_n  # absolute, as q_positions are
    # Query rows before r_lo see none of these keys (skipped), rows from r_full on see them all
    # (no mask); the query blocks in between straddle the block's causal edge.
    r_lo = _first_row_at_least(qpos_base, q_len, k_start64 + n_start)
    r_full = _first_row_at_least(qpos_base, q_len, k_start64 + n_start + BLOCK_N - 1)
    m_lo = (r_lo // BLOCK_M) * BLOCK_M
    full_lo = m_lo + tl.cdiv(r_full - m_lo, BLOCK_M) * BLOCK_M
    dk, dv = _split_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, qpos_base,
                               stride_qt, stride_qh, stride_dot, stride_doh, total_tokens,
                               key_rows, q_len, qk_scale, m_lo, (full_lo - m_lo) // BLOCK_M,
                               group, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    dk, dv = _split_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, qpos_base,
                               stride_qt, stride_qh, stride_dot, stride_doh, total_tokens,
                               key_rows, q_len, qk_scale, full_lo,
                               tl.cdiv(q_len - full_lo, BLOCK_M), group,
                               HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _split_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, QPOS, TABLE,
                     qk_scale, sm_scale, num_docs, total_tokens, table_stride, group, seq_bucket,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dqt, stride_dqh,
                     HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    doc, blk = _work_item(TABLE, table_stride, BLOCK_M)
    if doc < 0:
        return
    head = tl.program_id(1)
    q_start64, q_len, m_start, offs_m, row_ok = _block_of_segment(CU_Q, doc, blk, BLOCK_M)
    dq_ptrs = _tile_ptrs(DQ, q_start64, head, stride_dqt, stride_dqh, offs_m, HEAD_DIM)
    if doc == num_docs:
        _store_zero_tile(dq_ptrs, row_ok, BLOCK_M, HEAD_DIM)
        return

    kv_head = head // group
    k_start64, k_len = _document_keys(CU_K, doc)
    pos = _row_positions(QPOS, q_start64, offs_m, row_ok, k_start64, k_len)
    q = tl.load(_tile_ptrs(Q, q_start64, head, stride_qt, stride_qh, offs_m, HEAD_DIM),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, q_start64, head, stride_dot, stride_doh, offs_m, HEAD_DIM),
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(_head_rows(LSE, head, total_tokens, q_start64) + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(_head_rows(DELTA, head, total_tokens, q_start64) + offs_m, mask=row_ok,
                    other=0.0)
    k_base = _head_base(K, k_start64, kv_head, stride_kt, stride_kh)
    v_base = _head_base(V, k_start64, kv_head, stride_vt, stride_vh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, masked_end = _query_key_ranges(pos, row_ok, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos,
                            k_len, qk_scale, 0, full_end,
                            HEAD_DIM, BLOCK_N, True, False, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, pos,
                            k_len, qk_scale, full_end, masked_end,
                            HEAD_DIM, BLOCK_N, True, True, DOT_PRECISION)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# The tile configs of attention.py's kernels (same tiles, a few more integer registers); the key
# has no CAUSAL, these kernels are always causal.
def _autotuned(kernel, kernel_name: str):
    every = [c for configs in AUTOTUNE_CONFIGS[kernel_name].values() for c in configs]
    return triton.autotune(configs=every, key=["HEAD_DIM", "group", "seq_bucket"],
                           prune_configs_by={"early_config_prune": _pruner(kernel_name)})(kernel)


if HAS_TRITON:
    _split_fwd_tuned = _autotuned(_split_fwd_kernel, "fwd")
    _split_dkdv_tuned = _autotuned(_split_dkdv_kernel, "dkdv")
    _split_dq_tuned = _autotuned(_split_dq_kernel, "dq")

def _spill_label(head_dim, block_m, block_n, num_warps, num_stages):
    # A config as rega_engine.kernels.compile_check.config_label spells it (no CAUSAL here).
    return (f"HEAD_DIM={head_dim},DOT_PRECISION=tf32,BLOCK_M={block_m},BLOCK_N={block_n},"
            f"num_warps={num_warps},num_stages={num_stages}")


# Register spills ptxas reports (Triton 3.9), keyed as attention.KNOWN_SPILLS; the compile test
# in tests/test_split_attention.py fails on any other spill and on a stale entry. They are the
# largest tiles of attention.py's sm_80-only spills (the position registers add a few bytes);
# every config is clean on sm_90, and an A100 autotunes each against clean neighbours.
_SM80_ONLY = "sm_80 only; clean on sm_90"
KNOWN_SPILLS = {
    ("_split_fwd_kernel", "sm_80", _spill_label(128, 128, 64, 8, 3)):
        f"92 B; {_SM80_ONLY}, the forward's main tile there (attention.py's spills 80 B)",
    ("_split_dkdv_kernel", "sm_80", _spill_label(64, 64, 128, 8, 3)):
        f"8 B; {_SM80_ONLY}, the largest dK/dV tile at d=64 (attention.py's spills 4 B)",
    ("_split_dq_kernel", "sm_80", _spill_label(128, 128, 64, 8, 3)):
        f"64 B; {_SM80_ONLY}, the largest dQ tile at d=128 (attention.py's spills 84 B)",
}


# ----------------------------------------------------------------------------------------------
# Work tables
# ----------------------------------------------------------------------------------------------

def _split_tables(cu_q, cu_k, q_positions, total_q, total_k, blocks, side):
    """(cu_q_ext, cu_k_ext, table): both offset tensors with their tail segment, and the work
    table of `side` ("q": items over query segments, "kv": over documents' keys), heaviest first
    by the keys a query block reads, or the queries that read a key block."""
    def build():
        cu_q_ext = _extended_cu_seqlens(cu_q, total_q)
        cu_k_ext = _extended_cu_seqlens(cu_k, total_k)
        k_first = cu_k_ext.to(torch.int64)
        q_first = cu_q_ext.to(torch.int64)
        pos = q_positions.to(torch.int64)
        if side == "q":
            def work_of(seg, blk, block, seg_len):
                last = q_first[seg] + torch.minimum((blk + 1) * block, seg_len) - 1
                return (pos[last.clamp(0, total_q - 1)] - k_first[seg] + 1).clamp(min=0)
            return cu_q_ext, cu_k_ext, _build_work_table(cu_q_ext, total_q, blocks, "q", True,
                                                         work_of)
        # Positions are increasing over all segments together (documents are in key order), so
        # one sorted search counts each key block's readers; rows after the last segment are
        # pushed past every key.
        rows = torch.arange(total_q, device=pos.device)
        ordered = torch.where(rows < q_first[-2], pos, torch.iinfo(torch.int64).max)

        def work_of(seg, blk, block, seg_len):
            first_reader = torch.searchsorted(ordered, k_first[seg] + blk * block)
            end = q_first[seg + 1]
            return end - torch.minimum(torch.maximum(first_reader, q_first[seg]), end)
        return cu_q_ext, cu_k_ext, _build_work_table(cu_k_ext, total_k, blocks, "kv", True,
                                                     work_of)
    key = ("split", total_q, total_k, tuple(sorted(set(blocks))), side)
    return _TABLES.lookup((cu_q, cu_k, q_positions), key, build)


def _split_forward(q, k, v, cu_q, cu_k, q_positions, max_seqlen_k, sm_scale):
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    cu_q_ext, cu_k_ext, table = _split_tables(
        cu_q, cu_k, q_positions, total_q, k.shape[0], _table_blocks("fwd", "BLOCK_M", head_dim),
        "q")
    num_docs = cu_q.numel() - 1
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # zeros: the tail rows get a defined log-sum-exp too
    lse = torch.zeros((num_heads, total_q), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, cu_q_ext, cu_k_ext, q_positions, table,
            sm_scale * _LOG2E, num_docs, total_q, table.stride(0), group,
            _seq_bucket(max_seqlen_k),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1))
    constexprs = dict(HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype))
    _launch(_split_fwd_tuned, _split_fwd_kernel,
            lambda meta: (total_q // meta["BLOCK_M"] + num_docs + 1, num_heads),
            args, constexprs, "fwd")
    return o, lse


def _split_backward(do, q, k, v, o, lse, cu_q, cu_k, q_positions, max_seqlen_k, sm_scale,
                    need_dq, need_dkdv):
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    num_docs = cu_q.numel() - 1
    delta = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, _DELTA_BLOCK_T), num_heads)](
        o, do, delta, total_q, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=_DELTA_BLOCK_T, num_warps=4)
    constexprs = dict(HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype))
    common = (sm_scale * _LOG2E, sm_scale, num_docs, total_q)
    bucket = _seq_bucket(max_seqlen_k)
    dq = dk = dv = None
    if need_dkdv:
        cu_q_ext, cu_k_ext, table = _split_tables(
            cu_q, cu_k, q_positions, total_q, total_k,
            _table_blocks("dkdv", "BLOCK_N", head_dim), "kv")
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        args = (q, k, v, do, lse, delta, dk, dv, cu_q_ext, cu_k_ext, q_positions, table, *common,
                table.stride(0), group, bucket,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1))
        _launch(_split_dkdv_tuned, _split_dkdv_kernel,
                lambda meta: (total_k // meta["BLOCK_N"] + num_docs + 1, num_kv_heads),
                args, constexprs, "dkdv")
    if need_dq:
        cu_q_ext, cu_k_ext, table = _split_tables(
            cu_q, cu_k, q_positions, total_q, total_k,
            _table_blocks("dq", "BLOCK_M", head_dim), "q")
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        args = (q, k, v, do, lse, delta, dq, cu_q_ext, cu_k_ext, q_positions, table, *common,
                table.stride(0), group, bucket,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1))
        _launch(_split_dq_tuned, _split_dq_kernel,
                lambda meta: (total_q // meta["BLOCK_M"] + num_docs + 1, num_heads),
                args, constexprs, "dq")
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# The PyTorch path: a masked aten attention call per document (short documents grouped)
# ----------------------------------------------------------------------------------------------

def _split_groups(cu_q, cu_k, q_positions, group_tokens):
    """(q_lo, q_hi, k_lo, k_hi, additive mask) per group of documents with queries: the group's
    query rows, the keys they can reach and a (rows, keys) float mask allowing key t to row r
    iff t lies in r's document and t <= q_positions[r]."""
    off_q, off_k = cu_q.tolist(), cu_k.tolist()
    for i, j in _document_groups(off_k, group_tokens):
        q_lo, q_hi = off_q[i], off_q[j]
        if q_hi == q_lo:
            continue
        pos = q_positions[q_lo:q_hi].to(torch.int64)
        # positions increase over the whole group: the last row reaches the farthest key
        k_lo, k_hi = off_k[i], min(off_k[j], int(pos[-1]) + 1)
        lengths = torch.tensor([b - a for a, b in zip(off_q[i:j], off_q[i + 1:j + 1])])
        doc_first = torch.tensor(off_k[i:j]).repeat_interleave(lengths).to(pos.device)
        key = torch.arange(k_lo, k_hi, device=pos.device)
        allowed = (key[None, :] >= doc_first[:, None]) & (key[None, :] <= pos[:, None])
        yield q_lo, q_hi, k_lo, k_hi, allowed


def _additive(allowed, dtype):
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf"))


def _torch_split_forward(q, k, v, cu_q, cu_k, q_positions, scale, group_tokens):
    """(out (Tq, Hq, D), lse (Hq, Tq) fp32, natural log)."""
    repeat = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)
    lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for q_lo, q_hi, k_lo, k_hi, allowed in _split_groups(cu_q, cu_k, q_positions, group_tokens):
        o, l = _attend(_heads_first(q, q_lo, q_hi, 1), _heads_first(k, k_lo, k_hi, repeat),
                       _heads_first(v, k_lo, k_hi, repeat), _additive(allowed, q.dtype), False,
                       scale)
        out[q_lo:q_hi] = o[0].transpose(0, 1)
        lse[:, q_lo:q_hi] = l[0]
    return out, lse


def _torch_split_backward(do, q, k, v, out, lse, cu_q, cu_k, q_positions, scale, group_tokens):
    repeat = q.shape[1] // k.shape[1]
    kv_heads = k.shape[1]
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for q_lo, q_hi, k_lo, k_hi, allowed in _split_groups(cu_q, cu_k, q_positions, group_tokens):
        gq, gk, gv = _attend_backward(
            _heads_first(do, q_lo, q_hi, 1), _heads_first(q, q_lo, q_hi, 1),
            _heads_first(k, k_lo, k_hi, repeat), _heads_first(v, k_lo, k_hi, repeat),
            _heads_first(out, q_lo, q_hi, 1), lse[None, :, q_lo:q_hi].contiguous(),
            _additive(allowed, q.dtype), False, scale)
        dq[q_lo:q_hi] = gq[0].transpose(0, 1)
        n = k_hi - k_lo
        # groups never share a key, and a GQA group's query heads add up on their K/V head
        dk[k_lo:k_hi] = gk[0].view(kv_heads, repeat, n, -1).sum(1).transpose(0, 1)
        dv[k_lo:k_hi] = gv[0].view(kv_heads, repeat, n, -1).sum(1).transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops: fake implementations and autograd (one opaque node under torch.compile)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("rega::split_varlen_attention", mutates_args=())
def _split_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                        q_positions: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        softmax_scale: float, backend: str,
                        group_tokens: int = GROUP_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (Tq, Hq, D), lse (Hq, Tq) fp32); lse is the backend's own (base 2 for Triton,
    natural for torch), only meant for the backward op."""
    if backend == "triton":
        if q.shape[0] == 0 or k.shape[0] == 0:  # no queries, or no document to attend
            return (q.new_zeros(q.shape),
                    q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32))
        q, k, v = (unit_stride(t) for t in (q, k, v))
        with device_guard(q):
            return _split_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, max_seqlen_k,
                                  softmax_scale)
    return _torch_split_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, softmax_scale,
                                group_tokens)


@torch.library.custom_op("rega::split_varlen_attention_backward", mutates_args=())
def _split_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                 q_positions: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                 softmax_scale: float, need_dq: bool, need_dkdv: bool,
                                 backend: str, group_tokens: int = GROUP_TOKENS
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); a gradient not asked for (need_dq, need_dkdv) comes back as an empty (0,)
    tensor and, on the Triton path, costs nothing."""
    if backend == "triton" and q.shape[0] > 0 and k.shape[0] > 0:
        q, k, v, out, do = (unit_stride(t) for t in (q, k, v, out, do))
        with device_guard(q):
            dq, dk, dv = _split_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                         q_positions, max_seqlen_k, softmax_scale, need_dq,
                                         need_dkdv)
    elif backend == "triton":
        dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    else:
        dq, dk, dv = _torch_split_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                           q_positions, softmax_scale, group_tokens)
    return (dq if need_dq else q.new_empty(0), dk if need_dkdv else k.new_empty(0),
            dv if need_dkdv else v.new_empty(0))


@_split_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, max_seqlen_q, max_seqlen_k,
      softmax_scale, backend, group_tokens=GROUP_TOKENS):
    return (q.new_empty(q.shape),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@_split_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_positions, max_seqlen_q, max_seqlen_k,
      softmax_scale, need_dq, need_dkdv, backend, group_tokens=GROUP_TOKENS):
    return (q.new_empty(q.shape if need_dq else (0,)),
            k.new_empty(k.shape if need_dkdv else (0,)),
            v.new_empty(v.shape if need_dkdv else (0,)))


def _setup_split_attention(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, q_positions, max_seqlen_q, max_seqlen_k, softmax_scale, backend,
     group_tokens) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, q_positions)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale)
    ctx.backend, ctx.group_tokens = backend, group_tokens


def _backward_split_attention(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, q_positions = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv = _split_attention_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, q_positions,
                                              *ctx.args, need_dq, need_dkdv, ctx.backend,
                                              ctx.group_tokens)
    return (dq if need_dq else None, dk if need_dkdv else None, dv if need_dkdv else None,
            None, None, None, None, None, None, None, None)


_split_attention_op.register_autograd(_backward_split_attention,
                                      setup_context=_setup_split_attention)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _check_positions(cu_q: list, cu_k: list, q_positions: torch.Tensor, who: str) -> None:
    """Each segment's positions lie in its document's key rows and strictly increase."""
    end = cu_q[-1]
    pos = q_positions[:end].to(torch.int64)
    if end == 0:
        return
    seg = torch.repeat_interleave(torch.arange(len(cu_q) - 1),
                                  torch.tensor(cu_q[1:]) - torch.tensor(cu_q[:-1]))
    first, stop = torch.tensor(cu_k[:-1])[seg], torch.tensor(cu_k[1:])[seg]
    outside = ((pos < first) | (pos >= stop)).nonzero()
    if outside.numel():
        r = int(outside[0])
        raise ValueError(f"{who}: q_positions[{r}] = {int(pos[r])} lies outside its document's "
                         f"keys [{int(first[r])}, {int(stop[r])}) (query segment {int(seg[r])})")
    same_seg = seg[1:] == seg[:-1]
    backwards = (same_seg & (pos[1:] <= pos[:-1])).nonzero()
    if backwards.numel():
        r = int(backwards[0]) + 1
        raise ValueError(f"{who}: q_positions must strictly increase within a segment, got "
                         f"q_positions[{r - 1}] = {int(pos[r - 1])} then q_positions[{r}] = "
                         f"{int(pos[r])}")


def _check_split_arguments(q, k, v, cu_q, cu_k, q_positions, max_seqlen_q, max_seqlen_k,
                           softmax_scale, who: str) -> float:
    """Validate shapes, dtypes and devices, and values on the CPU only; return the softmax
    scale to use."""
    _check_qkv(q, k, v, [("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k),
                         ("q_positions", q_positions)], who, same_tokens=False)
    if not (q.device == k.device == v.device == cu_q.device == cu_k.device
            == q_positions.device):
        raise ValueError(f"{who}: q, k, v, cu_seqlens_q, cu_seqlens_k and q_positions must be on "
                         f"one device, got {q.device}, {k.device}, {v.device}, {cu_q.device}, "
                         f"{cu_k.device}, {q_positions.device}")
    _check_offsets_tensor(cu_q, "cu_seqlens_q", who)
    _check_offsets_tensor(cu_k, "cu_seqlens_k", who)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{who}: cu_seqlens_q and cu_seqlens_k must have the same length (one "
                         f"query segment per document), got {cu_q.numel()} and {cu_k.numel()}")
    if q_positions.dtype != torch.int32 or q_positions.shape != (q.shape[0],):
        raise ValueError(f"{who}: q_positions must be an int32 tensor of shape (Tq,) = "
                         f"({q.shape[0]},), got dtype {q_positions.dtype} and shape "
                         f"{tuple(q_positions.shape)}")
    _check_max_seqlen(max_seqlen_q, "max_seqlen_q", who)
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k", who)
    if _values_checkable(cu_q):
        off_q, off_k = cu_q.tolist(), cu_k.tolist()
        _check_offset_values(off_q, "cu_seqlens_q", q.shape[0], "Tq", who)
        _check_offset_values(off_k, "cu_seqlens_k", k.shape[0], "Tk", who)
        _check_positions(off_q, off_k, q_positions, who)
    return _softmax_scale(softmax_scale, q.shape[2], who)


def split_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           q_positions: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           softmax_scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Causal attention of query segments against their documents' keys (context parallelism).

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D) with Hq % Hkv == 0.
    cu_seqlens_q, cu_seqlens_k: int32 (n + 1,), each starting at 0 and non-decreasing, ending at
    or before Tq resp. Tk: query segment j (maybe empty) attends document j of the keys.
    q_positions: int32 (Tq,): the key row of each query's own token; query r of segment j sees
    keys cu_seqlens_k[j] <= t <= q_positions[r]. Strictly increasing within a segment, not
    necessarily contiguous.
    max_seqlen_q, max_seqlen_k: the longest segment and document (autotuning hints only).
    Returns (Tq, Hq, D) in q's dtype; rows after cu_seqlens_q[-1] get zeros, and keys no query
    sees get zero gradients.

    backend: as for `varlen_attention` ("auto", "triton", "torch"); either way the custom op
    `rega::split_varlen_attention` with its fake and autograd, one node under torch.compile.
    Offsets and positions are checked on CPU only; on the GPU bad values are clamped into range
    (no out-of-bounds access, but meaningless output).
    """
    who = "split_varlen_attention"
    scale = _check_split_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions,
                                   max_seqlen_q, max_seqlen_k, softmax_scale, who)
    backend = resolve_backend(backend, q, who, INTERPRETED)
    if backend == "triton" and q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{who}: head_dim {q.shape[2]} is not supported by the Triton "
                         f"kernel (supported: {SUPPORTED_HEAD_DIMS}); use backend='torch'")
    out, _ = _split_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, max_seqlen_q,
                                 max_seqlen_k, scale, backend)
    return out
