"""Hugging Face checkpoints in and out: config.json + safetensors, never pickle.

Our parameter names are transformers' own, so the mapping is the identity apart from wrapper
segments that torch.compile / activation checkpointing insert into module paths. Loading works
tensor by tensor, so the training loop can build the model on the meta device, shard it with
FSDP2, and fill each (DTensor) shard straight from the files:

    model = from_pretrained(path, device="meta")   # config + name check, no data read
    ... fully_shard(...) per block and at the root ...
    model.to_empty(device="cuda")
    load_state_dict_into(model, path)

Writing: `save_pretrained(model, path)` for any model here; `export_pretrained` for the end of a
training run (gathers FSDP2 shards onto rank 0 and copies the tokenizer files alongside).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from rega_engine import distributed
from rega_engine.errors import CheckpointError
from rega_engine.files import open_safetensors, read_json_object
from rega_engine.model.args import ModelArgs
from rega_engine.model.llama import CausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")
_SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Module-path segments that wrappers insert; the checkpoint never has them.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
# Tensors some exported checkpoints carry that are not parameters (recomputed from the config).
_NON_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files that make a tokenizer directory loadable by transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def canonical_name(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading


def weight_map(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file for a checkpoint directory (single file or index)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    index_file = os.path.join(path, INDEX_NAME)
    single_file = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(index_file):
        index = read_json_object(index_file, error=CheckpointError)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_file}: no 'weight_map' object")
        mapping = {name: os.path.join(path, file) for name, file in index["weight_map"].items()}
        absent = sorted({f for f in mapping.values() if not os.path.isfile(f)})
        if absent:
            raise FileNotFoundError(f"{index_file} names shard file(s) that do not exist: "
                                    f"{_list(absent)}")
        return mapping
    if os.path.isfile(single_file):
        with open_safetensors(single_file) as f:
            return {name: single_file for name in f.keys()}
    pickles = [n for n in _PICKLE_NAMES if os.path.isfile(os.path.join(path, n))]
    pickles += sorted(n for n in os.listdir(path) if n.endswith(".bin") and n not in pickles)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({_list(pickles, 3)}), which rega-engine never "
            "loads (unpickling can run arbitrary code). Convert the checkpoint once, in an "
            "environment where you trust it, e.g.: python -c \"from transformers import "
            "AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('DIR')\"")
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> parameter/buffer to fill, for a (possibly wrapped or sharded) model."""
    # LoRA adapters (model/lora.py) are no part of a transformers checkpoint: they are exported
    # merged into the weights or as a PEFT adapter, and initialised, not loaded.
    return {canonical_name(name): t for name, t in model.state_dict(keep_vars=True).items()
            if ".lora_A." not in name and ".lora_B." not in name}


def _check_names(expected: Iterable[str], available: Iterable[str], tied: bool,
                 where: str) -> set[str]:
    """The checkpoint names to load; raises listing every missing and unexpected name."""
    expected, available = set(expected), set(available)
    ignorable = {n for n in available if n.endswith(_NON_WEIGHT_SUFFIXES)}
    if tied:
        ignorable.add("lm_head.weight")   # tied checkpoints may store the shared table twice
    missing = expected - available
    unexpected = available - expected - ignorable
    problems = []
    if missing:
        problems.append(f"missing tensor(s) the model needs: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) the model has no place for: {_list(unexpected)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems) +
                              ". Check that config.json matches the weights (model_type, "
                              "num_hidden_layers, tie_word_embeddings, attention_bias).")
    return expected & available


_DISTRIBUTE_HAS_SRC_RANK = None


