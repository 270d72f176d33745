"""Hugging Face checkpoints in and out: transformers must load what we write, unchanged; we load
what it writes (single file or sharded), refuse pickle, and name every problem."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint, tiny_hf_config

from rega_engine.model import (
    CheckpointError,
    from_config,
    from_pretrained,
    load_state_dict_into,
    save_pretrained,
)

ATOL = 1e-5
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama3"), "llama3", seed=1)


@pytest.fixture(scope="module")
def qwen2_tied_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=2,
                                tie_word_embeddings=True)


def _hf_load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _tensor_names(path):
    names = set()
    for file in os.listdir(path):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="pt") as f:
                names.update(f.keys())
    return names


@pytest.mark.parametrize("which", ["llama3_dir", "qwen2_tied_dir"])
def test_save_pretrained_loads_unchanged_in_transformers(request, tmp_path, which):
    ours = from_pretrained(request.getfixturevalue(which))
    save_pretrained(ours, tmp_path)
    hf = _hf_load(tmp_path)
    hf_state = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(hf_state[name], tensor, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(hf(IDS).logits.detach(), _logits(ours), atol=ATOL, rtol=1e-5)
    if ours.args.tie_word_embeddings:
        # written once, under the embedding's name, as transformers writes tied models
        assert "lm_head.weight" not in _tensor_names(tmp_path)
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in _tensor_names(tmp_path)
    # the generation config of the source checkpoint travels along
    with open(os.path.join(tmp_path, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == ours.args.eos_token_id


def test_model_from_a_config_dict_saves_in_bf16_for_transformers(tmp_path):
    model = from_config(tiny_hf_config("mistral"), seed=3)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)
    assert config["dtype"] == "bfloat16" and config["sliding_window"] == 64
    assert config["architectures"] == ["MistralForCausalLM"]
    hf = _hf_load(tmp_path)
    assert hf.config.num_key_value_heads == 2 and hf.config.sliding_window == 64
    for name, tensor in model.state_dict().items():
        assert hf.state_dict()[name].dtype == torch.bfloat16
        torch.testing.assert_close(hf.state_dict()[name], tensor.to(torch.bfloat16), atol=0,
                                   rtol=0, msg=name)
    assert model.model.embed_tokens.weight.dtype == torch.float32   # the model is untouched


def test_sharded_checkpoint_with_index_loads_here_and_in_transformers(llama3_dir, tmp_path):
    ours = from_pretrained(llama3_dir)
    save_pretrained(ours, tmp_path)                          # a single file first ...
    written = save_pretrained(ours, tmp_path, max_shard_size="100KB")   # ... then sharded
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards   # stale file removed
    assert "model.safetensors.index.json" in written
    with open(os.path.join(tmp_path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(ours.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded), _logits(ours), atol=0, rtol=0)
    torch.testing.assert_close(_hf_load(tmp_path)(IDS).logits.detach(), _logits(ours),
                               atol=ATOL, rtol=1e-5)


def test_pickle_only_directory_is_refused_with_a_conversion_hint(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(tiny_hf_config("llama2"), f)
    torch.save({"model.norm.weight": torch.ones(128)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\)"
                                              r".*save_pretrained"):
        from_pretrained(tmp_path)


def test_missing_files_are_named(tmp_path, llama3_dir):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        from_pretrained(tmp_path / "no-such-dir")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(tiny_hf_config("llama2"), f)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        from_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json"):
        from_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(tiny_hf_config("llama2"), f)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        from_pretrained(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_listed(llama3_dir, tmp_path):
    tensors = load_file(os.path.join(llama3_dir, "model.safetensors"))
    with open(os.path.join(llama3_dir, "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.2.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path)
    assert "missing tensor(s) the model needs: model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "unexpected tensor(s) the model has no place for: model.layers.2.mlp.up_proj.weight" \
        in str(err.value)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**config, "intermediate_size": 200}, f)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"down_proj.weight has shape \(128, 256\), the model "
                                              r"expects \(128, 200\)"):
        from_pretrained(tmp_path)


def test_meta_construction_then_load_fills_every_parameter(qwen2_tied_dir):
    model = from_pretrained(qwen2_tied_dir, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(CheckpointError, match="to_empty"):
        load_state_dict_into(model, qwen2_tied_dir)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    loaded = load_state_dict_into(model, qwen2_tied_dir)
    assert set(loaded) == {name for name, _ in model.named_parameters()}
    eager = from_pretrained(qwen2_tied_dir)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(_logits(model), _logits(eager), atol=0, rtol=0)


def test_fsdp2_sharded_and_wrapped_blocks_load_and_save(llama3_dir, tmp_path):
    """The training loop's path: meta build, wrap blocks, FSDP2, to_empty, load into DTensor
    shards; then save from a full state dict whose names carry the wrappers' segments."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    eager = from_pretrained(llama3_dir)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = from_pretrained(llama3_dir, device="meta")
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(layer)
            fully_shard(model.model.layers[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        assert isinstance(model.model.layers[0]._checkpoint_wrapped_module.mlp.up_proj.weight,
                          DTensor)
        load_state_dict_into(model, llama3_dir)
        torch.testing.assert_close(_logits(model), _logits(eager), atol=ATOL, rtol=1e-5)
        # named_parameters keeps the wrapper's segment in the names (state_dict strips it)
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v)
                for k, v in model.named_parameters()}
        assert any("_checkpoint_wrapped_module" in k for k in full)
        save_pretrained(eager, tmp_path, state_dict=full)
        with pytest.raises(CheckpointError, match="sharded DTensor"):
            save_pretrained(eager, tmp_path / "x", state_dict=model.state_dict())
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(eager), atol=0,
                               rtol=0)
