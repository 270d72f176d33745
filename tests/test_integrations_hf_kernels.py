"""apply_rega_kernels' RMSNorm, rotary embedding and SwiGLU switches on tiny random transformers
Llama 3 / Qwen2 / Mistral models (CPU, fp32): the patched model's loss and every gradient equal
the unpatched model's, each switch alone and all together, on the PyTorch backend and on the
Triton kernels under the interpreter; what the kernels cannot do exactly is refused by name."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from tiny_models import flattened_batch, make_hf_model

from rega_engine.integrations.hf import PaddingFreeCollator, apply_rega_kernels

# fp32 on CPU: the kernels compute in fp32 like HF, so only summation order differs. Measured
# max |diff| <= 1e-6 on the loss and 7e-7 on any gradient (torch and interpreted Triton).
LOSS_ATOL, GRAD_ATOL, RTOL = 1e-5, 1e-5, 1e-4
FAMILIES = ["llama3", "qwen2", "mistral"]
NEW_SWITCHES = ("rms_norm", "rope", "swiglu")
ALL_OFF = dict(attention=False, cross_entropy=False, rms_norm=False, rope=False, swiglu=False)


def _reference(family, **overrides):
    model = make_hf_model(family, use_cache=False, **overrides)
    model.set_attn_implementation("sdpa")
    return model


def _batch(lengths, seed=0):
    return flattened_batch(lengths, seed)


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_training(reference, patched, batch):
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    loss, grads = _loss_and_grads(patched, batch)
    torch.testing.assert_close(loss, ref_loss, atol=LOSS_ATOL, rtol=RTOL)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=GRAD_ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("switches", [("rms_norm",), ("rope",), ("swiglu",), "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_switch_matches_the_unpatched_model(family, switches):
    reference = _reference(family)
    on = dict(ALL_OFF, **{s: True for s in switches}) if switches != "all" else {}
    patched = apply_rega_kernels(copy.deepcopy(reference), backend="torch", **on)
    _assert_same_training(reference, patched, _batch([9, 14, 5]))


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_kernels_under_the_interpreter_match(family):
    reference = _reference(family)
    patched = apply_rega_kernels(copy.deepcopy(reference), backend="triton",
                                 **dict(ALL_OFF, rms_norm=True, rope=True, swiglu=True))
    _assert_same_training(reference, patched, _batch([7, 5]))


def test_the_kernels_really_run(monkeypatch):
    # A test that equal numbers prove the kernels ran: count the calls into each public function.
    # (rega_engine.kernels.rms_norm is the function; the modules come from importlib.)
    rms_module = importlib.import_module("rega_engine.kernels.rms_norm")
    rope_module = importlib.import_module("rega_engine.kernels.rope")
    swiglu_module = importlib.import_module("rega_engine.kernels.swiglu")
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0}

    def spy(module, attribute, key):
        original = getattr(module, attribute)

        def counted(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, attribute, counted)
    spy(rms_module, "rms_norm", "rms_norm")
    spy(rope_module, "rotary_embedding", "rope")
    spy(swiglu_module, "swiglu", "swiglu")
    model = apply_rega_kernels(_reference("llama3"), backend="torch")
    model(**_batch([6, 6]))
    # 2 layers: two norms each plus the final norm; one rope and one MLP per layer.
    assert calls == {"rms_norm": 5, "rope": 2, "swiglu": 2}
    # Generation with a KV cache keeps HF's own rope (the cache API is HF's business) and agrees.
    reference = _reference("llama3").eval()
    model.eval()
    reference.config.use_cache = model.config.use_cache = True
    prompt = _batch([8])["input_ids"]
    want = reference.generate(prompt, max_new_tokens=5, do_sample=False)
    assert model.generate(prompt, max_new_tokens=5, do_sample=False).tolist() == want.tolist()


def test_hub_kernelized_models_keep_our_kernels_across_train_and_eval(tmp_path):
    # transformers >= 5.25 loads every model with hub kernels on (use_kernels defaults to True)
    # and kernelizes again at each train()/eval() switch, which put HF's RMSNorm forward back
    # over ours. Loaded the plain user way, patched, then switched: our forwards must stay.
    from transformers import AutoModelForCausalLM
    make_hf_model("llama3").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    patched = apply_rega_kernels(model, backend="torch")
    patched.train()
    patched.eval()
    patched.train()
    assert not getattr(patched, "use_kernels", False)
    norms = [m for n, m in patched.named_modules() if n.endswith("norm")]
    assert len(norms) == 5
    assert all(m.forward.__func__.__name__ == "_rms_norm_forward" for m in norms)
    mlps = [m for n, m in patched.named_modules() if n.endswith("mlp")]
    assert mlps and all(m.forward.__func__.__name__ == "_swiglu_forward" for m in mlps)


def test_plain_transformers_loads_have_hub_kernels_off(tmp_path):
    # The parity references, distill and eval load through load_transformers_model.
    from rega_engine.generation import load_model
    from rega_engine.model.hf_io import load_transformers_model
    make_hf_model("llama3").save_pretrained(tmp_path)
    assert not getattr(load_transformers_model(tmp_path), "use_kernels", False)
    assert not getattr(load_model(tmp_path, device="cpu"), "use_kernels", False)


def test_rope_restarts_per_document():
    # Two documents in one row must give each its solo logits: a rope that kept counting across
    # the row would rotate the second document by the wrong angles.
    reference = _reference("llama3").eval()
    patched = apply_rega_kernels(copy.deepcopy(reference), backend="torch").eval()
    a, b = torch.randint(4, 256, (11,)), torch.randint(4, 256, (7,))
    row = PaddingFreeCollator()([{"input_ids": a}, {"input_ids": b}])
    with torch.no_grad():
        logits = patched(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0]
        torch.testing.assert_close(logits[11:], reference(input_ids=b[None]).logits[0], atol=1e-5,
                                   rtol=1e-5)


def test_unsupported_configs_are_refused_by_module_name():
    gelu = _reference("llama2", hidden_act="gelu")
    with pytest.raises(ValueError,
        match=r"model\.layers\.0\.mlp has act_fn GELUActivation .*hidden_act='gelu'"):
        apply_rega_kernels(gelu)
    # The refusal left the model unpatched (checks run before any patch); without the switch it
    # works.
    assert not gelu.__dict__.get("_rega_patched") and "forward" not in gelu.model.norm.__dict__
    assert apply_rega_kernels(gelu, swiglu=False)._rega_patched == {"attention", "cross_entropy",
                                                                    "rms_norm", "rope"}
    yarn = _reference("llama2", rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                              "original_max_position_embeddings": 128})
    with pytest.raises(ValueError,
                       match=r"LlamaForCausalLM\.model\.rotary_emb has rope_type='yarn'"):
        apply_rega_kernels(yarn)
    dynamic = _reference("qwen2", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        apply_rega_kernels(dynamic)
    apply_rega_kernels(dynamic, rope=False)