def shard_region(shape: Sequence[int], placements: Sequence, mesh_shape: Sequence[int],
                 coordinate: Sequence[int]) -> tuple[slice, ...] | None:
    """The box of a full tensor of `shape` that the mesh member at `coordinate` holds when the
    tensor is laid out by DTensor `placements` (one per mesh dim, mesh of `mesh_shape`): one
    slice per tensor dim. Shard(d) splits dim d the way torch.chunk does, as DTensor and FSDP2
    do: pieces of ceil(n / k) rows, the last ones shorter or empty (an empty piece starts at the
    end of the box it splits); several Shard placements apply in mesh-dim order, each splitting
    what the ones before left; Replicate() keeps the whole. None for any other placement
    (Partial, _StridedShard, ...): the caller must then take the general path. What torch's
    private compute_local_shape_and_global_offset gives for these placements, without it."""
    from torch.distributed.tensor import Replicate, Shard

    starts, sizes = [0] * len(shape), [int(n) for n in shape]
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard or not shape:   # exact types: _StridedShard is no Shard
            return None
        dim = placement.dim % len(shape)
        chunk = -(-sizes[dim] // mesh_shape[mesh_dim])
        begin = min(chunk * coordinate[mesh_dim], sizes[dim])
        end = min(begin + chunk, sizes[dim])
        starts[dim] += begin
        sizes[dim] = end - begin
    return tuple(slice(start, start + size) for start, size in zip(starts, sizes))


def local_region(target: torch.Tensor) -> tuple[slice, ...] | None:
    """For a DTensor laid out by Shard / Replicate placements: the box of the full tensor its
    local tensor on this rank holds (shard_region), checked against the local tensor's shape.
    None for a plain tensor, other placements, a rank outside the mesh, or a local tensor that
    is not that box."""
    from torch.distributed.tensor import DTensor
    if not isinstance(target, DTensor):
        return None
    mesh = target.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    region = shard_region(tuple(target.shape), target.placements, tuple(mesh.shape), coordinate)
    if region is None or tuple(s.stop - s.start for s in region) != tuple(
            target.to_local().shape):
        return None
    return region


def _copy_local(target: torch.Tensor, piece: torch.Tensor) -> None:
    """Copies the box `piece` of a full tensor (local_region's) into the DTensor's local shard,
    casting to its dtype and device."""
    target.to_local().copy_(piece)


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copies a full tensor into a parameter; a DTensor keeps the part its local shard holds
    (every rank has the full tensor, so no communication). Call under torch.no_grad()."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(target, DTensor):
        region = local_region(target)
        if region is not None:
            _copy_local(target, full[region])
            return
        global _DISTRIBUTE_HAS_SRC_RANK
        if _DISTRIBUTE_HAS_SRC_RANK is None:
            _DISTRIBUTE_HAS_SRC_RANK = "src_data_rank" in inspect.signature(
                distribute_tensor).parameters
        full = full.to(device=target.device, dtype=target.dtype)
        # Other placements: distribute_tensor cuts the shard; with src_data_rank=None from
        # this rank's own full tensor, without communication.
        extra = {"src_data_rank": None} if _DISTRIBUTE_HAS_SRC_RANK else {}
        target.copy_(distribute_tensor(full, target.device_mesh, target.placements, **extra))
    else:
        target.copy_(full)


@torch.no_grad()
def load_state_dict_into(model: nn.Module, path: str | os.PathLike, *,
                         mapping: dict[str, str] | None = None) -> list[str]:
    """Fills every parameter of `model` from the safetensors checkpoint in `path`, one tensor at a
    time, casting to each parameter's dtype. Parameters may be plain tensors or FSDP2 DTensor
    shards; they must be materialised (`to_empty`) first. Returns the names loaded.

    A DTensor sharded by Shard / Replicate placements (FSDP2's Shard(0), HSDP's Replicate() and
    Shard(0)) reads only the rows its local shard holds (`get_slice`), so no rank reads or holds
    a whole tensor of a sharded model; plain tensors (and other placements) read the whole one.

    Every parameter must be in the checkpoint and every checkpoint tensor must have a place
    (bar `lm_head.weight` of tied models and stray `rotary_emb.inv_freq`), else CheckpointError.
    """
    path = os.fspath(path)
    mapping = weight_map(path) if mapping is None else mapping
    targets = _expected_tensors(model)
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    names = _check_names(targets, mapping, tied, path)
    meta = [n for n in names if targets[n].device.type == "meta"]
    if meta:
        raise CheckpointError(f"{path}: parameters still on the meta device ({_list(meta, 3)}); "
                              "call model.to_empty(device=...) before loading")
    by_file: dict[str, list[str]] = {}
    for name in sorted(names):
        by_file.setdefault(mapping[name], []).append(name)
    for file, file_names in by_file.items():
        with open_safetensors(file) as f:
            for name in file_names:
                stored = f.get_slice(name)   # header only: nothing read yet
                shape = tuple(stored.get_shape())
                target = targets[name]
                if shape != tuple(target.shape):
                    raise CheckpointError(f"{file}: tensor {name} has shape "
                                          f"{shape}, the model expects "
                                          f"{tuple(target.shape)}; config.json does not match "
                                          "the weights")
                region = local_region(target)
                if region is None:
                    _copy_into(target, f.get_tensor(name))
                else:
                    _copy_local(target, stored[region])
    return sorted(names)


def _resolve_dtype(dtype, args: ModelArgs, path: str) -> torch.dtype:
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        name = args.hf_config.get("dtype") or args.hf_config.get("torch_dtype") or "float32"
        resolved = getattr(torch, str(name).replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise CheckpointError(f"{path}/{CONFIG_NAME}: dtype {name!r} is not a torch dtype")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, 'auto' or None, got {dtype!r}")
    return dtype


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None) -> CausalLM:
    """Loads a Hugging Face checkpoint directory (config.json + safetensors).

    dtype: the parameters' dtype; None = torch's default (float32), "auto" = config.json's dtype.
    device: where the parameters live (default CPU). With device="meta" the config is read and
    the tensor names are checked against the files, but no data is read: materialise and fill
    later with `to_empty()` + `load_state_dict_into()`.
    """
    path = os.fspath(path)
    args = ModelArgs.from_hf_config(path)
    mapping = weight_map(path)
    dtype = _resolve_dtype(dtype, args, path)
    model = CausalLM(args, device="meta", dtype=dtype)
    _check_names(_expected_tensors(model), mapping, args.tie_word_embeddings, path)
    generation_file = os.path.join(path, GENERATION_CONFIG_NAME)
    if os.path.isfile(generation_file):
        model.generation_config = read_json_object(generation_file, error=CheckpointError)
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    load_state_dict_into(model, path, mapping=mapping)
    return model


# --------------------------------------------------------------------------------------------
# Writing


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: use bytes (int) or e.g. '5GB', '500MB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
             "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def _full_cpu_tensors(model: CausalLM, state_dict: dict | None,
                      dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor
    source = model.state_dict() if state_dict is None else state_dict
    tensors = {canonical_name(k): v for k, v in source.items()}
    if model.args.tie_word_embeddings:
        # transformers writes the shared table once, under the embedding's name.
        tensors.pop("lm_head.weight", None)
    expected = set(_expected_tensors(model))
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CheckpointError("save_pretrained: the state dict does not match the model: "
                              f"missing {_list(missing) or 'none'}; unexpected "
                              f"{_list(unexpected) or 'none'}")
    out = {}
    storages = set()
    for name in _expected_tensors(model):   # module order, so shards follow layers
        t = tensors[name]
        if isinstance(t, DTensor):
            raise CheckpointError(
                f"save_pretrained: {name} is a sharded DTensor; pass a full state dict, e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                "StateDictOptions(full_state_dict=True, cpu_offload=True)), on every rank")
        if t.device.type == "meta":
            raise CheckpointError(f"save_pretrained: {name} is on the meta device (no data)")
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        # safetensors refuses tensors that share memory (views of one flat buffer): copy those.
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _atomic_write_json(obj: dict, file: str) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, file)


