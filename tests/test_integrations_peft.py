"""apply_rega_kernels under PEFT LoRA (CPU, fp32): the fused loss reads the LM head's effective
weight W + scaling * B @ A, so an adapter on lm_head gets its gradient (peer libraries have
silently dropped it); every adapter's gradient equals the unpatched PEFT model's, frozen base
weights get none, and what has no exact effective weight is refused by module name."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import flattened_batch, make_hf_model

from rega_engine.integrations.hf import apply_rega_kernels

peft = pytest.importorskip("peft")

# fp32 CPU; measured max |diff| <= 1.5e-6 on the loss and on any adapter gradient (torch and
# Triton).
ATOL, RTOL = 1e-5, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _peft_model(family="llama3", **lora):
    model = make_hf_model(family, use_cache=False)
    model.set_attn_implementation("sdpa")
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                    init_lora_weights=False)    # B != 0, so that A's gradient is not trivially zero
    settings.update(lora)
    torch.manual_seed(0)
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


def _batch(lengths=(9, 17, 6)):
    return flattened_batch(lengths, seed=1)


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


def _assert_same(reference, patched, batch):
    ref_out, ref_grads = _loss_and_grads(reference, batch)
    out, grads = _loss_and_grads(patched, batch)
    assert out.logits is None        # the fused loss ran
    torch.testing.assert_close(out.loss, ref_out.loss, atol=ATOL, rtol=RTOL)
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert any("lm_head.lora_A" in n for n in trainable) and any("lm_head.lora_B" in n
                                                                 for n in trainable)
    for name, grad in grads.items():
        if name in trainable:
            assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
            torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=RTOL, msg=name)
        else:
            assert grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("family,backend", [("llama3", "torch"), ("qwen2", "triton")])
def test_lora_adapters_get_the_unpatched_gradients(family, backend):
    # Every kernel on (attention, loss, RMSNorm, rope, SwiGLU); Qwen2 adds q/k/v biases. The
    # interpreted Triton kernels get a shorter row.
    reference = _peft_model(family)
    patched = apply_rega_kernels(copy.deepcopy(reference), backend=backend)
    _assert_same(reference, patched, _batch((7, 5)) if backend == "triton" else _batch())


def test_patching_before_wrapping_works_too():
    # apply_rega_kernels on the plain model, then get_peft_model: the adapters PEFT puts in place
    # of lm_head, q_proj, ... are read at every forward, not captured at patch time.
    reference = _peft_model()
    base = make_hf_model("llama3", use_cache=False)
    base.set_attn_implementation("sdpa")
    apply_rega_kernels(base, backend="torch")
    torch.manual_seed(0)
    patched = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=TARGETS,
                                                        init_lora_weights=False))
    _assert_same(reference, patched, _batch())
    # A disabled adapter is the base LM head again, as in PEFT's own forward.
    with torch.no_grad():
        enabled = patched.train()(**_batch()).loss
        with reference.disable_adapter(), patched.disable_adapter():
            out = patched.train()(**_batch())
            assert out.logits is None
            torch.testing.assert_close(out.loss, reference.train()(**_batch()).loss, atol=ATOL,
                                       rtol=RTOL)
    assert abs(float(out.loss) - float(enabled)) > 1e-3      # the adapters did change the loss


def test_modules_to_save_lm_head_trains_its_copy():
    reference = _peft_model(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    patched = apply_rega_kernels(copy.deepcopy(reference), backend="torch")
    ref_out, ref_grads = _loss_and_grads(reference, _batch())
    out, grads = _loss_and_grads(patched, _batch())
    torch.testing.assert_close(out.loss, ref_out.loss, atol=ATOL, rtol=RTOL)
    name = next(n for n in grads if "lm_head.modules_to_save" in n)
    torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=RTOL)


def test_what_has_no_exact_effective_weight_is_refused():
    with pytest.raises(ValueError,
        match=r"LlamaForCausalLM\.lm_head \(LoRA adapter 'default'\) has lora_dropout=0\.1"):
        apply_rega_kernels(_peft_model(lora_dropout=0.1))
    with pytest.raises(ValueError,
        match=r"lm_head \(LoRA adapter 'default'\) uses a LoRA variant \(e\.g\. DoRA\)"):
        apply_rega_kernels(_peft_model(use_dora=True))
    # Dropout on the other layers is PEFT's own forward: fine; without the fused loss, fine too.
    apply_rega_kernels(_peft_model(lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    apply_rega_kernels(_peft_model(lora_dropout=0.1), cross_entropy=False)
