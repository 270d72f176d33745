"""[lora] runs of our own loop (CPU, fp32, the tiny test config of train_helpers): only the
adapters train and sit in the optimizer, the fused loss trains them, a SIGTERM + resume ends
bit-exactly where an uninterrupted run ends, and the run exports a PEFT adapter that
`peft.PeftModel.from_pretrained` loads onto the exported base with our model's logits, next to a
merged checkpoint with the same logits. Plus the [lora] value rules of validate_config."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import one_torch_thread, run_config  # noqa: F401  (fixture)

from rega_engine.config import ConfigError, load_config
from rega_engine.model import lora
from rega_engine.train import loop

LORA = ("--lora.rank=4", "--lora.alpha=8",
        "--lora.target_modules=['q_proj', 'v_proj', 'gate_proj', 'down_proj']")
# fp32 on CPU: our kernels' reference backend against transformers' SDPA layers (measured: PEFT 0.0,
# merged export 5e-7; the trained adapters move the logits by 0.11 from the base).
LOGITS_ATOL = 1e-4


def _probe():
    generator = torch.Generator().manual_seed(3)
    return torch.randint(4, 256, (2, 24), generator=generator)


def test_lora_run_trains_adapters_resumes_and_exports_for_peft(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    from rega_engine.model.hf_io import load_transformers_model

    seen = {}
    make_optimizer, export = loop._make_optimizer, lora.export_lora

    def capture_optimizer(model, *args, **kwargs):
        optimizer = make_optimizer(model, *args, **kwargs)
        seen["optimized"] = {id(p) for g in optimizer.param_groups for p in g["params"]}
        seen["names"] = {id(p): n for n, p in model.named_parameters()}
        return optimizer

    def capture_export(model, hf_dir, **kwargs):
        # The trained model as it is in memory at the end of the run.
        seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            seen["logits"] = model.eval()(_probe()).logits
        return export(model, hf_dir, **kwargs)
    monkeypatch.setattr(loop, "_make_optimizer", capture_optimizer)
    monkeypatch.setattr(lora, "export_lora", capture_export)

    config = run_config(tmp_path, *LORA, "--checkpoint.export=true", steps=4)
    assert loop.train(config) == 0
    run = tmp_path / "run"
    optimized = sorted(seen["names"][i] for i in seen["optimized"])
    # A and B x 4 targets x 2 layers
    assert optimized == seen["trainable"] and len(optimized) == 2 * 4 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in optimized)

    # The base weights stayed frozen: hf_base is the random init itself.
    from rega_engine.model import from_config
    init = from_config(tmp_path / "model.json", dtype=torch.float32, device="cpu",
                       seed=0).state_dict()
    base = load_file(run / "hf_base" / "model.safetensors")
    assert base.keys() == {k for k in init if not k.endswith("inv_freq")}
    for name, tensor in base.items():
        assert torch.equal(tensor, init[name]), name

    # PEFT loads the adapter onto the base: our logits; the merged export gives them too.
    adapter_config = json.loads((run / "hf_adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(run / "hf_base")
    adapters = load_file(run / "hf_adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapters
    assert all(t.abs().sum() > 0 for t in adapters.values())       # lora_B moved away from 0
    base_model = load_transformers_model(run / "hf_base", dtype=torch.float32)
    with torch.no_grad():
        base_logits = base_model.eval()(_probe()).logits
        peft_model = peft.PeftModel.from_pretrained(base_model, run / "hf_adapter").eval()
        peft_logits = peft_model(_probe()).logits
        merged_logits = load_transformers_model(run / "hf",
            dtype=torch.float32).eval()(_probe()).logits
    assert (base_logits - seen["logits"]).abs().max() > 100 * LOGITS_ATOL     # the adapters matter
    torch.testing.assert_close(peft_logits, seen["logits"], atol=LOGITS_ATOL, rtol=1e-4)
    torch.testing.assert_close(merged_logits, seen["logits"], atol=LOGITS_ATOL, rtol=1e-4)

    # SIGTERM after step 2 saves a checkpoint (exit 143); --resume finishes bit-exactly as above.
    monkeypatch.setattr(lora, "export_lora", export)
    step = loop.optimizer_step

    def terminated_after_step_2(*args, **kwargs):
        result = step(*args, **kwargs)
        if kwargs["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(loop, "optimizer_step", terminated_after_step_2)
    resumed = tmp_path / "resumed"
    assert loop.train(run_config(tmp_path, *LORA, "--checkpoint.export=true",
                                 f"--train.out_dir={resumed}",
                                 steps=4)) == loop.PREEMPTED_EXIT_CODE
    monkeypatch.setattr(loop, "optimizer_step", step)
    assert loop.train(run_config(tmp_path, *LORA, "--checkpoint.export=true",
                                 f"--train.out_dir={resumed}",
                                 "--checkpoint.resume=true", steps=4)) == 0
    again = load_file(resumed / "hf_adapter" / "adapter_model.safetensors")
    assert again.keys() == adapters.keys()
    for name, tensor in adapters.items():
        assert torch.equal(again[name], tensor), name


def test_lora_config_rules():
    def load(*overrides):
        return load_config(None, list(overrides))
    assert load().lora.rank == 0                          # off by default
    assert load("--lora.rank=8").lora.target_modules[0] == "q_proj"
    for override, key in (("--lora.rank=-1", "lora.rank"), ("--lora.alpha=0", "lora.alpha"),
                          ("--lora.dropout=1.0", "lora.dropout"), ("--lora.target_modules=[]",
                                                                   "lora.target_modules")):
        with pytest.raises(ConfigError, match=key):
            load("--lora.rank=4", override)
    with pytest.raises(ConfigError, match="'lm_head' cannot take an adapter"):
        load("--lora.rank=4", "--lora.target_modules=['q_proj', 'lm_head']")
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        load("--lora.rank=4", "--lora.target_modules=['q_prj']")
    with pytest.raises(ConfigError, match="lora.rank > 0 with train.precision = 'fp8'"):
        load("--lora.rank=4", "--train.precision=fp8")


def test_lora_under_fsdp2_bf16(tmp_path, monkeypatch):
    # model.dtype = bf16 on CPU runs the FSDP2 path (a process group of one): adapters built on
    # the meta device, the base drawn shard by shard as one process draws it, the adapters
    # initialised after it.
    peft = pytest.importorskip("peft")
    from rega_engine.model import from_config
    from rega_engine.model.hf_io import load_transformers_model
    seen = {}
    export = lora.export_lora

    def capture_export(model, hf_dir, **kwargs):
        seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return export(model, hf_dir, **kwargs)
    monkeypatch.setattr(lora, "export_lora", capture_export)
    assert loop.train(run_config(tmp_path, *LORA, "--model.dtype=bf16", "--checkpoint.export=true",
                                 steps=2)) == 0
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    run = tmp_path / "run"
    init = from_config(tmp_path / "model.json", dtype=torch.float32, device="cpu",
                       seed=0).state_dict()
    for name, tensor in load_file(run / "hf_base" / "model.safetensors").items():
        assert torch.equal(tensor, init[name].to(torch.bfloat16)), name
    with torch.no_grad():
        base = load_transformers_model(run / "hf_base", dtype=torch.float32)
        peft_logits = peft.PeftModel.from_pretrained(base,
                                                     run / "hf_adapter").eval()(_probe()).logits
        merged = load_transformers_model(run / "hf",
                                                      dtype=torch.float32).eval()(_probe()).logits
    # The merged weights are rounded to bf16 once more than W + BA computed by PEFT.
    torch.testing.assert_close(merged, peft_logits, atol=1e-2, rtol=1e-2)     # measured 2.6e-3
