"""Fused linear cross-entropy: the LM head and the token loss in one pass, without (N, V) logits.

Design. Tokens are processed in chunks small enough that one chunk's logits fit a fixed memory
budget (`LOGITS_CHUNK_BYTES`). Per chunk:

1. `logits = hidden_chunk @ weight.T` with cuBLAS, written into a reused scratch buffer;
2. one Triton program per token row (`_ce_rows_kernel`) streams the row twice: an online
   log-sum-exp (after the optional softcap), then it overwrites the logits with dloss/dlogits,
   already scaled by the token's weight and the reduction's scale;
3. `grad_hidden_chunk = dlogits @ weight`, and `grad_weight_fp32 += dlogits.T @ hidden_chunk`
   accumulated by cuBLAS straight into one preallocated fp32 buffer (`addmm` with
   `out_dtype=float32`): no V x H temporary per chunk.

For `reduction="mean"/"sum"` the gradients are computed in the forward pass (the upstream gradient
is a scalar, applied in backward). For `reduction="none"` the upstream gradient is a vector known
only in backward, so the forward saves the per-token log-sum-exp and the backward recomputes the
logits chunk by chunk (one extra matmul).

Numerics: softmax, log-sum-exp, losses and the weight-gradient accumulation are fp32 whatever the
input dtype; the logits themselves come out of the matmul in the input dtype (as in eager
`linear` followed by `cross_entropy(logits.float())`). The returned loss is fp32; gradients come
back in the inputs' dtypes.

Memory: besides one chunk of logits, the op holds an fp32 (V, H) weight-gradient buffer (when the
weight needs a gradient) and the (N, H) hidden gradient. A bf16/fp16 weight's gradient is
converted in place into the front half of that fp32 buffer instead of a second allocation, so the
returned gradient is a view whose storage is twice its size until it is freed (FSDP2's
reduce-scatter, or zero_grad, releases it).

Labels outside [0, V) other than `ignore_index` raise ValueError when the labels live on the CPU.
On a GPU they are not checked on the host (that would cost a device sync every step); such a token
gets a NaN loss and NaN gradients instead of an out-of-bounds read, so the problem shows in the
loss rather than silently.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._triton_compat import device_guard, is_interpreted, resolve_backend, tl, triton

# Memory allowed for one chunk's logits. At V=128256 in bf16 this is 2048 tokens per chunk, whose
# matmuls are large enough to run cuBLAS near peak, while the whole op's peak stays a small
# fraction of eager's (N, V) fp32 logits.
LOGITS_CHUNK_BYTES = 512 * 1024 * 1024

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")

# (BLOCK_V, num_warps) the row kernel may run with; see `_row_kernel_config`.
ROW_KERNEL_CONFIGS = ((1024, 4), (4096, 8))

# Register spills ptxas reports for these configs, each with why the config stays, keyed
# (kernel, "sm_<arch>", rega_engine.kernels.compile_check.config_label); the compile tests fail
# on any spill missing here. None: the heaviest mode needs 80 registers (benchmarks/results/
# ptxas_sm90.md).
KNOWN_SPILLS: dict = {}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_offset(row, stride):
    # A chunk of 2048 rows x 128256 columns already passes 2**31 elements: 32-bit offsets wrap.
    return row.to(tl.int64) * stride


@triton.jit
def _softcap_tanh(x, softcap):
    # tanh(x / softcap) through exp: portable across Triton versions and the interpreter, and
    # saturates cleanly to +-1 (exp overflows to inf, 2 / inf = 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0)


@triton.jit
def _lse_step(row_ptr, offs, n_cols, m, s, sx, softcap, HAS_SOFTCAP: tl.constexpr,
              HAS_SMOOTHING: tl.constexpr, MASKED: tl.constexpr):
    """Fold one block of the row into the running (max, sum of exp) pair, and with label
    smoothing into the running sum of the (capped) logits."""
    mask = offs < n_cols
    if MASKED:
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(row_ptr + offs).to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap * _softcap_tanh(x, softcap)
        if MASKED:
            x = tl.where(mask, x, float("-inf"))  # softcap would turn the -inf padding finite
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    if HAS_SMOOTHING:
        if MASKED:
            sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
        else:
            sx += tl.sum(x, axis=0)
    return m_new, s, sx


@triton.jit
def _grad_step(row_ptr, offs, n_cols, label, lse, softmax_coef, on_target, uniform, scale,
               softcap, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
               MASKED: tl.constexpr):
    """Overwrite one block of logits with scale * dloss/dlogits."""
    mask = offs < n_cols
    if MASKED:
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(row_ptr + offs).to(tl.float32)
    if HAS_SOFTCAP:
        t = _softcap_tanh(x, softcap)
        x = softcap * t
    # d(ce + z * lse^2)/dlogit_j = softmax_j * (1 + 2 z lse) - (1 - eps) [j == label] - eps / V
    # (label smoothing eps: on_target = 1 - eps, uniform = eps / V)
    if HAS_SMOOTHING:
        grad = tl.exp(x - lse) * softmax_coef - tl.where(offs == label, on_target, 0.0) - uniform
    else:   # two live values fewer: without them the heaviest mode stays clear of spills
        grad = tl.exp(x - lse) * softmax_coef - tl.where(offs == label, 1.0, 0.0)
    if HAS_SOFTCAP:
        grad = grad * (1.0 - t * t)
    grad = (grad * scale).to(row_ptr.dtype.element_ty)
    if MASKED:
        tl.store(row_ptr + offs, grad, mask=mask)
    else:
        tl.store(row_ptr + offs, grad)


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row, labels_ptr, grad_scale_ptr, lse_ptr, ce_ptr,
    n_cols, ignore_index, softcap, z_loss, label_smoothing,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    LSE_GIVEN: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    """One program per token row of a chunk's logits.

    Writes the row's log-sum-exp and unweighted cross-entropy (0 on ignored rows; with label
    smoothing eps, (1 - eps) * (lse - x_label) + eps * (lse - mean_j x_j)) unless LSE_GIVEN
    (backward recompute: the forward's log-sum-exp is read instead). With COMPUTE_GRAD
    it overwrites the row in place with grad_scale[row] * dloss/dlogits, where the loss is
    ce + z_loss * lse**2 (ignored rows become exact zeros, so the chunk matmuls that follow need
    no masking). Full blocks run unmasked so their loads and stores vectorise; only the tail
    block is masked.
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + _row_offset(row, stride_row)
    cols = tl.arange(0, BLOCK_V)
    n_full = (n_cols // BLOCK_V) * BLOCK_V
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        if not LSE_GIVEN:
            tl.store(lse_ptr + row, 0.0)
            tl.store(ce_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, n_full, BLOCK_V):
                tl.store(row_ptr + start + cols, zeros)
            if n_full < n_cols:
                tl.store(row_ptr + n_full + cols, zeros, mask=n_full + cols < n_cols)
    else:
        in_range = (label >= 0) & (label < n_cols)
        if LSE_GIVEN:
            lse = tl.load(lse_ptr + row)
        else:
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.zeros([], dtype=tl.float32)
            sx = tl.zeros([], dtype=tl.float32)
            for start in range(0, n_full, BLOCK_V):
                m, s, sx = _lse_step(row_ptr, start + cols, n_cols, m, s, sx, softcap,
                                     HAS_SOFTCAP, HAS_SMOOTHING, False)
            if n_full < n_cols:
                m, s, sx = _lse_step(row_ptr, n_full + cols, n_cols, m, s, sx, softcap,
                                     HAS_SOFTCAP, HAS_SMOOTHING, True)
            lse = m + tl.log(s)
            # an out-of-range label must not be read: load column 0 and report NaN instead
            target = tl.load(row_ptr + tl.where(in_range, label, 0)).to(tl.float32)
            if HAS_SOFTCAP:
                target = softcap * _softcap_tanh(target, softcap)
            tl.store(lse_ptr + row, lse)
            loss = lse - target
            if HAS_SMOOTHING:
                loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sx / n_cols)
            tl.store(ce_ptr + row, tl.where(in_range, loss, float("nan")))
        if COMPUTE_GRAD:
            scale = tl.where(in_range, tl.load(grad_scale_ptr + row), float("nan"))
            softmax_coef = 1.0 + 2.0 * z_loss * lse
            on_target = 1.0 - label_smoothing
            uniform = label_smoothing / n_cols
            for start in range(0, n_full, BLOCK_V):
                _grad_step(row_ptr, start + cols, n_cols, label, lse, softmax_coef, on_target,
                           uniform, scale, softcap, HAS_SOFTCAP, HAS_SMOOTHING, False)
            if n_full < n_cols:
                _grad_step(row_ptr, n_full + cols, n_cols, label, lse, softmax_coef, on_target,
                           uniform, scale, softcap, HAS_SOFTCAP, HAS_SMOOTHING, True)


INTERPRETED = is_interpreted(_ce_rows_kernel)


# --------------------------------------------------------------------------------------------
# Host side of the Triton path
# --------------------------------------------------------------------------------------------

def _row_kernel_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): wide blocks for real vocabularies (16 elements per thread, two
    16-byte loads in bf16), a narrow one so tiny vocabularies do not run mostly masked lanes."""
    return ROW_KERNEL_CONFIGS[0] if n_cols <= 2048 else ROW_KERNEL_CONFIGS[1]


def _launch_rows(logits, labels, grad_scale, lse, ce, *, ignore_index, softcap, z_loss,
                 compute_grad, lse_given, block_v=None, label_smoothing=0.0):
    rows, n_cols = logits.shape
    if rows == 0:
        return
    block, num_warps = _row_kernel_config(n_cols)
    if block_v is not None:
        block = block_v
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, grad_scale if grad_scale is not None else lse, lse, ce,
        n_cols, ignore_index, float(softcap or 0.0), float(z_loss), float(label_smoothing),
        BLOCK_V=block, HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad,
        LSE_GIVEN=lse_given, HAS_SMOOTHING=label_smoothing > 0, num_warps=num_warps,
    )


def _chunk_rows(n_tokens: int, n_cols: int, elem_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, n_tokens))
    rows = LOGITS_CHUNK_BYTES // (n_cols * elem_size)
    if rows >= 128:
        rows -= rows % 64  # keep matmul shapes tile-aligned
    return max(1, min(rows, n_tokens))


_FP32_OUT_ADDMM: dict[str, bool] = {}


def _fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether torch.addmm(acc_fp32, a_lowp, b_lowp, out_dtype=float32, out=acc_fp32) runs and is
    right on this device (torch >= 2.8 on CUDA); checked once per device type, on tiny tensors."""
    key = device.type
    if key not in _FP32_OUT_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                gen = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(8, 16, generator=gen).to(device, torch.bfloat16)
                b = torch.randn(16, 8, generator=gen).to(device, torch.bfloat16)
                acc = torch.ones(8, 8, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                want = 1.0 + a.float() @ b.float()
                ok = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
            if not ok:
                warnings.warn(
                    "fused_linear_cross_entropy: this torch cannot accumulate a bf16/fp16 matmul "
                    "into fp32 in place (torch.addmm(..., out_dtype=torch.float32) needs "
                    "torch >= 2.8); falling back to a per-chunk (V, H) temporary, which is slower "
                    "and uses more memory. Upgrade torch for the fast path.", stacklevel=3)
        _FP32_OUT_ADDMM[key] = ok
    return _FP32_OUT_ADDMM[key]


def _accumulate_weight_grad(acc: torch.Tensor, dlogits: torch.Tensor, hidden_chunk: torch.Tensor,
                            first: bool) -> None:
    """acc (V, H) fp32 (+)= dlogits.T @ hidden_chunk; `first` overwrites, so acc may start empty."""
    beta = 0.0 if first else 1.0
    if dlogits.dtype == acc.dtype:
        acc.addmm_(dlogits.t(), hidden_chunk, beta=beta)
    elif _fp32_out_addmm_works(acc.device):
        torch.addmm(acc, dlogits.t(), hidden_chunk, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        product = torch.mm(dlogits.t(), hidden_chunk)
        if first:
            acc.copy_(product)
        else:
            acc.add_(product)


def _finish_weight_grad(acc: torch.Tensor, scale: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
    """acc * scale in `dtype`, converting the fp32 buffer in place.

    A separate bf16 result next to the fp32 buffer would cost another V x H x 2 bytes at the op's
    peak (1 GiB at V=128256, H=4096). Instead the 2-byte result is written over the front half of
    the fp32 buffer's own storage, block by block in stream order: block k >= 1 lands on fp32 rows
    [k*R/2, (k+1)*R/2), all below k*R and so already read; block 0 goes through a small temporary.
    The returned tensor is a view on the fp32 storage (whose back half stays unused until the
    gradient is freed).
    """
    if dtype == acc.dtype:
        return acc.mul_(scale) if scale is not None else acc
    if torch.empty((), dtype=dtype).element_size() * 2 != acc.element_size():
        return (acc * scale if scale is not None else acc).to(dtype)
    rows, cols = acc.shape
    out = torch.empty(0, dtype=dtype, device=acc.device).set_(
        acc.untyped_storage(), acc.storage_offset() * 2, (rows, cols), (cols, 1))
    block = max(1, math.ceil(rows / 16))
    for start in range(0, rows, block):
        src = acc[start:start + block]
        if start == 0:
            first = src * scale if scale is not None else src
            out[:block].copy_(first.to(dtype))
        elif scale is not None:
            torch.mul(src, scale, out=out[start:start + block])
        else:
            out[start:start + block].copy_(src)
    return out


def _rows_torch(logits, labels, grad_scale, lse, ce, *, ignore_index, softcap, z_loss,
                compute_grad, lse_given, block_v=None, label_smoothing=0.0):
    """The row kernel's work in PyTorch (the "torch" backend), fp32 whatever the logits' dtype:
    fills lse/ce (unless lse_given) and with compute_grad overwrites the logits with
    grad_scale[row] * dloss/dlogits."""
    n_cols = logits.shape[1]
    x = logits.float()
    if softcap is not None:
        t = torch.tanh(x / softcap)
        x = softcap * t
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < n_cols)
    safe_labels = torch.where(in_range, labels, 0)
    if lse_given:
        row_lse = lse
    else:
        row_lse = torch.logsumexp(x, -1)
        loss = row_lse - x.gather(1, safe_labels[:, None])[:, 0]
        if label_smoothing:
            loss = (1 - label_smoothing) * loss + label_smoothing * (row_lse - x.mean(-1))
        loss = torch.where(in_range, loss, float("nan"))
        lse.copy_(torch.where(valid, row_lse, 0.0))
        ce.copy_(torch.where(valid, loss, 0.0))
    if not compute_grad:
        return
    row_lse = torch.where(valid, row_lse, 0.0)
    grad = torch.exp(x - row_lse[:, None]) * (1 + 2 * z_loss * row_lse)[:, None]
    grad.scatter_add_(1, safe_labels[:, None],
                      torch.full_like(row_lse, -(1 - label_smoothing))[:, None])
    if label_smoothing:
        grad -= label_smoothing / n_cols
    if softcap is not None:
        grad *= 1 - t * t
    scale = torch.where(in_range, grad_scale, float("nan"))
    logits.copy_(torch.where(valid[:, None], grad * scale[:, None], 0.0))


# Logits one chunk of the torch backend may hold: it keeps a few fp32 temporaries of the chunk,
# and CPU matmuls reach their speed at a few hundred rows.
TORCH_CHUNK_BYTES = 64 * 1024 * 1024


def _chunked_pass(hidden, weight, labels, grad_scale, lse, ce, *, ignore_index, softcap, z_loss,
                  lse_given, need_grad_hidden, need_grad_weight, chunk_size=None, block_v=None,
                  label_smoothing=0.0, backend="triton"):
    """The chunk loop shared by forward and backward-recompute, for both backends.

    Fills lse/ce (unless lse_given) and returns (grad_hidden or None, fp32 grad_weight or None),
    both already scaled by grad_scale (per token)."""
    n_tokens, _ = hidden.shape
    n_cols = weight.shape[0]
    compute_grad = need_grad_hidden or need_grad_weight
    if backend == "triton":
        rows = _chunk_rows(n_tokens, n_cols, hidden.element_size(), chunk_size)
        launch = _launch_rows
    else:
        rows = chunk_size or max(1, min(n_tokens, TORCH_CHUNK_BYTES // (4 * n_cols)))
        rows = max(1, min(rows, n_tokens))
        launch = _rows_torch
    # rows start on 16-element boundaries so the row kernel's loads and stores vectorise (Triton
    # specialises strides divisible by 16); vocabularies like 50257 get a few padding columns
    row_stride = -(-n_cols // 16) * 16
    scratch = torch.empty((rows, row_stride), dtype=hidden.dtype, device=hidden.device)
    grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                   if need_grad_hidden else None)
    grad_weight = None
    if need_grad_weight:
        # an empty input never runs the loop's overwriting first addmm
        make = torch.zeros if n_tokens == 0 else torch.empty
        grad_weight = make(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        hidden_chunk = hidden[start:stop]
        logits = scratch[:stop - start, :n_cols]
        torch.mm(hidden_chunk, weight.t(), out=logits)
        launch(logits, labels[start:stop],
               grad_scale[start:stop] if grad_scale is not None else None,
               lse[start:stop], ce[start:stop], ignore_index=ignore_index, softcap=softcap,
               z_loss=z_loss, compute_grad=compute_grad, lse_given=lse_given,
               block_v=block_v, label_smoothing=label_smoothing)
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:stop])
        if need_grad_weight:
            _accumulate_weight_grad(grad_weight, logits, hidden_chunk, first=start == 0)
    return grad_hidden, grad_weight


def _token_weights_and_scale(labels, token_weights, ignore_index, reduction):
    """Per-token fp32 weights (0 on ignored tokens) and the reduction's scale, on the device with
    no host sync. "mean" with every token ignored has a zero denominator: the scale is 0, so the
    loss is 0 rather than NaN (nothing was learned from an empty batch)."""
    valid = labels != ignore_index
    if token_weights is None:
        weights = valid.to(torch.float32)
    else:
        weights = torch.where(valid, token_weights.to(torch.float32), 0.0)
    if reduction == "mean":
        denominator = weights.sum()
        scale = torch.where(denominator != 0, 1.0 / denominator, torch.zeros_like(denominator))
    else:
        scale = torch.ones((), dtype=torch.float32, device=labels.device)
    return weights, scale


def _reduce(per_token, weights, scale, reduction):
    per_token = weights * per_token
    if reduction == "none":
        return per_token
    return per_token.sum() * scale


def _z_terms(lse, z_loss):
    # lse is 0 on ignored tokens, so is the z term
    return z_loss * lse * lse


# --------------------------------------------------------------------------------------------
# Custom ops: fake implementations and autograd
# --------------------------------------------------------------------------------------------
# For reduction "mean"/"sum" the forward op computes the gradients too and returns them as
# (non-differentiable) outputs that autograd saves; the backward scales them by the upstream
# scalar. For "none" the forward returns the log-sum-exp and the backward op recomputes the
# logits chunk by chunk. A gradient not asked for is an empty (0,) tensor.

@torch.library.custom_op("rega::fused_linear_cross_entropy", mutates_args=())
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor, scale: torch.Tensor, ignore_index: int, reduction: str,
              label_smoothing: float, z_loss: float, softcap: float | None,
              need_grad_hidden: bool, need_grad_weight: bool, chunk_size: int | None,
              block_v: int | None, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, lse, grad_hidden, fp32 grad_weight): loss as `reduction` makes it of
    weights * (ce + z_loss * lse**2), ce and lse (N,) fp32 per token (0 on ignored tokens)."""
    n_tokens = hidden.shape[0]
    lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    ce = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    in_forward = reduction != "none"
    with device_guard(hidden):
        grad_hidden, grad_weight = _chunked_pass(
            hidden, weight, labels, weights * scale if in_forward else None, lse, ce,
            ignore_index=ignore_index, softcap=softcap, z_loss=z_loss, lse_given=False,
            need_grad_hidden=need_grad_hidden and in_forward,
            need_grad_weight=need_grad_weight and in_forward, chunk_size=chunk_size,
            block_v=block_v, label_smoothing=label_smoothing, backend=backend)
    per_token = ce + _z_terms(lse, z_loss) if z_loss else ce
    loss = _reduce(per_token, weights, scale, reduction)
    return (loss, ce, lse,
            grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else hidden.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("rega::fused_linear_cross_entropy_backward", mutates_args=())
def _fused_backward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       grad_scale: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float | None,
                       need_grad_hidden: bool, need_grad_weight: bool,
                       chunk_size: int | None, block_v: int | None, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, fp32 grad_weight) of reduction "none", the logits recomputed chunk by
    chunk, each token's gradient scaled by grad_scale."""
    with device_guard(hidden):
        grad_hidden, grad_weight = _chunked_pass(
            hidden, weight, labels, grad_scale.contiguous(), lse, lse, ignore_index=ignore_index,
            softcap=softcap, z_loss=z_loss, lse_given=True, need_grad_hidden=need_grad_hidden,
            need_grad_weight=need_grad_weight, chunk_size=chunk_size, block_v=block_v,
            label_smoothing=label_smoothing, backend=backend)
    return (grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else hidden.new_empty(0, dtype=torch.float32))


@_fused_op.register_fake
def _(hidden, weight, labels, weights, scale, ignore_index, reduction, label_smoothing, z_loss,
      softcap, need_grad_hidden, need_grad_weight, chunk_size, block_v, backend):
    n_tokens = hidden.shape[0]
    in_forward = reduction != "none"
    loss = hidden.new_empty((n_tokens,) if reduction == "none" else (), dtype=torch.float32)
    return (loss, hidden.new_empty(n_tokens, dtype=torch.float32),
            hidden.new_empty(n_tokens, dtype=torch.float32),
            hidden.new_empty(hidden.shape if need_grad_hidden and in_forward else (0,)),
            weight.new_empty(weight.shape if need_grad_weight and in_forward else (0,),
                             dtype=torch.float32))


@_fused_backward_op.register_fake
def _(hidden, weight, labels, grad_scale, lse, ignore_index, label_smoothing, z_loss, softcap,
      need_grad_hidden, need_grad_weight, chunk_size, block_v, backend):
    return (hidden.new_empty(hidden.shape if need_grad_hidden else (0,)),
            weight.new_empty(weight.shape if need_grad_weight else (0,), dtype=torch.float32))


def _setup_fused(ctx, inputs, output):
    (hidden, weight, labels, weights, _scale, ignore_index, reduction, label_smoothing, z_loss,
     softcap, need_grad_hidden, need_grad_weight, chunk_size, block_v, backend) = inputs
    _loss, ce, lse, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(ce, lse, grad_hidden, grad_weight)
    ctx.reduction, ctx.weight_dtype = reduction, weight.dtype
    ctx.needs = (need_grad_hidden, need_grad_weight)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, labels, weights, lse)
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.launch = (chunk_size, block_v, backend)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.consumed = False


def _backward_fused(ctx, grad_loss, _dce, _dlse, _dgrad_hidden, _dgrad_weight):
    need_grad_hidden, need_grad_weight = ctx.needs
    if ctx.reduction != "none" and ctx.consumed:
        raise RuntimeError(
            "fused_linear_cross_entropy (reduction='mean'/'sum') computes its gradients in "
            "the forward pass and hands them out once; a second backward through the same "
            "loss (retain_graph=True) is not supported. Recompute the loss, or use "
            "reduction='none' and reduce it yourself.")
    saved = ctx.saved_tensors
    # Traced (torch.compile, AOTAutograd: fake or functional tensors) the graph must stay
    # functional; eagerly the gradients are finished in place in the buffers the forward filled
    # (no second (V, H) allocation at the peak).
    functional = torch.compiler.is_compiling() or any(
        type(t) is not torch.Tensor for t in (grad_loss, *saved))
    if ctx.reduction == "none":
        hidden, weight, labels, weights, lse = saved
        grad_hidden, grad_weight = _fused_backward_op(
            hidden, weight, labels, grad_loss.to(torch.float32) * weights, lse, *ctx.opts,
            need_grad_hidden, need_grad_weight, *ctx.launch)
        if need_grad_weight:
            grad_weight = (grad_weight.to(ctx.weight_dtype) if functional
                           else _finish_weight_grad(grad_weight, None, ctx.weight_dtype))
    else:
        ctx.consumed = not functional   # the in-place finish below spends the buffers
        grad_hidden, grad_weight = saved
        grad_loss = grad_loss.to(torch.float32)
        if need_grad_hidden:
            grad_hidden = (grad_hidden * grad_loss).to(grad_hidden.dtype) if functional \
                else grad_hidden.mul_(grad_loss)
        if need_grad_weight:
            grad_weight = ((grad_weight * grad_loss).to(ctx.weight_dtype) if functional
                           else _finish_weight_grad(grad_weight, grad_loss, ctx.weight_dtype))
    return (grad_hidden if need_grad_hidden else None,
            grad_weight if need_grad_weight else None) + (None,) * 13


_fused_op.register_autograd(_backward_fused, setup_context=_setup_fused)


def _fused(hidden, weight, labels, token_weights, *, ignore_index, reduction, z_loss, softcap,
           label_smoothing=0.0, chunk_size=None, block_v=None, backend="triton"):
    """(loss, ce, lse) through the custom op; gradients only where autograd wants them."""
    need_grad_hidden = torch.is_grad_enabled() and hidden.requires_grad
    need_grad_weight = torch.is_grad_enabled() and weight.requires_grad
    weights, scale = _token_weights_and_scale(labels, token_weights, ignore_index, reduction)
    loss, ce, lse, _, _ = _fused_op(hidden, weight, labels, weights, scale, ignore_index,
                                    reduction, float(label_smoothing), float(z_loss), softcap,
                                    need_grad_hidden, need_grad_weight, chunk_size, block_v,
                                    backend)
    return loss, ce, lse


def _fused_triton(hidden, weight, labels, token_weights, *, ignore_index, reduction, z_loss,
                  softcap, chunk_size=None, block_v=None, label_smoothing=0.0):
    """(loss, token_losses) through the Triton path."""
    loss, ce, _ = _fused(hidden, weight, labels, token_weights, ignore_index=ignore_index,
                         reduction=reduction, z_loss=z_loss, softcap=softcap,
                         label_smoothing=label_smoothing, chunk_size=chunk_size,
                         block_v=block_v, backend="triton")
    return loss, ce


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _check_arguments(hidden, weight, labels, token_weights, ignore_index, reduction, z_loss,
                     softcap, backend, chunk_size, label_smoothing=0.0, *,
                     name="fused_linear_cross_entropy", weight_name="weight",
                     vocab_size=None):
    """Every argument rule of the fused loss, with the messages naming `name` and `weight_name`;
    labels must lie in [0, vocab_size) (default: the weight's rows) or be ignore_index."""
    vocab_size = weight.shape[0] if vocab_size is None and isinstance(weight, torch.Tensor) \
        else vocab_size
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r} is not one of {REDUCTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend={backend!r} is not one of {BACKENDS}")
    for arg, tensor in (("hidden", hidden), (weight_name, weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be (N, H), got shape {tuple(hidden.shape)}; "
                         "flatten the batch first, e.g. hidden.reshape(-1, hidden.shape[-1])")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: {weight_name} must be the LM head's rows (V, H) with H = "
                         f"hidden.shape[1] = {hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: {weight_name} has an empty vocabulary (shape "
                         f"{tuple(weight.shape)})")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"{name}: labels must be (N,) = ({hidden.shape[0]},) to match hidden, "
                         f"got shape {tuple(labels.shape)}; flatten them like hidden")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels must be int64 (or int32), got {labels.dtype}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden and {weight_name} must share one floating dtype, got "
                         f"{hidden.dtype} and {weight.dtype}; cast one of them")
    devices = {hidden.device, weight.device, labels.device}
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or token_weights.shape != labels.shape:
            shape = tuple(token_weights.shape) if isinstance(token_weights, torch.Tensor) else None
            raise ValueError(f"{name}: token_weights must be a (N,) = ({labels.shape[0]},) "
                             f"tensor like labels, got {shape or type(token_weights).__name__}")
        if not token_weights.dtype.is_floating_point:
            raise ValueError(f"{name}: token_weights must be floating point, got "
                             f"{token_weights.dtype}")
        devices.add(token_weights.device)
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"{name}: z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float))
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{name}: softcap must be None or a finite number > 0, got {softcap!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if not (isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
            and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{name}: label_smoothing must be a number in [0, 1] (as in "
                         f"torch.nn.functional.cross_entropy), got {label_smoothing!r}")
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        # free on the CPU; on a GPU this would be a device sync per step (see the module
        # docstring), and under torch.compile reading values would break the graph
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: labels[{index}] = {int(labels[index])} is outside the vocabulary "
                f"[0, {vocab_size}) and is not ignore_index={ignore_index}; check the "
                "tokenizer's vocabulary size against the LM head, or mask the token with "
                "ignore_index")


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, token_weights=None,
                               reduction="mean", z_loss=0.0, softcap=None, backend="auto",
                               return_token_losses=False, chunk_size=None, label_smoothing=0.0,
                               return_z_loss=False):
    """Cross-entropy of `hidden @ weight.T` against `labels`, without materialising the logits.

    hidden (N, H) and weight (V, H) share a dtype (bf16/fp16 on GPU, fp32 anywhere); labels (N,)
    int64 with `ignore_index` marking tokens without a loss. Per non-ignored token the loss is
    `token_weight * (ce + z_loss * lse**2)`, with `ce` and `lse` computed on
    `softcap * tanh(logits / softcap)` when `softcap` is set. `label_smoothing` eps mixes the
    target with the uniform distribution as torch.nn.functional.cross_entropy does:
    ce = (1 - eps) * (lse - logit[label]) + eps * (lse - mean(logits)). `reduction`: "sum" adds
    the token losses, "mean" divides the sum by the sum of the non-ignored tokens' weights
    (their count without `token_weights`; 0 when every token is ignored), "none" returns them
    (N,) with 0 on ignored tokens. The loss is fp32.

    Extra, detached results for logging, appended in this order to make a tuple:
    `return_token_losses=True`: the unweighted per-token ce (N,) fp32 (label smoothing
    included, z-loss not), 0 on ignored tokens; `return_z_loss=True`: the z-loss part of `loss`,
    reduced like it (a scalar for "mean"/"sum", (N,) for "none"), so that `loss - z_loss` is the
    cross-entropy part. `loss, token_losses, z = f(..., return_token_losses=True,
    return_z_loss=True)`.

    backend: "auto" runs the Triton path on CUDA tensors and the PyTorch path elsewhere;
    "triton" forces the Triton path (on CPU tensors only under TRITON_INTERPRET=1); "torch"
    forces the PyTorch path (the same chunked algorithm in PyTorch ops). Both are the custom op
    `rega::fused_linear_cross_entropy` (fake and autograd registered): torch.compile keeps it as
    one node with no graph break. `chunk_size` overrides the tokens per chunk (default: as many
    as fit `LOGITS_CHUNK_BYTES` of logits on Triton, `TORCH_CHUNK_BYTES` of fp32 on PyTorch).

    With reduction "mean"/"sum" the gradients are computed during the forward pass, so the loss
    can be backpropagated once (no retain_graph double backward). `token_weights` are treated as
    constants (no gradient).
    """
    _check_arguments(hidden, weight, labels, token_weights, ignore_index, reduction, z_loss,
                     softcap, backend, chunk_size, label_smoothing)
    backend = resolve_backend(backend, hidden, "fused_linear_cross_entropy", INTERPRETED)
    labels = labels.long().contiguous()
    if token_weights is not None:
        token_weights = token_weights.detach().contiguous()
    loss, ce, lse = _fused(hidden, weight, labels, token_weights, ignore_index=ignore_index,
                           reduction=reduction, z_loss=float(z_loss),
                           softcap=None if softcap is None else float(softcap),
                           label_smoothing=float(label_smoothing), chunk_size=chunk_size,
                           backend=backend)
    return _with_extras(loss, ce, lse, labels, token_weights, ignore_index, reduction,
                        float(z_loss), return_token_losses, return_z_loss)


