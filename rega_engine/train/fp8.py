"""FP8 training of the decoder blocks' linear layers (`train.precision = "fp8"`).

Decision: torchao's float8 training (`torchao.float8.convert_to_float8_training`, the path
torchtitan takes), as the optional extra `fp8 = ["torchao>=0.18"]`, not an implementation of our
own on `torch._scaled_mm`. What was checked (torchao 0.18.0, torch 2.13 CPU build, gloo):
- Every recipe (tensorwise, rowwise, rowwise_with_gw_hp) runs forward and backward on CPU tensors
  through `torch._scaled_mm` (three FP8 matmuls per linear, two for rowwise_with_gw_hp, whose
  weight gradient stays in high precision), in fp32 and bf16 models; the errors are those of
  e4m3/e5m2 rounding (tests/test_fp8.py states and checks the bound).
- It composes with our activation checkpointing and per-block `torch.compile` (the only graph
  break is the one our CPU attention reference already has), and with FSDP2 `fully_shard` on 2
  gloo processes including the FP8 all-gather of the sharded weights
  (`enable_fsdp_float8_all_gather`, tensorwise only) plus
  `precompute_float8_dynamic_scale_for_fsdp`: the 2-process losses equal a single plain
  process's to the printed digit over 5 AdamW steps, with AC and compile on too; DCP save and
  load of the sharded state work (full state dicts need one unwrapping step: see Checkpoints).
- Torch versions: 0.18's metadata declares no torch requirement; its float8 training is Python
  over `torch._scaled_mm` (its C++ extensions, which float8 training does not use, load only on
  torch >= 2.11 and fail harmlessly on a CPU build). Its source is gated for torch 2.11 (an
  FSDP2 op registered only from 2.11, and a saturating cast kept "until torchao stops supporting
  PyTorch 2.11"); torchao's compatibility table (pytorch/ao#2919) gives 0.18 Python API support
  for torch 2.9-2.11 and 0.17 as built for 2.11. So the measurement machine (torch 2.11, no
  network) can use it from a carried wheel: the 0.18.0 wheel is 3.4 MB, cp310-abi3 (fits Python
  3.12), `pip install --no-deps`. We refuse FP8 below torch 2.9.
- The alternative would redo by hand what torchao maintains and tests on H100s: amax scaling in
  three granularities, the autograd of three scaled matmuls, a weight tensor subclass with
  FSDP2's pre/post all-gather hooks and a batched scale precompute, compile-friendliness, and
  workarounds such as the inductor patch below. The price of the library is one optional
  dependency and two side effects we accept knowingly: importing it logs warnings about its CUDA
  extensions on CPU builds (silenced here, they concern kernels we do not use), and
  `convert_to_float8_training` patches inductor's Triton min/max codegen process-wide to an
  equivalent form (a workaround for a Triton FP8-store miscompile, triton-lang/triton#11111).

What is converted: the `nn.Linear` layers inside the decoder blocks (`...layers.<i>....`:
attention q/k/v/o, MLP gate/up/down), in our CausalLM and in transformers' Llama-family models,
which share the names. The embedding, the norms and the LM head (consumed as a weight by the fused
cross-entropy, never called as a module) stay in the model's dtype. FP8 GEMMs on GPUs need the
inner and outer dimensions divisible by 16 (cuBLAS; the CPU path does not check, so we do):
layers that fail are left in high precision and reported. The weight gradient's inner dimension is
the token count, so a micro-batch's tokens must be a multiple of 16 too (check_fp8_token_count).

Checkpoints: Float8Linear subclasses nn.Linear and keeps the same weight and bias parameters, so
names and dtypes (the master weights' own) are unchanged: state dicts, DCP checkpoints and the
safetensors export of an FP8 run are those of a bf16 run. FP8 exists only inside the matmuls.
With the FSDP FP8 all-gather (apply_fp8(..., fsdp=True)) each converted weight is wrapped in
torchao's WeightWithDynamicFloat8CastTensor, of the same shape and dtype: DCP saves and loads it
as it is, but a full state dict keeps the wrapper (also with cpu_offload, in a process group of
one), which safetensors cannot write: exports go through plain_state_dict first (hf_io's
export_pretrained does it). tests/test_fp8_training.py checks the switch end to end: the loop,
FSDP2 on 2 gloo processes, checkpoints and resume across precisions, the export, the HF patch.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from rega_engine.config import FP8_DIM_MULTIPLE, FP8_RECIPES
from rega_engine.errors import ConfigError
from rega_engine.log import get_logger

log = get_logger(__name__)

# tensorwise: one scale per tensor, e4m3 forward, e5m2 gradients; fastest, and the only recipe
# whose weights FSDP can all-gather in FP8. rowwise: a scale per row, e4m3 throughout, scales
# rounded down to powers of two. rowwise_with_gw_hp: rowwise, with the weight gradient in high
# precision (the most accurate of the three).
# (FP8_RECIPES, and FP8_DIM_MULTIPLE for cuBLAS FP8 GEMMs' K and N, so M of the weight gradient
# too, live in config.py, where validate_config checks train.fp8_recipe and the token count.)
FP8_MIN_CAPABILITY = (8, 9)     # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
FP8_MIN_TORCH = (2, 9)          # the oldest torch in torchao's table for its Python API
TORCHAO_REQUIREMENT = "torchao>=0.18"

ModuleFilter = Callable[[nn.Module, str], bool]

_DECODER_BLOCK = re.compile(r"(?:^|\.)layers\.\d+\.")
_cpu_notice_given = False


# --------------------------------------------------------------------------------------------
# Checks


def check_fp8_recipe(recipe: str, key: str = "train.fp8_recipe") -> str:
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"{key} = {recipe!r}: expected one of {', '.join(FP8_RECIPES)}")
    return recipe


def check_fp8_supported(device: torch.device | str, *, capability: tuple[int, int] | None = None,
                        device_name: str | None = None) -> None:
    """Refuses FP8 where it cannot run: no torchao, torch older than FP8_MIN_TORCH, a CUDA device
    below compute capability 8.9 (A100 and older), or a device that is neither CUDA nor CPU.
    On CPU it says once that FP8 runs there for the numerics only. `capability` and
    `device_name` default to what torch.cuda reports for the device."""
    device = torch.device(device)
    if device.type == "cuda":
        if capability is None:
            capability = tuple(torch.cuda.get_device_capability(device))
        if tuple(capability) < FP8_MIN_CAPABILITY:
            name = device_name or torch.cuda.get_device_name(device)
            major, minor = capability
            raise ConfigError(
                f"train.precision = 'fp8' needs FP8 tensor cores (compute capability >= 8.9: "
                f"Ada, Hopper or newer); {device} is a {name} of compute capability "
                f"{major}.{minor}. Use train.precision = \"bf16\" on this GPU")
    elif device.type != "cpu":
        raise ConfigError(f"train.precision = 'fp8' runs on CUDA (compute capability >= 8.9) or, "
                          f"for checking numerics, on CPU; not on {device.type}. Use "
                          "train.precision = \"bf16\"")
    _check_torch_version()
    _torchao_float8()
    if device.type == "cpu":
        _notice_cpu_once()


def check_fp8_token_count(num_tokens: int, where: str = "data.seq_len x train.batch_size") -> None:
    """FP8's weight-gradient GEMM contracts over the tokens of a micro-batch, so their number
    must be a multiple of 16 on GPUs; `where` names the setting that decides it."""
    if num_tokens % FP8_DIM_MULTIPLE:
        raise ConfigError(
            f"train.precision = 'fp8': a micro-batch holds {num_tokens} tokens ({where}), which "
            f"is not a multiple of {FP8_DIM_MULTIPLE} as FP8 matmuls need; round it to "
            f"{-(-num_tokens // FP8_DIM_MULTIPLE) * FP8_DIM_MULTIPLE}")


def _check_torch_version() -> None:
    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if version < FP8_MIN_TORCH:
        raise ConfigError(
            f"train.precision = 'fp8' needs torch >= {'.'.join(map(str, FP8_MIN_TORCH))} "
            f"(torchao's float8 training); this is torch {torch.__version__}. Upgrade torch or "
            "use train.precision = \"bf16\"")


def _notice_cpu_once() -> None:
    global _cpu_notice_given
    if not _cpu_notice_given:
        _cpu_notice_given = True
        log.info("fp8 on CPU: the FP8 matmuls run through torch._scaled_mm to check the numerics "
                 "only; this is slow, slower than fp32. The speed-up needs an sm_89+ GPU")


@contextmanager
def _quiet(*logger_names: str):
    """Raises the named loggers to ERROR for the block: torchao's import warns about CUDA
    extensions a CPU build cannot load and about a deprecated pytree registration, neither of
    which concerns float8 training."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao_float8():
    """torchao.float8, or a ConfigError saying how to install it."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            import torchao.float8 as float8
    except ImportError as error:
        raise ConfigError(
            f"train.precision = 'fp8' needs torchao's float8 training ({error}); install it with "
            f"pip install 'rega-engine[fp8]' (or '{TORCHAO_REQUIREMENT}'), or use "
            "train.precision = \"bf16\"") from error
    return float8


# --------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass
class FP8Summary:
    """What apply_fp8 did, layer by layer (module names as in named_modules)."""

    recipe: str
    converted: list[str] = dataclasses.field(default_factory=list)
    # name -> why it stays in high precision
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    already_fp8: list[str] = dataclasses.field(default_factory=list)   # by an earlier call
    fp8_all_gather: bool = False

    def describe(self) -> str:
        gather = "; FSDP all-gathers their weights in FP8" if self.fp8_all_gather else ""
        text = (f"fp8 ({self.recipe}): {len(self.converted)} linear layers converted, "
                f"{len(self.skipped)} kept in high precision{gather}")
        if self.already_fp8:
            text += f", {len(self.already_fp8)} already FP8"
        for name, reason in self.skipped.items():
            text += f"\n  kept {name}: {reason}"
        return text


def is_decoder_block_linear(module: nn.Module, name: str) -> bool:
    """The default filter: an nn.Linear inside a decoder block (`...layers.<i>....`), which leaves
    out the embedding, the final norm and the LM head of our models and transformers'."""
    return isinstance(module, nn.Linear) and _DECODER_BLOCK.search(name) is not None


