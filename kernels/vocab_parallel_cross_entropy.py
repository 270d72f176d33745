"""Fused linear cross-entropy with the LM head's vocabulary split over a tensor-parallel group.

Each rank of `group` holds the rows [vocab_start, vocab_start + V_local) of the LM head; the
shards tile [0, vocab_size) and may be uneven. hidden (N, H) and labels (N,) are the same on every
rank. The full-vocabulary logits are never gathered; per chunk of tokens:

1. `logits = hidden_chunk @ weight_shard.T` (N_chunk, V_local) into a reused scratch buffer;
2. pass 1, per row: the local max m, sum of exp(x - m), the target logit when the label falls in
   this shard (else 0) and the sum of the logits (label smoothing), all after the softcap;
3. ONE collective: an all_gather of those (N_chunk, 4) fp32 rows. Every rank then combines them
   itself: lse = M + log(sum_r s_r * exp(m_r - M)) with M = max_r m_r, target and sum by adding.
   Two all-reduces (MAX of m, then SUM of the rescaled s, target and sum) would need a second
   round trip that depends on the first; the gather moves world * 4 floats per token, which is
   nothing next to the matmuls, and since every rank combines the same gathered values in the
   same order, the loss is bit-identical on all ranks;
4. pass 2 overwrites the local logits with dloss/dlogits computed with the GLOBAL lse (label
   smoothing's uniform part is eps / vocab_size), scaled by the token's weight and the
   reduction's scale; `grad_hidden_chunk = dlogits @ weight_shard` (a partial sum) and
   `grad_weight_shard += dlogits.T @ hidden_chunk` into an fp32 buffer.

After the loop one all-reduce (SUM) of grad_hidden adds the shards' contributions: hidden is
replicated, so its gradient is the sum over the vocabulary shards. It runs once per call on the
whole (N, H) buffer rather than once per chunk (fewer, larger messages). It is summed in hidden's
dtype, as the single-device op returns it.

Autograd is a plain torch.autograd.Function (the collectives take a ProcessGroup, which a
torch.library custom op cannot take as an argument; torch.compile graph-breaks around it). As in
`fused_linear_cross_entropy`, reduction "mean"/"sum" computes the gradients in the forward (the
upstream gradient is a scalar, applied in backward; backward runs once). Reduction "none" saves
the global lse and recomputes the local logits in backward: pass 2 needs only the lse, so the
backward has no stats collective, only the grad_hidden all-reduce. Every rank must backpropagate
the same upstream gradient (the loss is replicated; each rank holds its own copy of it).

Backends: "torch" runs passes 1 and 2 in PyTorch ops, "triton" in the row kernels below (they
reuse `_lse_step`/`_grad_step` of the single-device kernel); "auto" is Triton on CUDA.

Checks that read tensor values (labels in [0, vocab_size), the shards tiling the vocabulary
across the group, N and H equal on all ranks) run only for CPU tensors, as the labels check of
`fused_linear_cross_entropy` does: on a GPU they would cost a device sync per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._triton_compat import (
    device_guard,
    is_interpreted,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
)
from .cross_entropy import (
    TORCH_CHUNK_BYTES,
    _accumulate_weight_grad,
    _chunk_rows,
    _finish_weight_grad,
    _grad_step,
    _lse_step,
    _reduce,
    _row_kernel_config,
    _row_offset,
    _softcap_tanh,
    _token_weights_and_scale,
    _z_terms,
)
from .cross_entropy import (
    _check_arguments as check_fused_arguments,
)

NAME = "vocab_parallel_linear_cross_entropy"
N_STATS = 4   # per row and rank: max, sum of exp relative to it, target logit, sum of logits


# --------------------------------------------------------------------------------------------
# Triton kernels: pass 1 (local stats) and pass 2 (gradient with the global lse)
# --------------------------------------------------------------------------------------------

@triton.jit
def _vp_stats_kernel(logits_ptr, stride_row, labels_ptr, stats_ptr, n_cols, vocab_start,
                     ignore_index, softcap, BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_SMOOTHING: tl.constexpr):
    """One program per row: stats[row] = (max, sum exp(x - max), target or 0, sum x) of the
    shard's (capped) logits. Ignored rows get (0, 1, 0, 0), finite, so the combine stays NaN-free
    (their loss is masked to 0 afterwards)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + _row_offset(row, stride_row)
    out = stats_ptr + row * 4
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(out, 0.0)
        tl.store(out + 1, 1.0)
        tl.store(out + 2, 0.0)
        tl.store(out + 3, 0.0)
    else:
        cols = tl.arange(0, BLOCK_V)
        n_full = (n_cols // BLOCK_V) * BLOCK_V
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        sx = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_full, BLOCK_V):
            m, s, sx = _lse_step(row_ptr, start + cols, n_cols, m, s, sx, softcap,
                                 HAS_SOFTCAP, HAS_SMOOTHING, False)
        if n_full < n_cols:
            m, s, sx = _lse_step(row_ptr, n_full + cols, n_cols, m, s, sx, softcap,
                                 HAS_SOFTCAP, HAS_SMOOTHING, True)
        local = label - vocab_start
        here = (local >= 0) & (local < n_cols)
        # a label in another shard must not be read here: load column 0 and drop it
        target = tl.load(row_ptr + tl.where(here, local, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            target = softcap * _softcap_tanh(target, softcap)
        tl.store(out, m)
        tl.store(out + 1, s)
        tl.store(out + 2, tl.where(here, target, 0.0))
        tl.store(out + 3, sx)


@triton.jit
def _vp_grad_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, grad_scale_ptr, n_cols,
                    vocab_start, vocab_size, ignore_index, softcap, z_loss, label_smoothing,
                    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr):
    """One program per row: overwrite the shard's logits with grad_scale[row] * dloss/dlogits,
    using the global lse[row]; ignored rows become exact zeros, a label outside the whole
    vocabulary NaN."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + _row_offset(row, stride_row)
    cols = tl.arange(0, BLOCK_V)
    n_full = (n_cols // BLOCK_V) * BLOCK_V
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
        for start in range(0, n_full, BLOCK_V):
            tl.store(row_ptr + start + cols, zeros)
        if n_full < n_cols:
            tl.store(row_ptr + n_full + cols, zeros, mask=n_full + cols < n_cols)
    else:
        in_range = (label >= 0) & (label < vocab_size)
        lse = tl.load(lse_ptr + row)
        scale = tl.where(in_range, tl.load(grad_scale_ptr + row), float("nan"))
        softmax_coef = 1.0 + 2.0 * z_loss * lse
        on_target = 1.0 - label_smoothing
        uniform = label_smoothing / vocab_size   # smoothing spreads over the FULL vocabulary
        # outside this shard the local label matches no stored column: no one-hot term here
        local = label - vocab_start
        for start in range(0, n_full, BLOCK_V):
            _grad_step(row_ptr, start + cols, n_cols, local, lse, softmax_coef, on_target,
                       uniform, scale, softcap, HAS_SOFTCAP, HAS_SMOOTHING, False)
        if n_full < n_cols:
            _grad_step(row_ptr, n_full + cols, n_cols, local, lse, softmax_coef, on_target,
                       uniform, scale, softcap, HAS_SOFTCAP, HAS_SMOOTHING, True)


INTERPRETED = is_interpreted(_vp_stats_kernel)


# --------------------------------------------------------------------------------------------
# Per-chunk passes, both backends
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    vocab_start: int
    vocab_size: int
    group: object
    ignore_index: int
    reduction: str
    z_loss: float
    softcap: float | None
    label_smoothing: float
    backend: str
    chunk_size: int | None


def _capped(logits, softcap):
    """(fp32 logits after the softcap, tanh term or None)."""
    x = logits.float()
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, t


def _block_config(n_cols: int) -> tuple[int, int]:
    """The single-device kernel's (BLOCK_V, num_warps), narrowed for a small shard (a vocabulary
    split over many ranks, or an uneven split's short shard) so its rows do not run mostly
    masked lanes."""
    block, num_warps = _row_kernel_config(n_cols)
    return min(block, max(128, next_power_of_2(n_cols))), num_warps


def _stats_torch(logits, labels, o: _Options):
    x, _ = _capped(logits, o.softcap)
    stats = torch.empty((x.shape[0], N_STATS), dtype=torch.float32, device=x.device)
    m = x.amax(-1)
    stats[:, 0] = m
    stats[:, 1] = torch.exp(x - m[:, None]).sum(-1)
    local = labels - o.vocab_start
    here = (local >= 0) & (local < x.shape[1])
    target = x.gather(1, torch.where(here, local, 0)[:, None])[:, 0]
    stats[:, 2] = torch.where(here, target, 0.0)
    stats[:, 3] = x.sum(-1) if o.label_smoothing else 0.0
    return stats


def _stats_triton(logits, labels, o: _Options):
    rows, n_cols = logits.shape
    stats = torch.empty((rows, N_STATS), dtype=torch.float32, device=logits.device)
    if rows:
        block, num_warps = _block_config(n_cols)
        _vp_stats_kernel[(rows,)](
            logits, logits.stride(0), labels, stats, n_cols, o.vocab_start, o.ignore_index,
            float(o.softcap or 0.0), BLOCK_V=block, HAS_SOFTCAP=o.softcap is not None,
            HAS_SMOOTHING=o.label_smoothing > 0, num_warps=num_warps)
    return stats


def _grad_torch(logits, labels, lse, grad_scale, o: _Options):
    x, t = _capped(logits, o.softcap)
    valid = labels != o.ignore_index
    in_range = (labels >= 0) & (labels < o.vocab_size)
    lse = torch.where(valid, lse, 0.0)
    grad = torch.exp(x - lse[:, None]) * (1 + 2 * o.z_loss * lse)[:, None]
    local = labels - o.vocab_start
    here = (local >= 0) & (local < x.shape[1])
    one_hot = torch.where(here, -(1 - o.label_smoothing), 0.0).to(grad.dtype)
    grad.scatter_add_(1, torch.where(here, local, 0)[:, None], one_hot[:, None])
    if o.label_smoothing:
        grad -= o.label_smoothing / o.vocab_size
    if t is not None:
        grad *= 1 - t * t
    scale = torch.where(in_range, grad_scale, float("nan"))
    logits.copy_(torch.where(valid[:, None], grad * scale[:, None], 0.0))


def _grad_triton(logits, labels, lse, grad_scale, o: _Options):
    rows, n_cols = logits.shape
    if not rows:
        return
    block, num_warps = _block_config(n_cols)
    _vp_grad_kernel[(rows,)](
        logits, logits.stride(0), labels, lse, grad_scale, n_cols, o.vocab_start, o.vocab_size,
        o.ignore_index, float(o.softcap or 0.0), float(o.z_loss), float(o.label_smoothing),
        BLOCK_V=block, HAS_SOFTCAP=o.softcap is not None, HAS_SMOOTHING=o.label_smoothing > 0,
        num_warps=num_warps)


def _combine(local_stats, labels, o: _Options):
    """(lse, ce) per row from every rank's stats: one all_gather, then the same log-sum-exp
    combine on every rank. 0 on ignored rows, NaN ce on labels outside the vocabulary."""
    world = dist.get_world_size(o.group)
    gathered = [torch.empty_like(local_stats) for _ in range(world)]
    dist.all_gather(gathered, local_stats, group=o.group)
    stats = torch.stack(gathered)           # (world, rows, 4), in rank order on every rank
    m, s, target, sum_x = stats.unbind(-1)
    top = m.amax(0)
    lse = top + torch.log((s * torch.exp(m - top)).sum(0))
    target, sum_x = target.sum(0), sum_x.sum(0)   # one rank holds the target, the rest add 0
    ce = lse - target
    if o.label_smoothing:
        eps = o.label_smoothing
        ce = (1 - eps) * ce + eps * (lse - sum_x / o.vocab_size)
    valid = labels != o.ignore_index
    in_range = (labels >= 0) & (labels < o.vocab_size)
    ce = torch.where(in_range, ce, float("nan"))
    return torch.where(valid, lse, 0.0), torch.where(valid, ce, 0.0)


def _chunked_pass(hidden, weight, labels, grad_scale, lse, ce, o: _Options, *, lse_given,
                  need_grad_hidden, need_grad_weight):
    """The chunk loop of forward and of the "none" backward.

    Fills lse/ce (unless lse_given, then lse is read) and returns (grad_hidden summed over the
    group, or None; this shard's fp32 grad_weight, or None), scaled by grad_scale per token."""
    n_tokens = hidden.shape[0]
    n_cols = weight.shape[0]
    if o.backend == "triton":
        rows = _chunk_rows(n_tokens, n_cols, hidden.element_size(), o.chunk_size)
        stats_fn, grad_fn = _stats_triton, _grad_triton
    else:
        rows = o.chunk_size or TORCH_CHUNK_BYTES // (4 * n_cols)
        rows = max(1, min(rows, n_tokens))
        stats_fn, grad_fn = _stats_torch, _grad_torch
    compute_grad = need_grad_hidden or need_grad_weight
    # 16-element row starts let the row kernels vectorise (as in the single-device op)
    row_stride = -(-n_cols // 16) * 16
    scratch = torch.empty((rows, row_stride), dtype=hidden.dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = None
    if need_grad_weight:
        make = torch.zeros if n_tokens == 0 else torch.empty   # no chunk would overwrite it
        grad_weight = make(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        hidden_chunk, labels_chunk = hidden[start:stop], labels[start:stop]
        logits = scratch[:stop - start, :n_cols]
        torch.mm(hidden_chunk, weight.t(), out=logits)
        if not lse_given:
            chunk_lse, chunk_ce = _combine(stats_fn(logits, labels_chunk, o), labels_chunk, o)
            lse[start:stop] = chunk_lse
            ce[start:stop] = chunk_ce
        if not compute_grad:
            continue
        grad_fn(logits, labels_chunk, lse[start:stop], grad_scale[start:stop], o)
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:stop])
        if need_grad_weight:
            _accumulate_weight_grad(grad_weight, logits, hidden_chunk, first=start == 0)
    if need_grad_hidden and n_tokens:
        dist.all_reduce(grad_hidden, group=o.group)
    return grad_hidden, grad_weight


class _VocabParallelCE(torch.autograd.Function):
    """(loss, ce, lse) of the sharded LM head; gradients for hidden and weight_shard."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, scale, o: _Options):
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[:2]
        in_forward = o.reduction != "none"
        n_tokens = hidden.shape[0]
        lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        ce = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        with device_guard(hidden):
            grad_hidden, grad_weight = _chunked_pass(
                hidden, weight, labels, weights * scale if in_forward else None, lse, ce, o,
                lse_given=False, need_grad_hidden=need_grad_hidden and in_forward,
                need_grad_weight=need_grad_weight and in_forward)
        loss = _reduce(ce + _z_terms(lse, o.z_loss) if o.z_loss else ce, weights, scale,
                       o.reduction)
        ctx.mark_non_differentiable(ce, lse)
        ctx.o, ctx.weight_dtype = o, weight.dtype
        ctx.needs = (need_grad_hidden, need_grad_weight)
        if in_forward:
            ctx.grads = [grad_hidden, grad_weight]   # spent (in place) by the one backward
        else:
            ctx.save_for_backward(hidden, weight, labels, weights, lse)
        return loss, ce, lse

    @staticmethod
    def backward(ctx, grad_loss, _dce, _dlse):
        need_grad_hidden, need_grad_weight = ctx.needs
        o = ctx.o
        grad_loss = grad_loss.to(torch.float32)
        if o.reduction == "none":
            hidden, weight, labels, weights, lse = ctx.saved_tensors
            with device_guard(hidden):
                grad_hidden, grad_weight = _chunked_pass(
                    hidden, weight, labels, (grad_loss * weights).contiguous(), lse, None, o,
                    lse_given=True, need_grad_hidden=need_grad_hidden,
                    need_grad_weight=need_grad_weight)
            if grad_weight is not None:
                grad_weight = _finish_weight_grad(grad_weight, None, ctx.weight_dtype)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    f"{NAME} (reduction='mean'/'sum') computes its gradients in the forward pass "
                    "and hands them out once; a second backward through the same loss "
                    "(retain_graph=True) is not supported. Recompute the loss, or use "
                    "reduction='none' and reduce it yourself.")
            grad_hidden, grad_weight = ctx.grads
            ctx.grads = None
            if grad_hidden is not None:
                grad_hidden = grad_hidden.mul_(grad_loss)
            if grad_weight is not None:
                grad_weight = _finish_weight_grad(grad_weight, grad_loss, ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(hidden, weight, labels, token_weights, vocab_start, vocab_size, group,
                     ignore_index, reduction, z_loss, softcap, label_smoothing, backend,
                     chunk_size):
    # vocab_size first: the shared checks test the labels against it
    if not (_is_int(vocab_size) and vocab_size >= 1):
        raise ValueError(f"{NAME}: vocab_size must be an int >= 1, got {vocab_size!r}")
    check_fused_arguments(hidden, weight, labels, token_weights, ignore_index, reduction, z_loss,
                          softcap, backend, chunk_size, label_smoothing, name=NAME,
                          weight_name="weight_shard", vocab_size=vocab_size)
    if not (_is_int(vocab_start) and vocab_start >= 0):
        raise ValueError(f"{NAME}: vocab_start must be an int >= 0, got {vocab_start!r}")
    if vocab_start + weight.shape[0] > vocab_size:
        raise ValueError(
            f"{NAME}: weight_shard has {weight.shape[0]} rows, so it would hold the ids "
            f"[{vocab_start}, {vocab_start + weight.shape[0]}), which must be a non-empty part "
            f"of the vocabulary [0, {vocab_size})")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{NAME}: needs an initialised torch.distributed process group")


def _check_shards(hidden, weight, vocab_start, vocab_size, group):
    """On CPU tensors: that the group's shards tile [0, vocab_size) and the ranks agree on
    N, H and vocab_size (one small all_gather; every rank sees the same table and raises
    alike, so a mistake is an error everywhere rather than a hang)."""
    mine = torch.tensor([vocab_start, weight.shape[0], vocab_size, *hidden.shape])
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = [tuple(int(v) for v in t) for t in table]
    if len({r[2:] for r in rows}) != 1:
        raise ValueError(f"{NAME}: the ranks disagree on (vocab_size, N, H): "
                         f"{[r[2:] for r in rows]}")
    covered = 0
    for start, length, *_ in sorted(rows):
        if start != covered:
            break
        covered += length
    if covered != vocab_size or sum(r[1] for r in rows) != vocab_size:
        shards = [(r[0], r[0] + r[1]) for r in rows]
        raise ValueError(f"{NAME}: the shards [vocab_start, vocab_start + rows) of the ranks, "
                         f"{shards}, must tile [0, {vocab_size}) without gaps or overlaps")


def vocab_shard(weight: torch.Tensor):
    """(this rank's rows as a plain tensor, their first id, the process group) when `weight` is a
    DTensor split by vocabulary rows over a 1-D mesh (tensor parallelism's ColwiseParallel on an
    LM head: Shard(0), torch.chunk's split), else None. The rows keep their autograd link: their
    gradient becomes the DTensor's."""
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None or mesh.ndim != 1 or len(weight.placements) != 1:
        return None
    placement = weight.placements[0]
    if type(placement).__name__ != "Shard" or placement.dim != 0:
        return None
    rows = -(-weight.shape[0] // mesh.size())
    return weight.to_local(), min(rows * mesh.get_local_rank(), weight.shape[0]), mesh.get_group()


def vocab_parallel_linear_cross_entropy(hidden, weight_shard, labels, *, vocab_start: int,
                                        vocab_size: int, group, ignore_index=-100,
                                        token_weights=None, reduction="mean", z_loss=0.0,
                                        softcap=None, label_smoothing=0.0, backend="auto",
                                        chunk_size=None, return_token_losses=False):
    """`fused_linear_cross_entropy(hidden, full_weight, labels, ...)` with the LM head's rows
    split over the ranks of `group` (a torch.distributed ProcessGroup; None: the default one).

    weight_shard (V_local, H) holds the ids [vocab_start, vocab_start + V_local) of a vocabulary
    of `vocab_size`; hidden (N, H), labels (N,) (global ids) and token_weights are the same on
    every rank. Every rank returns the same loss (and, with return_token_losses=True, the same
    detached unweighted per-token ce), equal to the single-device op's with the same options;
    gradients: hidden's complete (summed over the group), weight_shard's for its rows. Must be
    called by all ranks of the group together (it runs collectives).
    """
    group = dist.group.WORLD if group is None else group
    _check_arguments(hidden, weight_shard, labels, token_weights, vocab_start, vocab_size, group,
                     ignore_index, reduction, z_loss, softcap, label_smoothing, backend,
                     chunk_size)
    if hidden.device.type == "cpu":
        _check_shards(hidden, weight_shard, vocab_start, vocab_size, group)
    backend = resolve_backend(backend, hidden, NAME, INTERPRETED)
    labels = labels.long().contiguous()
    if token_weights is not None:
        token_weights = token_weights.detach().contiguous()
    weights, scale = _token_weights_and_scale(labels, token_weights, ignore_index, reduction)
    o = _Options(vocab_start=vocab_start, vocab_size=vocab_size, group=group,
                 ignore_index=ignore_index, reduction=reduction, z_loss=float(z_loss),
                 softcap=None if softcap is None else float(softcap),
                 label_smoothing=float(label_smoothing), backend=backend, chunk_size=chunk_size)
    loss, ce, _ = _VocabParallelCE.apply(hidden, weight_shard, labels, weights, scale, o)
    return (loss, ce.detach()) if return_token_losses else loss
