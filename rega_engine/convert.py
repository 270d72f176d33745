"""`rega-engine convert --gguf FILE --out DIR`: a GGUF file (llama.cpp's format, in which small
instruct models are often the only weights at hand) as a Hugging Face folder that rega-engine
(model.path) and transformers both load: config.json, safetensors, generation_config.json, and
the tokenizer with its chat template.

transformers reads the GGUF (its `gguf_file` loader, which needs the optional `gguf` package:
`pip install 'rega-engine[gguf]'`), dequantizing every tensor and undoing llama.cpp's reordering
of the query and key rows; its own save_pretrained refuses a model loaded that way, so the
weights go through rega-engine's model instead, which also proves they fit it: the converted
folder's logits are compared with the GGUF model's on a probe before the command returns, and a
difference is an error. Weights are written in fp32 by default: a dequantized value (scale x
integer + offset, in fp32) is not always a bf16 number, so fp32 loses nothing (--dtype bf16 halves
the folder).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
from pathlib import Path

from rega_engine.errors import CheckpointError, ConfigError
from rega_engine.files import refuse_filled_output

_DTYPES = ("bf16", "fp16", "fp32")
# Largest |logit| difference accepted between the converted folder and the GGUF model, both in
# fp32 on the CPU: the same weights through two implementations (summation order only).
LOGITS_ATOL = 1e-3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rega-engine convert", allow_abbrev=False,
        description="write a GGUF model as a Hugging Face folder rega-engine and transformers load")
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=_DTYPES, default="fp32",
                        help="the weights' dtype (fp32: exactly the dequantized values)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it already holds files")
    args = parser.parse_args(argv)
    out, diff = convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"rega-engine convert: wrote {out} (logits equal the GGUF model's: max |difference| "
          f"{diff:.2e})", file=sys.stderr)
    return 0


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "fp32",
                 overwrite: bool = False) -> tuple[Path, float]:
    """Writes `gguf_file` as a Hugging Face folder `out`; returns (out, the largest |logit|
    difference between the two on a probe)."""
    import torch

    from rega_engine.generation import quiet_transformers_load
    from rega_engine.model import from_config, from_pretrained
    from rega_engine.model.hf_io import load_transformers_model, save_pretrained
    from rega_engine.train.parallel import DTYPES

    gguf_file = Path(gguf_file).resolve()
    out = Path(out)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"--gguf {gguf_file}: no such file")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ConfigError("rega-engine convert --gguf needs the gguf package: "
                          "pip install 'rega-engine[gguf]' (or pip install gguf)") from None
    refuse_filled_output(out, overwrite)
    try:
        with quiet_transformers_load(), _no_gguf_progress_bar():
            reference = load_transformers_model(gguf_file.parent, gguf_file=gguf_file.name,
                                                dtype=torch.float32).eval()
    except (ValueError, KeyError, OSError, RuntimeError) as e:   # transformers' refusals
        raise CheckpointError(f"--gguf {gguf_file}: transformers cannot read it ("
                              f"{str(e).strip().splitlines()[0][:300]})") from e
    config = reference.config.to_dict()
    config.pop("quantization_config", None)   # dequantized: nothing of the GGUF format is left
    model = from_config(config, dtype=torch.float32, device="cpu")
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if config.get("tie_word_embeddings"):
        unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"--gguf {gguf_file}: its {config.get('model_type')} model does not "
                              f"fit rega-engine's (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    if overwrite and out.exists():
        shutil.rmtree(out)
    save_pretrained(model, out, dtype=DTYPES[dtype])
    _save_tokenizer(gguf_file, out)

    probe = torch.arange(3, 3 + min(24, config["vocab_size"] - 3)).unsqueeze(0)
    converted = from_pretrained(out, dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        diff = (converted(probe).logits - reference(probe).logits).abs().max().item()
    tolerance = LOGITS_ATOL if dtype == "fp32" else float("inf")   # a cast is a choice, not a bug
    if not diff <= tolerance:
        raise CheckpointError(f"--gguf {gguf_file}: the converted folder {out} gives other logits "
                              f"than the GGUF model (max |difference| {diff:.3g} > {tolerance}); "
                              "this model is not converted faithfully, please report it")
    return out, diff


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF reader draws a bar of its own with plain tqdm, which its
    disable_progress_bar() does not reach; convert prints one line of its own instead."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:   # another layout: its bar stays, nothing else changes
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


# The special tokens a GGUF names by id (llama.cpp's metadata keys), as a tokenizer calls them.
_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id",
                "eos_token": "tokenizer.ggml.eos_token_id",
                "unk_token": "tokenizer.ggml.unknown_token_id",
                "pad_token": "tokenizer.ggml.padding_token_id"}


def _save_tokenizer(gguf_file: Path, out: Path) -> None:
    """The tokenizer the GGUF's metadata describes (vocabulary, merges, special tokens, chat
    template), saved in `out` as transformers saves any tokenizer. Its special tokens are the ids
    the file names: transformers 5.17 reads them one id off for some files (eos <|im_start|> for
    <|im_end|>), which would make generation stop at the wrong token."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                              local_files_only=True)
    fields = gguf.GGUFReader(str(gguf_file)).fields
    for name, key in _SPECIAL_IDS.items():
        if key in fields:
            token = tokenizer.convert_ids_to_tokens(int(fields[key].contents()))
            if getattr(tokenizer, name) != token:
                setattr(tokenizer, name, token)
    tokenizer.save_pretrained(out)
