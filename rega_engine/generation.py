"""Batched generation with a KV cache, for self-distillation and evaluation.

The checkpoints are Hugging Face safetensors directories, so the model is transformers'
`AutoModelForCausalLM` on the same weights (never with remote code); the decoding loop is ours,
because sampling draws from one random stream *per prompt*: prompt i's stream is seeded from
(seed, key_i), so an answer depends on the seed and the prompt, not on which batch, rank or resumed
run it landed in. (Batch-mates only change the padding, which the attention mask hides; the
logits then agree to rounding, which can flip a sample only where two tokens tie to ~1e-7.)

Prompts are left-padded, positions count real tokens only, and decoding stops for a row at its
first end token (the tokenizer's EOS and the model's generation-config EOS ids) or after
`max_new_tokens`; `ended` tells which, so callers can drop answers that were cut off.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    text: str              # the decoded answer, special tokens and the end token left out
    token_ids: tuple       # the answer's tokens, the end token excluded
    ended: bool            # True: stopped at an end token; False: cut off at max_new_tokens


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device; use cpu")
    return torch.device(device)


def _local_rank_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(path: str | os.PathLike, device: str | torch.device = "auto", dtype: str = "auto"):
    """A checkpoint directory as an eval-mode transformers model on `device`. dtype: auto (bf16 on
    GPU, fp32 on CPU) | bf16 | fp16 | fp32."""
    from rega_engine.model.hf_io import load_transformers_model

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); point at a "
                                "Hugging Face "
                                "checkpoint, e.g. <train.out_dir>/hf written by rega-engine train")
    _check_checkpoint_files(path)
    if isinstance(device, str):
        device = _local_rank_device() if device == "auto" else pick_device(device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise ValueError(f"dtype {dtype!r}: expected auto, bf16, fp16 or fp32")
    with quiet_transformers_load():
        model = load_transformers_model(path, dtype=torch_dtype)
    return model.to(device).eval()


@contextlib.contextmanager
def quiet_transformers_load():
    """transformers' model code imported without torchao's noise (import_transformers_models),
    and no progress bar per load (the demo loads a dozen models) while the block runs."""
    from transformers.utils import logging as hf_logging

    import_transformers_models()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def import_transformers_models() -> None:
    """Imports transformers' model code with torchao's import-time noise held back.

    Where torchao is installed (our fp8 extra), transformers' model code imports it for its
    torchao quantizer, and torchao's import logs a "Failed to load ..._C_*.so" line for every
    prebuilt extension its wheel has no match for here, and torch logs a deprecated-registration
    warning for two of its enums: lines about torchao's own kernels, which distill and eval never
    use, printed before every run's first line. The loggers are raised for this one import only
    (train.precision = "fp8", which does use torchao, still shows them)."""
    import logging
    import sys

    if "transformers.modeling_utils" in sys.modules:
        return
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import transformers.modeling_utils  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_checkpoint_files(path: str) -> None:
    """Reads config.json and every weights file's header (cheap), so that a broken file is an
    error naming it rather than a traceback from inside transformers."""
    from .errors import ConfigError
    from .files import open_safetensors, read_json_object

    read_json_object(os.path.join(path, "config.json"), error=ConfigError)
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors"))):
        with open_safetensors(file):
            pass


def tokenizer_dir_for(model_dir: str | os.PathLike, fallback: str = "") -> str:
    """The model directory when it carries its tokenizer (our HF export copies it there), else
    `fallback` (data.tokenizer)."""
    model_dir = os.fspath(model_dir)
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json",
                                                                "tokenizer.model")):
        return model_dir
    return fallback or model_dir


def end_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        listed = config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
        ids.update(int(i) for i in listed)
    if not ids:
        raise ValueError("neither the tokenizer nor the model names an EOS token, so generation "
                         "could never stop on its own; set eos_token in the tokenizer or "
                         "generation_config.json")
    return ids


def prompt_seed(seed: int, key: str) -> int:
    """The seed of one prompt's sampling stream: stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _top_p_sample(logits: torch.Tensor, temperature: float, top_p: float,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling over the nucleus, with the row's own uniform
    draw."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
    outside = (cumulative - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    cumulative = sorted_probs.cumsum(dim=-1)
    target = uniforms.to(cumulative.device, cumulative.dtype).unsqueeze(1) * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, target).clamp(max=cumulative.shape[-1] - 1)
    return order.gather(1, index).squeeze(1)


def _cache_keyword(model) -> str:
    """The name of the KV-cache argument: transformers 5.24 calls it `cache` (and warns that
    `past_key_values` goes in 5.40); earlier releases take `past_key_values`."""
    accepted = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in accepted else "past_key_values"


@torch.no_grad()
def _generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, greedy: bool,
                    temperature: float, top_p: float, generators: list, end_ids: set[int],
                    pad_id: int) -> list[tuple[list[int], bool]]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ends = torch.tensor(sorted(end_ids), device=device)
    cache = {_cache_keyword(model): DynamicCache()}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache,
                   use_cache=True).logits[:, -1]
    out = torch.empty((len(prompts), 0), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(dim=-1)
        else:
            uniforms = torch.stack([torch.rand((), generator=g) for g in generators])
            token = _top_p_sample(logits, temperature, top_p, uniforms)
        token = token.masked_fill(finished, pad_id)
        out = torch.cat([out, token[:, None]], dim=1)
        finished |= torch.isin(token, ends)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       **cache, use_cache=True).logits[:, -1]
    results = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in end_ids), None)
        results.append((row if end is None else row[:end], end is not None))
    return results


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             greedy: bool = True, temperature: float = 0.7, top_p: float = 0.95, seed: int = 0,
             keys: Sequence[str] | None = None, batch_size: int = 16,
             progress=None) -> list[Generation]:
    """Answers to token-id `prompts` (rendered up to the generation point), in their order.

    Sampling (greedy=False) draws prompt i's tokens from a stream seeded by (seed, keys[i]); keys
    default to the prompt's tokens, so equal prompts get equal answers. Prompts are batched by
    length (less padding); `progress` (a tqdm bar or None) is advanced per answered prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, "
                         f"{top_p}); or use greedy decoding")
    prompts = [list(p) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("an empty prompt: render it with its chat template first")
    if keys is None:
        keys = [",".join(map(str, p)) for p in prompts]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    end_ids = end_token_ids(model, tokenizer)
    pad_id = next((int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if i is not None), 0)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    answers: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        generators = [] if greedy else [torch.Generator().manual_seed(prompt_seed(seed,
            keys[i])) for i in rows]
        results = _generate_batch(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                                  greedy=greedy, temperature=temperature, top_p=top_p,
                                  generators=generators, end_ids=end_ids, pad_id=pad_id)
        for i, (tokens, ended) in zip(rows, results):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[i] = Generation(text=text, token_ids=tuple(tokens), ended=ended)
        if progress is not None:
            progress.update(len(rows))
    return answers