def is_fp8_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear" and type(module).__module__.startswith(
        "torchao.")


def fp8_dimension_problem(linear: nn.Linear) -> str | None:
    """Why this layer cannot run FP8 GEMMs, or None."""
    bad = [f"{what} {size}" for what, size in (("in_features", linear.in_features),
                                               ("out_features", linear.out_features))
           if size % FP8_DIM_MULTIPLE]
    if not bad:
        return None
    return f"{' and '.join(bad)} not divisible by {FP8_DIM_MULTIPLE}"


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", *,
              module_filter: ModuleFilter | None = None, fsdp: bool = False,
              pad_inner_dim: bool = False) -> FP8Summary:
    """Converts the decoder blocks' linear layers of `model` in place to torchao's FP8 training
    and returns what was converted and what was kept in high precision, and why.

    Call it on the single-device model before activation checkpointing, torch.compile and
    fully_shard (the meta device is fine). `module_filter(module, name)` narrows the default
    choice (is_decoder_block_linear) further. `fsdp=True` says the model will be sharded with
    FSDP2: with the tensorwise recipe the sharded weights are then all-gathered in FP8, which
    needs precompute_fp8_weight_scales(model) after every optimizer step; the rowwise recipes
    all-gather in the model's dtype, and a full state dict must pass through plain_state_dict
    before safetensors writes it. `pad_inner_dim=True` pads the inner dimension of every FP8
    matmul to a multiple of 16 (a copy per matmul), for callers whose token counts vary (the HF
    integration's batches); the training loop's micro-batches have a fixed count, which
    validate_config checks instead. Parameter names and dtypes do not change. Calling it again
    converts nothing twice.
    """
    check_fp8_recipe(recipe)
    float8 = _torchao_float8()
    summary = FP8Summary(recipe=recipe, fp8_all_gather=fsdp and recipe == "tensorwise")
    chosen = set()
    for name, module in model.named_modules():
        if not is_decoder_block_linear(module, name):
            continue
        if module_filter is not None and not module_filter(module, name):
            continue
        if is_fp8_linear(module):
            summary.already_fp8.append(name)
            continue
        problem = fp8_dimension_problem(module)
        if problem:
            summary.skipped[name] = problem
        else:
            chosen.add(name)
            summary.converted.append(name)
    if chosen:
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
        if summary.fp8_all_gather:
            # The config is a frozen dataclass; these are the switches we set ourselves.
            config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
        if pad_inner_dim:
            config = dataclasses.replace(config, pad_inner_dim=True)
        float8.convert_to_float8_training(model, config=config,
                                          module_filter_fn=lambda _m, name: name in chosen)
    if summary.skipped:
        log.warning(summary.describe())
    return summary


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The high-precision weight inside torchao's FP8 all-gather wrapper; any other tensor as it
    is. Unwrapped through the tensor-subclass protocol (__tensor_flatten__, whose first inner
    tensor is the weight), so that no private attribute is read."""
    if type(tensor).__name__ == "WeightWithDynamicFloat8CastTensor":
        inner_names, _context = tensor.__tensor_flatten__()
        return getattr(tensor, inner_names[0])
    return tensor


def plain_state_dict(state_dict: dict) -> dict:
    """A (full) state dict with FP8 all-gather wrappers replaced by the weights they hold, for
    safetensors: same names, shapes, dtypes and values."""
    return {name: plain_tensor(value) if isinstance(value, torch.Tensor) else value
            for name, value in state_dict.items()}


def precompute_fp8_weight_scales(model: nn.Module) -> None:
    """After each optimizer step, when FSDP all-gathers FP8 weights (FP8Summary.fp8_all_gather):
    computes every sharded weight's tensorwise scale with one all-reduce, instead of one per
    layer inside the next forward. A no-op for models without such weights."""
    _torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)


def after_optimizer_step(model: nn.Module) -> None:
    """The training loop's hook after each optimizer step (and once before the first):
    precompute_fp8_weight_scales when build_model converted the model with the FSDP FP8
    all-gather (model.fp8_summary); else nothing."""
    summary = getattr(model, "fp8_summary", None)
    if summary is not None and summary.fp8_all_gather:
        precompute_fp8_weight_scales(model)


def apply_fp8_to_hf_model(model: nn.Module, recipe: str = "tensorwise") -> FP8Summary:
    """FP8 for a transformers causal LM (apply_rega_kernels(model, fp8=True)): checks that the
    model's device can run FP8 (an sm_89+ GPU, or slowly the CPU; a model still on the meta
    device is checked by nothing here), then converts the decoder blocks' linear layers with the
    inner dimension padded to multiples of 16, since Trainer batches vary in length. lm_head,
    which our fused loss reads as a weight, stays as it is, and so do PEFT's LoRA adapters
    (`lora_A`, `lora_B`: small, trained, and of a rank FP8 GEMMs rarely take); a LoRA layer's
    frozen base_layer is converted. No FSDP FP8 all-gather: under accelerate's FSDP the weights
    are gathered in the model's dtype and cast to FP8 per layer. The summary is kept as
    model.fp8_summary."""
    check_fp8_recipe(recipe, key="fp8_recipe")
    devices = {p.device for p in model.parameters()} - {torch.device("meta")}
    for device in devices:
        check_fp8_supported(device)
    summary = apply_fp8(model, recipe, pad_inner_dim=True,
                        module_filter=lambda _module, name: ".lora_" not in name)
    model.fp8_summary = summary
    return summary
