"""Label smoothing and the z-loss reported apart, in the fused linear cross-entropy: the reference
and both backends against torch.nn.functional.cross_entropy(label_smoothing=...), and the
smoothing variant of the Triton row kernel compiled for sm_80 and sm_90.

Tolerances as in test_cross_entropy.py: fp32 everywhere, 2e-5 (only summation order differs).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools
import math

import pytest
import torch.nn.functional as F
from kernel_compile import (
    ARCHS,
    assert_all_fit,
    compile_in_subprocess,
    cross_entropy_job,
)
from rega_engine.kernels import cross_entropy as ce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if ce.INTERPRETED or torch.cuda.is_available() else [])
IGNORE = -100
TOL = {"rtol": 2e-5, "atol": 2e-5}


def make_inputs(n=37, h=16, v=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / math.sqrt(h) * 3).to(DEVICE).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::5] = IGNORE
    return hidden, weight, labels.to(DEVICE)


def torch_loss(hidden, weight, labels, eps, reduction):
    return F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE, label_smoothing=eps,
                           reduction=reduction)


def value_and_grads(loss, hidden, weight):
    upstream = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
    return (loss.detach(),) + torch.autograd.grad(loss, (hidden, weight), upstream)


# every implementation and reduction at eps 0.1, and the all-uniform target eps = 1
CASES = [(impl, 0.1, reduction) for impl in ["reference"] + BACKENDS
         for reduction in ("mean", "sum", "none")] + [(BACKENDS[-1], 1.0, "mean")]


@pytest.mark.parametrize("impl, eps, reduction", CASES)
def test_label_smoothing_matches_torch_cross_entropy(impl, eps, reduction):
    hidden, weight, labels = make_inputs()
    if impl == "reference":
        ours = ce.linear_cross_entropy_reference(hidden, weight, labels, label_smoothing=eps,
                                                 reduction=reduction)
    else:
        # chunk_size 16: three chunks, the last one partial
        ours = ce.fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=eps,
                                             reduction=reduction, backend=impl, chunk_size=16)
    want = torch_loss(hidden, weight, labels, eps, reduction)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"),
                          value_and_grads(ours, hidden, weight),
                          value_and_grads(want, hidden, weight)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoothing_with_softcap_weights_and_z_loss_matches_the_reference(backend):
    hidden, weight, labels = make_inputs(n=20, v=1100)   # over one 1024-wide block
    token_weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    opts = {"label_smoothing": 0.2, "softcap": 5.0, "z_loss": 1e-2,
            "token_weights": token_weights.to(DEVICE), "return_token_losses": True,
            "return_z_loss": True}
    for reduction in ("mean", "none"):
        got = ce.fused_linear_cross_entropy(hidden, weight, labels, backend=backend,
                                            reduction=reduction, **opts)
        want = ce.linear_cross_entropy_reference(hidden, weight, labels, reduction=reduction,
                                                 **opts)
        for name, a, b in zip(("loss", "token_losses", "z_loss"), got, want):
            torch.testing.assert_close(a, b, **TOL,
                                       msg=lambda m, what=f"{reduction} {name}": f"{what}: {m}")
        for name, a, b in zip(("grad_hidden", "grad_weight"),
                              value_and_grads(got[0], hidden, weight)[1:],
                              value_and_grads(want[0], hidden, weight)[1:]):
            torch.testing.assert_close(a, b, **TOL,
                                       msg=lambda m, what=f"{reduction} {name}": f"{what}: {m}")


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
def test_z_loss_is_returned_apart_from_the_cross_entropy(impl):
    hidden, weight, labels = make_inputs()
    fn = (ce.linear_cross_entropy_reference if impl == "reference" else
          lambda *a, **k: ce.fused_linear_cross_entropy(*a, backend=impl, **k))
    z = 1e-2
    loss, token_losses, z_part = fn(hidden, weight, labels, z_loss=z, label_smoothing=0.1,
                                    return_token_losses=True, return_z_loss=True)
    cross_entropy = fn(hidden, weight, labels, label_smoothing=0.1)
    logits = (hidden @ weight.t()).detach()
    valid = labels != IGNORE
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(z_part, z * (lse[valid] ** 2).mean(), **TOL)
    torch.testing.assert_close(loss - z_part, cross_entropy.detach(), **TOL)
    assert not z_part.requires_grad and not token_losses.requires_grad
    # token losses: the smoothed cross-entropy per token, without the z term
    want = F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=0.1,
                           reduction="none")
    torch.testing.assert_close(token_losses, want, **TOL)
    # only the z-loss asked for: (loss, z_loss)
    result = fn(hidden, weight, labels, z_loss=z, return_z_loss=True)
    assert len(result) == 2 and result[1].shape == ()


@pytest.mark.parametrize("bad", [-0.1, 1.5, True])
def test_label_smoothing_outside_zero_one_is_refused(bad):
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=bad)


def test_smoothing_row_kernel_compiles_and_fits_sm80_sm90():
    # the heaviest mode (fused forward + gradient, softcap) with the smoothing sum, in bf16
    jobs = [cross_entropy_job(block, num_warps, arch, "bf16", compute_grad=True, lse_given=False,
                              softcap=True, smoothing=True)
            for arch, (block, num_warps) in itertools.product(ARCHS, ce.ROW_KERNEL_CONFIGS)]
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)
