"""`rega-engine model-config`: a Llama config.json for training a base model from scratch
(model.init_config), in a few sizes, sized to a tokenizer.

Presets: `tiny` (the bundled demo's shape: trains on a CPU in minutes), `1b` (the shape of
Llama 3.2 1B) and `8b` (Llama 3.1 8B). The vocabulary is the tokenizer's (`--tokenizer DIR`: its
length, and its bos / eos / pad ids) or `--vocab-size N`. The file is what transformers'
`AutoConfig` and `rega_engine.model.from_config` both load.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS = {
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
             "rope_theta": 10000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
           "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}


def tokenizer_facts(tokenizer) -> dict:
    """What a model config needs from a tokenizer: its size and special token ids (None if
    absent)."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def model_config(preset: str, vocab_size: int, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The config.json of `preset` with a vocabulary of `vocab_size` ids."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": int(vocab_size),
              **PRESETS[preset], "hidden_act": "silu", "initializer_range": 0.02,
              "attention_bias": False, "mlp_bias": False}
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                       ("pad_token_id", pad_token_id)):
        if value is not None:
            config[key] = int(value)
    return config


def parameter_count(config: dict) -> int:
    """Parameters of a Llama config (embeddings and LM head included)."""
    h, v = config["hidden_size"], config["vocab_size"]
    i, n = config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    block = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return n * block + h + v * h * (1 if config["tie_word_embeddings"] else 2)


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import ConfigError

    parser = argparse.ArgumentParser(
        prog="rega-engine model-config", allow_abbrev=False,
        description="write a Llama config.json to train a base model from scratch "
                    "(model.init_config)")
    parser.add_argument("--preset", required=True, choices=list(PRESETS),
                        help="tiny: the demo's shape (CPU, minutes); 1b: Llama 3.2 1B's; 8b: Llama "
                             "3.1 8B's")
    parser.add_argument("--tokenizer",
                        help="tokenizer directory: its vocabulary size and bos/eos/pad ids")
    parser.add_argument("--vocab-size", type=int,
                        help="vocabulary size (default: the tokenizer's; at least the tokenizer's "
                             "if both are given)")
    parser.add_argument("--out", default="config.json", help="output file (default config.json)")
    args = parser.parse_args(argv)
    facts = {"vocab_size": args.vocab_size, "bos_token_id": None, "eos_token_id": None,
             "pad_token_id": None}
    if args.tokenizer:
        from ..tokenizer import load_tokenizer
        found = tokenizer_facts(load_tokenizer(args.tokenizer, "--tokenizer"))
        if args.vocab_size is not None and args.vocab_size < found["vocab_size"]:
            raise ConfigError(f"--vocab-size {args.vocab_size} is below the {found['vocab_size']} "
                              f"ids of the tokenizer {args.tokenizer}; leave --vocab-size out to "
                              "use the tokenizer's")
        facts = {**found, "vocab_size": args.vocab_size or found["vocab_size"]}
    if facts["vocab_size"] is None:
        parser.error("give --tokenizer DIR (its vocabulary) or --vocab-size N")
    if facts["vocab_size"] < 1:
        parser.error(f"--vocab-size {facts['vocab_size']}: must be >= 1")
    config = model_config(args.preset, **facts)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    ids = ", ".join(f"{k.replace('_token_id', '')} {config[k]}" for k in ("bos_token_id",
                                                                          "eos_token_id",
                                                                          "pad_token_id")
                                                                          if k in config)
    print(f"wrote {args.out}: Llama, preset {args.preset}, {parameter_count(config) / 1e6:.1f}M "
          "parameters, "
          f"vocab_size {config['vocab_size']}" + (f", special token ids: {ids}" if ids else
                                                  " (no special token ids: give --tokenizer to add "
                                                  "them)"))
    print(f"train it from scratch with model.init_config = \"{args.out}\" (rega-engine train "
          f"--config ... --model.init_config={args.out})")
    return 0