def save_pretrained(model: CausalLM, path: str | os.PathLike, state_dict: dict | None = None, *,
                    dtype: torch.dtype | None = None,
                    max_shard_size: int | str | None = None) -> list[str]:
    """Writes config.json, safetensors weights and generation_config.json that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads unchanged.

    state_dict: full (gathered) tensors to write instead of the model's own, e.g. the full state
    dict of an FSDP2 model on rank 0; names may carry torch.compile / checkpoint-wrapper segments.
    dtype: cast floating tensors (e.g. torch.bfloat16 for fp32 master weights); None keeps them.
    max_shard_size: bytes or '5GB'; when the weights exceed it they are split into
    model-0000i-of-0000n.safetensors with an index. Stale weight files of the other layout in
    `path` are removed so that loaders cannot pick up old weights. Returns the files written.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = _full_cpu_tensors(model, state_dict, dtype)

    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if limit is not None and shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += size

    if len(shards) == 1:
        file_names = [WEIGHTS_NAME]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(len(shards))]
    for existing in os.listdir(path):
        stale = existing in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.match(existing)
        if stale and existing not in file_names:
            os.remove(os.path.join(path, existing))
    for file_name, shard in zip(file_names, shards):
        tmp = os.path.join(path, file_name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, file_name))
    written = list(file_names)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file_name for file_name, shard in zip(file_names, shards)
                                for name in shard}}
        _atomic_write_json(index, os.path.join(path, INDEX_NAME))
        written.append(INDEX_NAME)

    config = model.args.to_hf_config()
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1 and next(iter(float_dtypes)) in _DTYPE_NAMES:
        # "dtype" for transformers >= 4.56, "torch_dtype" for older ones; newer ones take both.
        config["dtype"] = config["torch_dtype"] = _DTYPE_NAMES[next(iter(float_dtypes))]
    _atomic_write_json(config, os.path.join(path, CONFIG_NAME))
    written.append(CONFIG_NAME)

    generation = model.generation_config
    if generation is None:
        args = model.args
        generation = {k: v for k, v in (("bos_token_id", args.bos_token_id),
                                        ("eos_token_id", args.eos_token_id),
                                        ("pad_token_id", args.pad_token_id)) if v is not None}
    if generation:
        _atomic_write_json(dict(generation), os.path.join(path, GENERATION_CONFIG_NAME))
        written.append(GENERATION_CONFIG_NAME)
    return written


# --------------------------------------------------------------------------------------------
# Exporting a trained run


def export_pretrained(model: nn.Module, hf_dir: str | os.PathLike, *, dtype: torch.dtype,
                      sharded: bool, tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Writes a trained (possibly FSDP2-sharded) model as a directly loadable and servable
    transformers checkpoint: safetensors in `dtype`, config.json, and the tokenizer files of
    `tokenizer_dir` if it is a directory. A collective when `sharded`: every rank calls it, rank 0
    writes. Returns hf_dir."""
    hf_dir = os.fspath(hf_dir)
    state_dict = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # Gathered shard by shard onto rank 0's CPU; the other ranks get an empty dict.
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
        if getattr(model, "fp8_summary", None) is not None:
            # FP8 all-gather weights stay wrapped in torchao's subclass in a full state dict.
            from rega_engine.train.fp8 import plain_state_dict
            state_dict = plain_state_dict(state_dict)
    if distributed.rank() == 0:
        save_pretrained(model, hf_dir, state_dict=state_dict, dtype=dtype)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            copy_tokenizer_files(tokenizer_dir, hf_dir)
    distributed.barrier()
    return hf_dir


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike, hf_dir: str | os.PathLike) -> None:
    for name in TOKENIZER_FILES:
        source = os.path.join(tokenizer_dir, name)
        if os.path.isfile(source):
            shutil.copy2(source, os.path.join(hf_dir, name))


def load_transformers_model(path: str | os.PathLike, **kwargs):
    """transformers' own `AutoModelForCausalLM` on a local checkpoint, as the checkpoint says and
    nothing else: no remote code, no hub, and no Hugging Face hub kernels. transformers >= 5.25
    kernelizes every loaded model by default (and again at each train()/eval() switch), which
    would swap layers for downloaded kernels: distillation, evaluation and the parity references
    must run the plain implementation, the same on every machine. kwargs go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.fspath(path), trust_remote_code=False,
                                                local_files_only=True, use_kernels=False,
                                                **kwargs)
