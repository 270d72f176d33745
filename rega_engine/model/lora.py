"""LoRA adapters on our own model, for parameter-efficient REGA runs (the `[lora]` config section).

`apply_lora(model, settings)` freezes every parameter and gives each target linear layer (by
its last name: q_proj, ..., down_proj) two small matrices, `lora_A` (rank x in) and `lora_B`
(out x rank), so that the layer computes

    y = x @ W.T (+ b) + scaling * lora_B(lora_A(dropout(x))),   scaling = alpha / rank,

PEFT's LoRA, term for term. The adapters are submodules of the linear layer itself and its
`forward` is replaced on the instance (as activation checkpointing does with blocks), so the
base parameter names stay transformers' own (`model.layers.0.self_attn.q_proj.weight`) and the
adapters sit next to them (`...q_proj.lora_A.weight`): checkpoints, the safetensors loader and
FSDP2 (per block) see one model. lora_A starts as PEFT's (Kaiming-uniform), lora_B at zero, so
step 0 is the base model.

The LM head is not a target: the fused cross-entropy reads the LM head's weight matrix
directly, so an adapter there would need the effective weight (as the HF integration forms
under PEFT) and is refused in validate_config instead.

At the end of a run (and by `rega-engine export`), `export_lora(model, hf_dir, ...)` writes
  <hf_dir>              the merged model (W + scaling * B @ A), a normal transformers checkpoint
                        (a run's <out_dir>/hf);
  <hf_dir>_adapter      adapter_config.json + adapter_model.safetensors, which
                        `peft.PeftModel.from_pretrained(base, dir)` loads, with PEFT's names
                        (`base_model.model.<module>.lora_A.weight`);
  <hf_dir>_base         the frozen base weights, only when the run started from a random
                        init (model.init_config); otherwise the adapter names model.path.
"""
from __future__ import annotations

import json
import math
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rega_engine import distributed

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
_LORA_SEGMENTS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config) -> LoRASettings:
        """From the [lora] section (config.LoRAConfig), as validate_config checked it."""
        return cls(rank=config.rank, alpha=float(config.alpha), dropout=float(config.dropout),
                   target_modules=tuple(config.target_modules))


def is_lora_name(name: str) -> bool:
    return any(segment in name for segment in _LORA_SEGMENTS)


def _lora_forward(self, x):
    return F.linear(x, self.weight,
                    self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scaling


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "lora_A", None),
                                                                         nn.Linear)]


def apply_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Freezes the model and adds adapters to every target linear layer (on the weights' device
    and dtype, the meta device included); returns the adapted layers' names. Initialise them with
    `init_lora_weights` once the base weights are in place."""
    from rega_engine.errors import ConfigError
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in settings.target_modules or not isinstance(module,
                                                                                    nn.Linear):
            continue
        kw = {"device": module.weight.device, "dtype": module.weight.dtype, "bias": False}
        module.lora_A = nn.Linear(module.in_features, settings.rank, **kw)
        module.lora_B = nn.Linear(settings.rank, module.out_features, **kw)
        module.lora_dropout = (nn.Dropout(settings.dropout) if settings.dropout > 0
                               else nn.Identity())
        module.lora_scaling = settings.scaling
        module.forward = types.MethodType(_lora_forward, module)
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"lora.target_modules = {list(settings.target_modules)}: no linear layer "
                          "of the model "
                          f"has one of these names (choose from {', '.join(LORA_TARGETS)})")
    model.lora_settings = settings
    return adapted


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """lora_A Kaiming-uniform as PEFT (and nn.Linear) draw it, from one generator seeded by
    `seed`, identical on every rank (each rank copies its shard of the same full tensor);
    lora_B zero."""
    from rega_engine.model.hf_io import _copy_into
    generator = torch.Generator().manual_seed(seed)
    for _, module in lora_layers(model):
        a = torch.empty(tuple(module.lora_A.weight.shape), dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        _copy_into(module.lora_A.weight, a)
        module.lora_B.weight.zero_()
        module.lora_A.weight.requires_grad_(True)
        module.lora_B.weight.requires_grad_(True)


def merge_state_dict(state_dict: dict, scaling: float) -> dict:
    """Full tensors by canonical name -> the base names only, each adapted weight replaced by
    W + scaling * B @ A (computed in fp32, in W's dtype)."""
    merged = {name: t for name, t in state_dict.items() if not is_lora_name(name)}
    for name in state_dict:
        if name.endswith(".lora_A.weight"):
            layer = name[: -len(".lora_A.weight")]
            a, b = state_dict[name].float(), state_dict[f"{layer}.lora_B.weight"].float()
            weight = merged[f"{layer}.weight"]
            merged[f"{layer}.weight"] = (weight.float() + scaling * (b @ a)).to(weight.dtype)
    return merged


def peft_adapter_config(settings: LoRASettings, base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.target_modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None,
    }


def export_lora(model: nn.Module, hf_dir: str | os.PathLike, *, dtype: torch.dtype, sharded: bool,
                tokenizer_dir: str | os.PathLike | None, base_path: str | os.PathLike
                | None) -> str:
    """The end of a [lora] run: the merged model in `hf_dir` (in `dtype`), the PEFT adapter
    (fp32) in <hf_dir>_adapter, and the base weights in <hf_dir>_base when `base_path`
    (model.path) is empty. A collective when `sharded`; rank 0 writes. Returns hf_dir."""
    from safetensors.torch import save_file

    from rega_engine.model import hf_io

    hf_dir = os.fspath(hf_dir)
    settings: LoRASettings = model.lora_settings
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    else:
        state = model.state_dict()
    if distributed.rank() == 0:
        state = {hf_io.canonical_name(k): v.detach().to("cpu") for k, v in state.items()}
        hf_io.save_pretrained(model, hf_dir, state_dict=merge_state_dict(state, settings.scaling),
                              dtype=dtype)
        if base_path:
            base = os.path.abspath(os.fspath(base_path))
        else:
            base = os.path.abspath(f"{hf_dir}_base")
            hf_io.save_pretrained(model, base, dtype=dtype,
                                  state_dict={k: v for k, v in state.items()
                                              if not is_lora_name(k)})
        adapter_dir = f"{hf_dir}_adapter"
        os.makedirs(adapter_dir, exist_ok=True)
        adapters = {PEFT_PREFIX + k: v.float().contiguous() for k, v in state.items()
                    if is_lora_name(k)}
        save_file(adapters, os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME),
                  metadata={"format": "pt"})
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(peft_adapter_config(settings, base), f, indent=2, sort_keys=True)
            f.write("\n")
        for directory in (hf_dir, adapter_dir, *([] if base_path else [base])):
            if tokenizer_dir and os.path.isdir(tokenizer_dir):
                hf_io.copy_tokenizer_files(tokenizer_dir, directory)
    distributed.barrier()
    return hf_dir
