"""Tiny Llama-family configurations and checkpoints for tests (shared by several test modules).

`tiny_hf_config(family)` is a config.json dict in the transformers 4 layout (rope_theta +
rope_scaling); `make_tiny_checkpoint` saves a random transformers model, whose config.json is
then in the installed transformers' own layout, so between them both layouts get exercised.

Sizes: hidden 128, 2 layers, 4 query heads and 2 key/value heads of head_dim 32 (the smallest
head dim the Triton attention kernel takes), vocab 256.
"""
from __future__ import annotations

import os

import torch

FAMILIES = ("llama2", "llama3", "qwen2", "mistral")

_BASE = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_FAMILY = {
    "llama2": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "rope_theta": 10000.0},
    # original_max_position_embeddings is small so that, at head_dim 32, some frequencies are
    # kept, some blended and some divided by `factor`: all three llama3 branches are exercised.
    "llama3": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
              "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": None,
              "bos_token_id": 0, "eos_token_id": 3},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                "rope_theta": 10000.0, "sliding_window": 64},
}


def tiny_hf_config(family: str, **overrides) -> dict:
    """A config.json dict for a tiny model of `family` (one of FAMILIES)."""
    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    config = {**_BASE, **_FAMILY[family]}
    config.update(overrides)
    return config


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights of realistic scale: transformers' own init (std 0.02, zero biases, unit
    norms) makes attention nearly uniform, which would hide position and bias mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            else:   # also embeddings: a tied table is the LM head too
                value = noise / p.shape[-1] ** 0.5
            p.copy_(value.to(p.dtype))


def make_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random transformers model (eager attention) for a tiny config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config_dict = tiny_hf_config(family, **overrides)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    _spread_weights(model, seed)
    return model.eval()


def make_tiny_checkpoint(path: str | os.PathLike, family: str, seed: int = 0,
                         dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Saves a random transformers model of a tiny config to `path` (safetensors); returns path."""
    path = os.fspath(path)
    make_hf_model(family, seed=seed, dtype=dtype, **overrides).save_pretrained(path)
    return path


def flattened_batch(lengths, seed=0):
    """Documents of `lengths` random tokens flattened into one row by PaddingFreeCollator:
    positions restart per document (so do the rope angles); 3 prompt tokens per document carry
    no loss."""
    from rega_engine.batch import IGNORE_INDEX
    from rega_engine.integrations.hf import PaddingFreeCollator
    generator = torch.Generator().manual_seed(seed)
    features = []
    for n in lengths:
        ids = torch.randint(4, 256, (n,), generator=generator)
        labels = ids.clone()
        labels[:3] = IGNORE_INDEX
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return PaddingFreeCollator()(features)
