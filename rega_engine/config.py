"""Run configuration: dataclasses, TOML loading and `--section.key=value` overrides.

One TOML file describes a whole run (prepare, distill, train, eval share it), so that a result can
always be traced back to one file plus the overrides printed at start. Unknown keys are errors that
name the closest valid key: a typo must never silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError


@dataclass
class ModelConfig:
    path: str = ""                      # Hugging Face checkpoint directory (config.json + safetensors)
    init_config: str = ""               # or: a config.json to initialise a model randomly from
    dtype: str = "auto"                 # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    attention_backend: str = "auto"     # auto | triton | torch (see rega_engine.kernels)
    cross_entropy_backend: str = "auto"
    activation_checkpointing: str = "none"  # none | block
    compile: bool = False               # torch.compile per decoder block


@dataclass
class RolesConfig:
    # The general domain's prompt, used for distilled and integration samples, and when serving.
    central_prompt: str = "You are a helpful assistant."
    # One role prompt per specific domain; the keys are the domain names of the data.
    prompts: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    tokenizer: str = ""                 # tokenizer directory; default: model.path
    general: str = ""                   # distilled general exemplars (JSONL, output of distill)
    domains: dict = field(default_factory=dict)   # domain name -> JSONL path
    sizes: dict = field(default_factory=dict)     # source ("general" or a domain) -> sample count
    integration_fraction: float = 0.1   # share of each domain's samples reused under the central prompt
    kind_weights: dict = field(default_factory=lambda: {"distilled": 1.0, "role": 1.0, "integration": 1.0})
    # Ablations of REGA's three parts, by configuration alone.
    self_distillation: bool = True      # false: no distilled general samples
    role_prompts: bool = True           # false: every sample under the central prompt
    role_integration: bool = True       # false: no integration samples
    chat_template: str = "auto"         # auto (the tokenizer's if it has one) | plain
    seq_len: int = 2048
    too_long: str = "truncate"          # truncate | drop | error
    bad_rows: str = "skip"              # skip (reported with file:line and counted) | error
    workers: int = 0                    # tokenizing processes; 0 = one per CPU core
    prepared: str = "runs/prepared"     # directory written by prepare, read by train
    seed: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 100
    micro_batch_size: int = 1           # rows of seq_len tokens per micro-batch and rank
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 disables clipping
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = False
    plot: bool = True                   # PNG of loss curves per kind at the end


@dataclass
class CheckpointConfig:
    every: int = 0                      # steps between checkpoints; 0 = only on SIGTERM
    keep: int = 2                       # complete checkpoints kept
    resume: bool = False                # start from the newest complete checkpoint in out_dir
    export: bool = True                 # write the final model as Hugging Face safetensors


@dataclass
class DistillConfig:
    instructions: str = ""              # general instructions (JSONL without the final assistant turn)
    output: str = ""                    # default: data.general
    model: str = ""                     # default: model.path (the base model)
    temperature: float = 0.7
    top_p: float = 0.95
    greedy: bool = False
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    max_repeat_fraction: float = 0.5    # drop answers whose repeated n-grams exceed this share
    repeat_ngram: int = 4               # n of the token n-grams max_repeat_fraction counts


@dataclass
class EvalConfig:
    checkpoint: str = ""                # default: <train.out_dir>/hf
    general: str = ""                   # general evaluation set (JSONL)
    domains: dict = field(default_factory=dict)   # domain -> evaluation JSONL
    role_prompts: bool = False          # also evaluate under the role prompts, for comparison
    max_new_tokens: int = 64
    batch_size: int = 16
    output: str = ""                    # JSON of the results; default: <train.out_dir>/eval.json


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _closest(name: str, options, prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid: {', '.join(prefix + o for o in sorted(options))}"


def _coerce(value, annotation, where: str):
    """Check a TOML value against the dataclass field's type; ints are accepted where floats are."""
    kind = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {annotation}, got {type(value).__name__} {value!r}")
    return value


def _apply(config: RunConfig, values: dict, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(config)}
    for section, entries in values.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]{_closest(section, sections)}")
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        target = getattr(config, section)
        keys = {f.name: f for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(type(target))
        for key, value in entries.items():
            if key not in keys:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'"
                                  f"{_closest(key, keys, section + '.')}")
            annotation = getattr(hints[key], "__name__", str(hints[key]))
            setattr(target, key, _coerce(value, annotation, f"{source}: '{section}.{key}'"))


def parse_override(text: str) -> dict:
    """`--train.lr=1e-4` or `train.lr=1e-4` -> {"train": {"lr": 1e-4}}; the value is read as a
    TOML value (numbers, booleans, quoted strings, inline tables) and as a bare string otherwise."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': expected --section.key=value")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section: {key: value}}


def validate_config(config: RunConfig) -> RunConfig:
    """Every value's allowed range, checked once, here, before any stage runs; returns config."""
    t, c = config.train, config.checkpoint
    positive = {"train.steps": t.steps, "train.micro_batch_size": t.micro_batch_size,
                "train.grad_accum": t.grad_accum, "train.log_every": t.log_every}
    non_negative = {"train.warmup_steps": t.warmup_steps, "train.grad_clip": t.grad_clip,
                    "train.weight_decay": t.weight_decay, "checkpoint.every": c.every,
                    "checkpoint.keep": c.keep, "train.seed": t.seed}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} = {value}: must be >= 0")
    if not t.lr > 0:
        raise ConfigError(f"train.lr = {t.lr}: must be > 0")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio = {t.min_lr_ratio}: must be in [0, 1]")
    return config


def load_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then the overrides in order."""
    config = RunConfig()
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: invalid TOML: {e}") from None
        _apply(config, values, path)
    for text in overrides:
        _apply(config, parse_override(text), f"override '{text}'")
    return validate_config(config)
