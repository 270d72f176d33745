"""The model's arguments, and how a Hugging Face config.json becomes them.

`ModelArgs` is everything `llama.py` needs to build a model; `ModelArgs.from_hf_config` reads a
transformers config (a dict, a config.json or a checkpoint directory) of the Llama 2/3, Qwen2 and
Mistral families, filling in the defaults transformers would, and `to_hf_config` writes one back
that builds the same model on both sides. Kept apart from the model code as torchtitan keeps
`args.py` apart from `model.py`: the model reads plain fields, never a JSON file.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

from rega_engine.errors import ConfigError
from rega_engine.files import read_json_object

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Defaults transformers applies when config.json leaves a key out; they differ between families.
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
                "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "num_key_value_heads": 32, "sliding_window": 4096, "max_window_layers": 28},
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")


@dataclass(frozen=True)
class RopeArgs:
    theta: float = 10000.0
    rope_type: str = "default"          # "default" or "llama3"
    factor: float = 1.0                 # llama3 only
    low_freq_factor: float = 1.0        # llama3 only
    high_freq_factor: float = 4.0       # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeArgs = field(default_factory=RopeArgs)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    # Longest document the attention may see: set for Mistral/Qwen2 sliding-window configs, whose
    # window we do not implement; documents within it get exactly full causal attention.
    sliding_window: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The config.json as read, written back (with our resolved values) on save.
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> ModelArgs:
        """Reads a Hugging Face config: a dict, a config.json path or a checkpoint directory."""
        source = "config dict"
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such config.json (expected a Hugging Face "
                                        "checkpoint directory or its config.json)")
            config = read_json_object(path, error=ConfigError)   # a broken file names itself
            source = path
        return _parse_hf_config(copy.deepcopy(dict(config)), source)

    @property
    def family_architecture(self) -> str:
        return HF_ARCHITECTURES[self.model_type]

    def to_hf_config(self) -> dict:
        """The config.json to write: the original dict, with every value transformers would
        otherwise default differently filled in, so both sides build the same model."""
        out = copy.deepcopy(self.hf_config)
        out.update({
            "model_type": self.model_type,
            "architectures": [self.family_architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        })
        if self.model_type != "qwen2" or "head_dim" in out:
            out["head_dim"] = self.head_dim
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in out or getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if "rope_parameters" not in out and "rope_theta" not in out:
            out["rope_theta"] = self.rope.theta
        return out


# Sizes that must be whole numbers >= 1 where config.json gives them; anything else would fail
# later, far from the file, as a ZeroDivisionError or a torch shape error.
_SIZE_KEYS = (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_sizes(cfg: dict, source: str) -> None:
    for key in _SIZE_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value,
                                                                            int) or value < 1):
            raise ConfigError(f"{source}: {key} = {value!r}, expected a whole number >= 1")


def _parse_hf_config(cfg: dict, source: str) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported "
                          f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    _check_sizes(cfg, source)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
    defaults = _FAMILY_DEFAULTS[model_type]

    def get(key, default):
        value = cfg.get(key, defaults.get(key, default))
        return default if value is None and default is not None else value

    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    n_kv = int(get("num_key_value_heads", n_heads))
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % n_heads:
            raise ConfigError(f"{source}: hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {n_heads}; set head_dim")
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise ConfigError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                          f"num_key_value_heads {n_kv}")
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")

    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "llama":
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
    else:
        qkv_bias = o_bias = mlp_bias = False

    max_pos = int(get("max_position_embeddings", 2048))
    return ModelArgs(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(head_dim),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope=_parse_rope(cfg, source, max_pos),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        initializer_range=float(get("initializer_range", 0.02)),
        max_position_embeddings=max_pos,
        sliding_window=_parse_sliding_window(cfg, model_type, defaults, source),
        bos_token_id=get("bos_token_id", None),
        eos_token_id=get("eos_token_id", None),
        pad_token_id=cfg.get("pad_token_id"),
        hf_config=cfg,
    )


def _parse_rope(cfg: dict, source: str, max_pos: int) -> RopeArgs:
    # transformers < 5 writes rope_theta + rope_scaling; transformers 5 folds both into
    # rope_parameters (possibly nested by layer type, which no family here uses).
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, got {params!r}")
    if "partial_rotary_factor" in params or "partial_rotary_factor" in cfg:
        if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return RopeArgs(theta=theta)
    if rope_type != "llama3":
        raise ConfigError(f"{source}: {key}.rope_type {rope_type!r} is not supported "
                          "(supported: 'default', 'llama3')")
    try:
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
    except KeyError as e:
        raise ConfigError(f"{source}: {key} of rope_type 'llama3' lacks {e.args[0]!r}") from None
    if high <= low:
        raise ConfigError(f"{source}: {key}.high_freq_factor ({high}) must exceed "
                          f"low_freq_factor ({low})")
    original = params.get("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings", max_pos))
    return RopeArgs(theta=theta, rope_type="llama3", factor=factor, low_freq_factor=low,
                    high_freq_factor=high, original_max_position_embeddings=int(original))


def _parse_sliding_window(cfg: dict, model_type: str, defaults: dict, source: str) -> int | None:
    if model_type == "mistral":
        window = cfg.get("sliding_window", defaults["sliding_window"])
        return None if window is None else int(window)
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return None
        window = cfg.get("sliding_window", defaults["sliding_window"])
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            first = int(cfg.get("max_window_layers", defaults["max_window_layers"]))
            any_sliding = first < int(cfg["num_hidden_layers"])
        else:
            any_sliding = "sliding_attention" in layer_types
        return int(window) if window is not None and any_sliding else None
    return None
