"""The model on its fused kernels (backend "triton": varlen attention, RoPE from the restarting
position ids, RMSNorm with the residual add folded in, SwiGLU, fused linear cross-entropy)
gives the plain PyTorch model's loss and gradients.

On CPU the kernels run in the Triton interpreter (fp32; the interpreter's bf16 dot products are
not exact). Tolerances: both sides compute in fp32, only reduction orders differ (online
softmax, chunked log-sum-exp, per-program weight-gradient partials): 1e-5 on the loss, 1e-4
relative / 1e-5 absolute on gradients.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rega_engine.kernels import attention as attn
from tiny_models import tiny_hf_config

from rega_engine.batch import IGNORE_INDEX
from rega_engine.model import from_config
from rega_engine.model.llama import MLP, Attention, RMSNorm

DEVICE = "cpu" if attn.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not attn.INTERPRETED and not torch.cuda.is_available(),
    reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA device")


def run(model, ids, cu, labels):
    loss = model(ids, cu_seqlens=cu, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


# llama3: rope scaling with all three frequency branches (tiny_models); qwen2: q/k/v biases and
# theta 1e6. One row of three documents: positions restart twice.
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_fused_kernels_give_the_plain_model_loss_and_gradients(family):
    config = tiny_hf_config(family, num_hidden_layers=1)
    plain, fused = (from_config(config, seed=0).to(DEVICE) for _ in range(2))
    plain.kernel_backend = "torch"
    fused.kernel_backend = "triton"
    assert {m.backend for m in fused.modules() if isinstance(m, (Attention, MLP, RMSNorm))} \
        == {"triton"} and fused.cross_entropy_backend == "triton"
    ids = torch.randint(4, 256, (1, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cu = torch.tensor([0, 7, 20, 24], dtype=torch.int32, device=DEVICE)
    labels = ids.clone()
    labels[0, [0, 7, 20]] = IGNORE_INDEX
    want, got = run(plain, ids, cu, labels), run(fused, ids, cu, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fused_residual_norm_returns_the_sum_and_its_norm():
    norm = RMSNorm(64, 1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, residual = (torch.randn(5, 64, device=DEVICE) for _ in range(2))
    norm.backend = "torch"
    y_plain, sum_plain = norm(x, residual=residual)
    torch.testing.assert_close(sum_plain, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(y_plain, norm(x + residual), rtol=0, atol=0)
    norm.backend = "triton"
    y_fused, sum_fused = norm(x, residual=residual)
    torch.testing.assert_close(sum_fused, sum_plain, rtol=0, atol=0)
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-6)


def test_unknown_backend_is_refused_by_name():
    model = from_config(tiny_hf_config("llama2", num_hidden_layers=1), seed=0)
    model.attention_backend = "tritn"
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        model(torch.zeros(1, 4, dtype=torch.long))