def _with_extras(loss, ce, lse, labels, token_weights, ignore_index, reduction, z_loss,
                 return_token_losses, return_z_loss):
    if not (return_token_losses or return_z_loss):
        return loss
    result = (loss,)
    if return_token_losses:
        result += (ce.detach(),)
    if return_z_loss:
        weights, scale = _token_weights_and_scale(labels, token_weights, ignore_index, reduction)
        result += (_reduce(_z_terms(lse.detach(), z_loss), weights, scale, reduction),)
    return result


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------

# Logits (fp32) one reference chunk may hold; beyond one chunk, autograd recomputes each chunk
# in backward (activation checkpointing) so CPU memory stays bounded.
REFERENCE_CHUNK_BYTES = 256 * 1024 * 1024


def _reference_chunk(hidden, weight, labels, ignore_index, softcap, label_smoothing=0.0):
    """Per-token (ce, lse) in fp32, 0 on ignored tokens and NaN ce on out-of-range labels."""
    logits = hidden.float() @ weight.float().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < weight.shape[0])
    target = logits.gather(1, torch.where(in_range, labels, 0)[:, None])[:, 0]
    ce = lse - target
    if label_smoothing:
        ce = (1 - label_smoothing) * ce + label_smoothing * (lse - logits.mean(-1))
    ce = torch.where(in_range, ce, torch.full_like(lse, float("nan")))
    zero = torch.zeros_like(lse)
    return torch.where(valid, ce, zero), torch.where(valid, lse, zero)


def linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100,
                                   token_weights=None, reduction="mean", z_loss=0.0, softcap=None,
                                   return_token_losses=False, chunk_size=None,
                                   label_smoothing=0.0, return_z_loss=False):
    """Plain PyTorch with the semantics of `fused_linear_cross_entropy` (same arguments, no
    backend), differentiable, computed in fp32; chunked over tokens, with each chunk recomputed in
    backward when there are several, so that memory stays bounded."""
    _check_arguments(hidden, weight, labels, token_weights, ignore_index, reduction, z_loss,
                     softcap, "torch", chunk_size, label_smoothing)
    labels = labels.long()
    n_tokens, n_cols = hidden.shape[0], weight.shape[0]
    rows = chunk_size or max(1, REFERENCE_CHUNK_BYTES // (4 * n_cols))
    recompute = torch.is_grad_enabled() and n_tokens > rows and (
        hidden.requires_grad or weight.requires_grad)
    ces, lses = [], []
    for start in range(0, n_tokens, rows):
        args = (hidden[start:start + rows], weight, labels[start:start + rows], ignore_index,
                softcap, float(label_smoothing))
        if recompute:
            ce, lse = _checkpoint(_reference_chunk, *args, use_reentrant=False)
        else:
            ce, lse = _reference_chunk(*args)
        ces.append(ce)
        lses.append(lse)
    if n_tokens:
        ce, lse = torch.cat(ces), torch.cat(lses)
    else:
        ce = lse = hidden.new_zeros(0, dtype=torch.float32) + 0.0 * weight.float().sum()
    weights, scale = _token_weights_and_scale(labels, token_weights, ignore_index, reduction)
    z_loss = float(z_loss)
    loss = _reduce(ce + _z_terms(lse, z_loss) if z_loss else ce, weights, scale, reduction)
    return _with_extras(loss, ce, lse, labels, token_weights, ignore_index, reduction, z_loss,
                        return_token_losses, return_z_loss)
