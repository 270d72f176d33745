"""`rega-engine export --checkpoint runs/x/checkpoints/step_N --out DIR`: a training checkpoint,
saved from any mesh, as a Hugging Face folder, without starting a training run.

DIR receives what the end of the run writes to <out_dir>/hf: safetensors in the run's compute
dtype (or --dtype), config.json, generation_config.json and the tokenizer files; a [lora] run's
checkpoint also gives the PEFT adapter in DIR_adapter (and the base weights in DIR_base when the
run started from a random init), as lora.export_lora lays them out.

The model is rebuilt from the checkpoint alone: its meta.json names the model (config.json,
dtype, LoRA settings, tokenizer; train/loop.py `_model_meta`). A checkpoint written before it did
takes the run's --config instead. The checkpoint's files are verified against their sha256 sums
first, then DCP reads the model's tensors (not the optimizer's) whatever mesh wrote them, into one
process: the export holds the whole model in host memory in fp32 (4 bytes a parameter), plus one
copy in the output dtype as it writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from rega_engine.errors import CheckpointError, ConfigError
from rega_engine.files import refuse_filled_output

_DTYPES = ("bf16", "fp16", "fp32")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rega-engine export", allow_abbrev=False,
        description="write a training checkpoint as a Hugging Face folder (and a PEFT adapter "
                    "for [lora] runs)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (<out_dir>/checkpoints/step_<N>), or a run's "
                        "train.out_dir for its newest complete checkpoint")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=_DTYPES,
                        help="the weights' dtype (default: the run's compute dtype)")
    parser.add_argument("--config", help="the run's TOML, for a checkpoint whose meta.json does "
                        "not name its model (one written before checkpoints did)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it already holds files")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("rega-engine export runs in one process (it reads every rank's shards "
                          "itself): run it without torchrun")
    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, config=args.config,
                            overwrite=args.overwrite)
    print(f"rega-engine export: wrote {', '.join(map(str, out))}", file=sys.stderr)
    return 0


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                      dtype: str | None = None, config: str | os.PathLike | None = None,
                      overwrite: bool = False) -> list[Path]:
    """Writes checkpoint `checkpoint` (a step_<N> folder or a run's out_dir) as a Hugging Face
    folder `out`; returns the folders written (`out`, then a [lora] run's adapter and base).
    dtype: "bf16" | "fp16" | "fp32", default the run's compute dtype."""
    import torch
    import torch.distributed.checkpoint as dcp

    from rega_engine.model import from_config
    from rega_engine.model.hf_io import export_pretrained
    from rega_engine.train.checkpoint import (
        checkpoint_problems,
        model_shape_mismatch,
        read_checkpoint_meta,
    )
    from rega_engine.train.parallel import DTYPES

    path = _checkpoint_folder(Path(checkpoint))
    out = Path(out)
    refuse_filled_output(out, overwrite)
    problems = checkpoint_problems(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path} is damaged: {problems[0]}{more}; export an older "
                              "checkpoint")
    model_meta = read_checkpoint_meta(path).get("model") or _model_meta_from_config(path, config)
    lora = model_meta.get("lora")
    model = from_config(model_meta["config"], dtype=torch.float32, device="meta")
    if lora:
        from rega_engine.config import LoRAConfig
        from rega_engine.model.lora import LoRASettings, apply_lora
        apply_lora(model, LoRASettings.from_config(LoRAConfig(**lora)))
    model.to_empty(device="cpu")
    mismatch = model_shape_mismatch(path, model)
    if mismatch:
        raise CheckpointError(f"{path}: its model does not match the model it names: {mismatch}")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)   # in place, from any mesh's shards
    out_dtype = DTYPES[dtype] if dtype else getattr(torch, model_meta["dtype"])
    if overwrite and out.exists():
        shutil.rmtree(out)
    tokenizer = model_meta.get("tokenizer")
    if lora:
        from rega_engine.model.lora import export_lora
        export_lora(model, out, dtype=out_dtype, sharded=False, tokenizer_dir=tokenizer,
                    base_path=model_meta.get("base_path"))
        base = [] if model_meta.get("base_path") else [Path(f"{out}_base")]
        return [out, Path(f"{out}_adapter"), *base]
    export_pretrained(model, out, dtype=out_dtype, sharded=False, tokenizer_dir=tokenizer)
    return [out]


def _checkpoint_folder(path: Path) -> Path:
    """`path` itself when it is a checkpoint, else the newest complete one of the run `path`."""
    from rega_engine.train.checkpoint import META_FILE, checkpoint_root, latest_checkpoint

    if (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"--checkpoint {path}: neither a checkpoint ({path / META_FILE} not "
                              f"found) nor a run with one ({checkpoint_root(path)} holds no "
                              "complete step_<N> folder)")
    return latest


def model_meta(run, hf_config: dict, dtype: str) -> dict:
    """meta.json's "model" for a run (RunConfig) of the model `hf_config` (its config.json)
    computing in `dtype` (a torch dtype's name: "bfloat16")."""
    return {"config": hf_config, "dtype": dtype,
            "lora": dataclasses.asdict(run.lora) if run.lora.rank else None,
            "base_path": run.model.path or None,
            "tokenizer": run.data.tokenizer or run.model.path or None}


def _model_meta_from_config(path: Path, config: str | os.PathLike | None) -> dict:
    """What meta.json's "model" would say, from the run's TOML, for older checkpoints."""
    if config is None:
        raise CheckpointError(f"{path}/meta.json does not name the model (a checkpoint written "
                              "before checkpoints did): pass the run's --config run.toml")
    from rega_engine.config import load_config
    from rega_engine.files import read_json_object
    from rega_engine.train.parallel import model_source

    run = load_config(config)
    _, source = model_source(run.model)
    hf_config = read_json_object(source / "config.json" if source.is_dir() else source)
    # A run's compute dtype depends on the device it ran on: "auto" exports the fp32 master
    # weights, which lose nothing (pass --dtype bf16 for what a GPU run exports).
    return model_meta(run, hf_config, "bfloat16" if run.model.dtype == "bf16" else "float32")
