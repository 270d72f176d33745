"""Run configuration: dataclasses, TOML loading and `--section.key=value` overrides.

One TOML file describes a whole run (prepare, distill, train, eval share it), so that a result can
always be traced back to one file plus the overrides printed at start. Unknown keys are errors that
name the closest valid key: a typo must never silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import typing
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError
from .kinds import GENERAL_DOMAIN, check_kind_weights
from .log import get_logger

log = get_logger(__name__)

# The allowed values of the enumerated settings, here so that they are checked once, before any
# stage runs (the stages import them from here).
MODEL_DTYPES = ("auto", "bf16", "fp16", "fp32")
KERNEL_BACKENDS = ("auto", "triton", "torch")   # the kernels' BACKENDS; a test keeps them equal
ACTIVATION_CHECKPOINTING = ("none", "block")
DEVICES = ("auto", "cpu", "cuda")
CHAT_TEMPLATES = ("auto", "plain")
TOO_LONG_POLICIES = ("truncate", "drop", "error")
BAD_ROW_POLICIES = ("skip", "error")
TXT_DOCUMENTS = ("file", "blank_line")
PRECISIONS = ("bf16", "fp8")
# torchao's float8 recipes (train/fp8.py)
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# parallel.accumulate: what the micro-batches before a step's last one communicate (train/loop.py)
ACCUMULATE_MODES = ("unsharded", "sharded")
# FP8 GEMMs (cuBLAS) need their dimensions, the tokens of a micro-batch too, in multiples of 16
FP8_DIM_MULTIPLE = 16


@dataclass
class ModelConfig:
    # Hugging Face checkpoint directory (config.json + safetensors)
    path: str = ""
    # or: a config.json to initialise a model randomly from (rega-engine model-config writes one)
    init_config: str = ""
    dtype: str = "auto"                 # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    attention_backend: str = "auto"     # auto | triton | torch (see rega_engine.kernels)
    cross_entropy_backend: str = "auto"  # auto | triton | torch, for the fused linear cross-entropy
    # none | block (recompute each decoder block in backward: less memory)
    activation_checkpointing: str = "none"
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
    # domain name -> JSONL path (trained under its role prompt)
    domains: dict = field(default_factory=dict)
    # JSONL files whose rows name their domain ("domain": "law" or "general")
    files: list = field(default_factory=list)
    # JSONL for training a base model: {"text": ...} rows or chats (kind pretrain); .txt files too
    pretrain: list = field(default_factory=list)
    # domain ("general" or a domain) -> plain-text documents ({"text": ...} JSONL or .txt paths),
    # kind pretrain, loss on every token
    corpora: dict = field(default_factory=dict)
    # source ("general", a domain, "pretrain") -> sample count, or "60%": share of the mixture's
    # tokens
    sizes: dict = field(default_factory=dict)
    # share of each domain's samples reused under the central prompt
    integration_fraction: float = 0.1
    # loss weight per sample kind (pretrain: 1.0 if left out)
    kind_weights: dict = field(default_factory=lambda: {"distilled": 1.0, "role": 1.0,
                                                        "integration": 1.0,
                                                        "pretrain": 1.0})
    # Ablations of REGA's three parts, by configuration alone.
    self_distillation: bool = True      # false: no distilled general samples
    role_prompts: bool = True           # false: every sample under the central prompt
    role_integration: bool = True       # false: no integration samples
    chat_template: str = "auto"         # auto (the tokenizer's if it has one) | plain
    seq_len: int = 2048                 # tokens per packed row; longer samples follow data.too_long
    too_long: str = "truncate"          # truncate | drop | error
    bad_rows: str = "skip"              # skip (reported with file:line and counted) | error
    workers: int = 0                    # tokenizing processes; 0 = one per CPU core
    # documents of a .txt file: file (the whole file) | blank_line (blocks between blank lines)
    txt_documents: str = "file"
    # plain-text documents of data.corpora after their domain's role prompt (no loss on it); false:
    # the text alone
    corpus_prompt: bool = False
    # a plain-text document longer than seq_len becomes pieces of seq_len tokens, each its own row;
    # false: data.too_long applies
    split_documents: bool = True
    # samples of the mixture per shard of the prepared dataset (the unit of multi-process work and
    # of resuming); 0: enough shards for 64 processes to share evenly, 1024 to 16384 samples each
    shard_samples: int = 0
    # memory for planning the mixture (its tables of row references); past it they are memory-
    # mapped files in data.prepared. Does not change the dataset.
    memory_gb: float = 4.0
    prepared: str = "runs/prepared"     # directory written by prepare, read by train
    # prepare: replace a finished prepared dataset of another config in data.prepared
    overwrite: bool = False
    # train: hash every shard against meta.json also when resuming (a fresh run always does; the
    # sizes are checked at every open)
    verify: bool = False
    seed: int = 0                       # seed of the mixture: sampling data.sizes and the order


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"         # log.jsonl, checkpoints/ and the exported model (hf/)
    # optimizer steps (or set train.epochs instead; 0 with train.epochs: derived from it)
    steps: int = 100
    # passes over the prepared data, instead of train.steps; 0 = use train.steps
    epochs: float = 0.0
    micro_batch_size: int = 1           # rows of seq_len tokens per micro-batch and rank
    grad_accum: int = 1                 # micro-batches per optimizer step and rank
    lr: float = 2e-5                    # peak learning rate, after warmup
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10              # linear warmup steps
    weight_decay: float = 0.0           # AdamW weight decay (not on norms and biases)
    beta1: float = 0.9                  # AdamW beta1
    beta2: float = 0.95                 # AdamW beta2
    eps: float = 1e-8                   # AdamW epsilon
    grad_clip: float = 1.0              # 0 disables clipping
    seed: int = 0                       # seed of the initialisation and the loader's order
    device: str = "auto"                # auto | cpu | cuda
    # torch CPU threads of train, distill and eval; 0 = torch's default
    threads: int = 0
    log_every: int = 1                  # steps between log records
    # progress of train, distill and eval: a bar on a terminal, else a plain line every
    # train.progress_every_s; false: none (train still prints its final summary)
    progress: bool = True
    progress_every_s: float = 30.0      # seconds between plain progress lines (not a terminal)
    # start afresh in a train.out_dir that holds a finished run (hf/, eval.json, a completed log),
    # removing its outputs and checkpoints
    overwrite: bool = False
    # seconds a collective may wait for the other ranks before the run stops (a frozen or lost
    # rank); a stalled step names the ranks it waits for after a third of it
    collective_timeout_s: float = 600.0
    tensorboard: bool = False           # also write TensorBoard events to out_dir
    plot: bool = True                   # PNG of loss curves per kind at the end
    # bf16 (every matmul in model.dtype) | fp8 (the decoder blocks' linear layers in FP8, torchao;
    # GPUs of compute capability 8.9+, on CPU slow and for numerics only)
    precision: str = "bf16"
    # with precision fp8: tensorwise (fastest; FSDP all-gathers weights in FP8) | rowwise |
    # rowwise_with_gw_hp (weight gradient in high precision)
    fp8_recipe: str = "tensorwise"
    # [a, b]: a torch profiler trace (Chrome trace JSON, chrome://tracing or Perfetto) of steps a
    # to b, both counted, written to <out_dir>/profile/; [] = none
    profile_steps: list = field(default_factory=list)
    profile_all_ranks: bool = False     # train.profile_steps on every rank, not only rank 0


@dataclass
class LoRAConfig:
    # Parameter-efficient training: the model's weights stay frozen and only low-rank adapters on
    # the target layers train (and are in the optimizer); the run exports the merged model to
    # <out_dir>/hf and the PEFT adapter to <out_dir>/hf_adapter (rega_engine/model/lora.py).
    rank: int = 0                       # adapter rank r; 0 = LoRA off (every weight trains)
    alpha: float = 16.0                 # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0                # dropout on the adapters' input, in [0, 1)
    # linear layers (by last name) that get adapters
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj",
                                                          "up_proj", "down_proj"])


@dataclass
class CheckpointConfig:
    every: int = 0                      # steps between checkpoints; 0 = only on SIGTERM
    keep: int = 2                       # complete checkpoints kept
    resume: bool = False                # start from the newest complete checkpoint in out_dir
    export: bool = True                 # write the final model as Hugging Face safetensors
    # write checkpoints in the background: each rank copies its shards of model and optimizer to
    # host memory (~12 bytes a parameter / processes: the one pause), and training
    # goes on while they are written; one write in flight at most (the next save, a SIGTERM and
    # the end of training wait for it), and a step_<N> folder still appears only when complete
    async_: bool = False


@dataclass
class ParallelConfig:
    """The data-parallel processes form one dp_replicate x dp_shard device mesh (HSDP, FSDP2;
    train/parallel.py): each parameter is sharded over the dp_shard processes of a group and the
    dp_replicate groups hold one copy each, so that only the once-per-step all-reduce of the
    gradient shards crosses groups (nodes). The product must be the number of processes."""

    # groups holding a full copy of the sharded model (typically the number of nodes); -1 = what
    # parallel.dp_shard leaves of the processes
    dp_replicate: int = 1
    # processes one copy of the model is sharded over; -1 = every process dp_replicate leaves (the
    # default 1 x all is plain FSDP); "auto" = the processes of one node (torchrun's
    # LOCAL_WORLD_SIZE)
    dp_shard: int | str = -1
    # gradient accumulation: sharded (reduce-scatter within dp_shard every micro-batch, the
    # all-reduce across dp_replicate, the slow inter-node links, once per step: gradient memory
    # stays sharded, as before HSDP) | unsharded (micro-batches before a step's last communicate
    # nothing; each rank keeps its gradients unsharded meanwhile, in fp32: 4 bytes a parameter,
    # 32 GB for an 8B model, so it is not the default)
    accumulate: str = "sharded"
    # context parallelism: processes one packed row is split over (each keeps 2 of the row's
    # 2 x cp chunks and gathers the keys and values of the rest: train/context_parallel.py); the
    # data-parallel mesh is what is left, dp_replicate x dp_shard x cp = the processes, and
    # data.seq_len must be a multiple of 2 x cp
    cp: int = 1
    # tensor parallelism: processes each decoder block's matmuls are split over (heads and MLP
    # units; train/tensor_parallel.py), typically within a node; dp_replicate x dp_shard x tp =
    # the processes
    tp: int = 1
    # with tp > 1: the tokens split over the tp ranks too between the split matmuls (the norms,
    # the residual stream, the embeddings' output: 1 / tp of their activations per rank), at no
    # extra communication (all-gather + reduce-scatter instead of all-reduce); data.seq_len
    # must be a multiple of parallel.tp x parallel.cp
    sequence_parallel: bool = True


@dataclass
class DistillConfig:
    # general instructions (JSONL without the final assistant turn)
    instructions: str = ""
    output: str = ""                    # JSONL of the answered instructions; default: data.general
    # the model that answers; default: model.path (the base model)
    model: str = ""
    temperature: float = 0.7            # sampling temperature (the paper's 0.7)
    top_p: float = 0.95                 # nucleus sampling (the paper's 0.95)
    greedy: bool = False                # greedy decoding instead of sampling
    # longest answer; a longer one is cut off and filtered (no_eos)
    max_new_tokens: int = 512
    batch_size: int = 16                # instructions answered together
    seed: int = 0                       # seed of the sampling
    max_repeat_fraction: float = 0.5    # drop answers whose repeated n-grams exceed this share
    repeat_ngram: int = 4               # n of the token n-grams max_repeat_fraction counts
    # replace an earlier run's answers: move its files into <output>.stale-<time>/ and answer
    # every instruction again (without it a rerun only answers what has no answer yet)
    overwrite: bool = False
    restart: bool = False               # the former name of distill.overwrite; the same


@dataclass
class EvalConfig:
    checkpoint: str = ""                # model directory to evaluate; default: <train.out_dir>/hf
    general: str = ""                   # general evaluation set (JSONL)
    domains: dict = field(default_factory=dict)   # domain -> evaluation JSONL
    # evaluation JSONL files whose rows name their domain
    files: list = field(default_factory=list)
    role_prompts: bool = False          # also evaluate under the role prompts, for comparison
    max_new_tokens: int = 64            # longest generated answer
    batch_size: int = 16                # samples evaluated together
    output: str = ""                    # JSON of the results; default: <train.out_dir>/eval.json


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # The dotted keys the TOML file and the overrides set (not a field: it is not part of the
        # run's values); validate_config needs it where a default is indistinguishable from a
        # value given on purpose (train.steps next to train.epochs).
        self.given: set[str] = set()
        # The dotted keys the command line's overrides set: they displace a conflicting key that
        # only the file set (load_config, ALTERNATIVES).
        self.command_line: set[str] = set()

    def to_dict(self) -> dict:
        """{section: {key: value}} under the keys of TOML and the command line (toml_key)."""
        return {section: {toml_key(key): value for key, value in values.items()}
                for section, values in dataclasses.asdict(self).items()}


# How alike a misspelt name and a valid one must be (difflib's ratio) to be offered as "did you
# mean": high enough that a key of another meaning is not offered for a mere resemblance
# ('eps', Adam's epsilon, for 'epochs').
SUGGEST_CUTOFF = 0.8


def _closest(name: str, options, prefix: str = "") -> str:
    """"; did you mean 'x'?" for a likely typo of one of `options`, else the list of them all."""
    options = list(options)
    match = difflib.get_close_matches(name, options, n=1, cutoff=SUGGEST_CUTOFF)
    if not match:
        # A shorter name for one key: every word of it in that key alone ('batch_size' ->
        # 'micro_batch_size', 'decay' -> 'weight_decay').
        words = set(name.split("_"))
        match = [o for o in options if words <= set(o.split("_"))]
    if len(match) == 1:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid: {', '.join(prefix + o for o in sorted(options))}"


def _coerce(value, annotation, where: str):
    """Check a TOML value against the dataclass field's type; ints are accepted where floats are,
    and one string where a list (of paths) is."""
    if annotation == "int | str":   # a count or a word (parallel.dp_shard = 8 or "auto")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer or a string, got "
                              f"{type(value).__name__} {value!r}")
        return value
    kind = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict,
            "list": list}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, str):
        return [value]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {annotation}, got {type(value).__name__} {value!r}")
    return value


def toml_key(field_name: str) -> str:
    """A config field's key in TOML and on the command line: a field named after a Python
    keyword carries a trailing underscore (`async_`), its key does not (`checkpoint.async`)."""
    bare = field_name.removesuffix("_")
    return bare if bare != field_name and keyword.iskeyword(bare) else field_name


def _apply(config: RunConfig, values: dict, source: str, base: str | None = None) -> set[str]:
    """Sets `values` ({section: {key: value}}) on config; returns the dotted keys set. The
    relative paths among them (PATH_KEYS) are made absolute against the folder `base`."""
    applied = set()
    sections = {f.name: f for f in dataclasses.fields(config)}
    for section, entries in values.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]{_closest(section, sections)}")
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        target = getattr(config, section)
        keys = {toml_key(f.name): f.name for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(type(target))
        for key, value in entries.items():
            if key not in keys:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'"
                                  f"{_closest(key, keys, section + '.')}")
            name = keys[key]
            annotation = getattr(hints[name], "__name__", str(hints[name]))
            value = _coerce(value, annotation, f"{source}: '{section}.{key}'")
            if base is not None and f"{section}.{key}" in PATH_KEYS:
                _warn_if_moved(f"{section}.{key}", value, base, source)
                value = absolute_paths(value, base)
            setattr(target, name, value)
            applied.add(f"{section}.{key}")
    config.given |= applied
    return applied


def parse_override(text: str) -> dict:
    """`--train.lr=1e-4` or `train.lr=1e-4` -> {"train": {"lr": 1e-4}}; the value is read as a
    TOML value (numbers, booleans, quoted strings, inline tables) and as a bare string otherwise.
    A bare `--train.overwrite` is `--train.overwrite=true` (a boolean key's switch)."""
    body = text[2:] if text.startswith("--") else text
    if "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': expected --section.key=value")
    if "=" not in body:
        body += "=true"
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section: {key: value}}


def _one_of(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(allowed)}")


def _at_least(values: dict, minimum) -> None:
    for key, value in values.items():
        if not value >= minimum:    # also catches NaN
            raise ConfigError(f"{key} = {value}: must be >= {minimum}")


def _within(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} = {value}: must be in [{low}, {high}]")


def _paths_table(key: str, table: dict) -> None:
    """A table of name = "path" (data.domains, eval.domains)."""
    for name, path in table.items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}.{name} = {path!r}: expected the path of a JSONL file")


def _paths_list(key: str, paths: list) -> None:
    """A list of paths (data.files, data.pretrain, eval.files); one string is read as a list."""
    if not isinstance(paths, list):
        raise ConfigError(f"{key} = {paths!r}: expected a list of JSONL paths")
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}[{i}] = {path!r}: expected the path of a JSONL file")


def _check_model(m: ModelConfig) -> None:
    _one_of("model.dtype", m.dtype, MODEL_DTYPES)
    _one_of("model.attention_backend", m.attention_backend, KERNEL_BACKENDS)
    _one_of("model.cross_entropy_backend", m.cross_entropy_backend, KERNEL_BACKENDS)
    _one_of("model.activation_checkpointing", m.activation_checkpointing, ACTIVATION_CHECKPOINTING)


def _check_sizes(sizes: dict, domains) -> None:
    sources = list(dict.fromkeys([GENERAL_DOMAIN, *domains, "pretrain"]))
    for source, n in sizes.items():
        if source not in sources:
            raise ConfigError(f"data.sizes.{source}: no such source; sources are "
                              f"{', '.join(sources)}")
        if isinstance(n, str):
            if size_share(n) is None:
                raise ConfigError(f"data.sizes.{source} = {n!r}: expected a whole number >= 0 or a "
                                  "share of the mixture's tokens like \"60%\"")
        elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"data.sizes.{source} = {n!r}: expected a whole number >= 0 "
                              "(samples) or a share of the mixture's tokens like \"60%\"")
    shares = {s: size_share(n) for s, n in sizes.items() if isinstance(n, str)}
    if shares and len(shares) != len(sizes):
        raise ConfigError(f"data.sizes mixes sample counts and token shares "
                          f"({', '.join(sorted(set(sizes) - set(shares)))} given as counts); give "
                          "all as shares")
    if shares and abs(sum(shares.values()) - 1.0) > 1e-6:
        raise ConfigError(f"data.sizes: the token shares add up to {sum(shares.values()):.2%}, "
                          "expected 100%")


def size_share(value) -> float | None:
    """"60%" -> 0.6; None for anything else."""
    if not isinstance(value, str) or not value.strip().endswith("%"):
        return None
    try:
        share = float(value.strip()[:-1]) / 100
    except ValueError:
        return None
    return share if 0 <= share <= 1 else None


def _check_data(d: DataConfig, roles: RolesConfig) -> None:
    _one_of("data.chat_template", d.chat_template, CHAT_TEMPLATES)
    _one_of("data.too_long", d.too_long, TOO_LONG_POLICIES)
    _one_of("data.bad_rows", d.bad_rows, BAD_ROW_POLICIES)
    _one_of("data.txt_documents", d.txt_documents, TXT_DOCUMENTS)
    _at_least({"data.shard_samples": d.shard_samples}, 0)
    if not d.memory_gb > 0:
        raise ConfigError(f"data.memory_gb = {d.memory_gb}: must be > 0")
    if not isinstance(d.corpora, dict):
        raise ConfigError(f"data.corpora = {d.corpora!r}: expected a table of domain = [paths]")
    for domain, paths in d.corpora.items():
        _paths_list(f"data.corpora.{domain}", [paths] if isinstance(paths, str) else paths)
        known = [GENERAL_DOMAIN, *(roles.prompts if isinstance(roles.prompts, dict) else {})]
        if domain not in known:
            raise ConfigError(f"data.corpora.{domain}: no such domain; a corpus belongs to "
                              f"{', '.join(known)} (add roles.prompts.{domain} for a new domain)")
    _at_least({"data.seq_len": d.seq_len}, 2)
    _at_least({"data.workers": d.workers}, 0)    # 0 = one per CPU core
    _within("data.integration_fraction", d.integration_fraction, 0.0, 1.0)
    check_kind_weights(d.kind_weights, "data.kind_weights")
    _paths_table("data.domains", d.domains)
    _paths_list("data.files", d.files)
    _paths_list("data.pretrain", d.pretrain)
    # Rows of data.files may belong to any domain of the role table.
    file_domains = list(roles.prompts) if d.files and isinstance(roles.prompts, dict) else []
    # Any domain of the role table may be kept empty on purpose (a role prompt without rows is
    # refused otherwise, as the misspelling it usually is: data/mixture.py).
    sizes = d.sizes if isinstance(d.sizes, dict) else {}
    kept_empty = [domain for domain in (roles.prompts if isinstance(roles.prompts, dict) else {})
                  if sizes.get(domain) == 0 or size_share(sizes.get(domain)) == 0]
    _check_sizes(d.sizes, [*d.domains, *file_domains, *kept_empty])
    if not d.prepared:
        raise ConfigError("data.prepared is empty; set the directory of the prepared dataset")


# Pairs of keys that say one thing two ways, and how to choose: a run gives one of each pair. A
# key the command line sets displaces the other when only the file set that (load_config); two
# from the same source are refused: train.* by validate_config, model.* where the model is built
# (train/parallel.py model_source), as only train reads model.init_config.
ALTERNATIVES = {
    ("train.epochs", "train.steps"):
        "train.epochs (passes over the data) or train.steps (optimizer steps)",
    ("model.path", "model.init_config"):
        "model.path (a checkpoint to fine-tune) or model.init_config (a config.json for random "
        "init)",
}


def _steps_set(t: TrainConfig, given: set) -> bool:
    # train.steps has a default, so only a value set on purpose (in the file, an override, or in
    # code: other than the default) conflicts with train.epochs; 0 is "not set".
    return t.steps != 0 and ("train.steps" in given or t.steps != TrainConfig.steps)


def _value(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _is_set(config: RunConfig, key: str) -> bool:
    """Whether `key` of ALTERNATIVES holds a value of its own (not its "off" value)."""
    if key == "train.steps":
        return _steps_set(config.train, config.given)
    if key == "train.epochs":
        return config.train.epochs > 0
    return bool(_value(config, key))   # model.path, model.init_config: a path or ""


def _displace_file_alternatives(config: RunConfig, path: str) -> None:
    """The command line is the user's latest word: where it sets one key of an ALTERNATIVES pair
    and only the file set the other, the file's key goes back to its default, said in a log line
    (so `--train.epochs=1` on a file with train.steps means one pass). Conflicts within one
    source are left for the checks to refuse: neither value is later than the other."""
    for (a, b), choice in ALTERNATIVES.items():
        if not (_is_set(config, a) and _is_set(config, b)):
            continue
        if (a in config.command_line) == (b in config.command_line):
            continue
        kept, dropped = (a, b) if a in config.command_line else (b, a)
        old = _value(config, dropped)
        section, name = dropped.split(".")
        values = getattr(config, section)
        setattr(values, name, getattr(type(values)(), name))
        config.given.discard(dropped)
        log.info(f"{dropped} = {old!r} from {path} is ignored: the command line sets {kept} = "
                 f"{_value(config, kept)!r}, and a run takes {choice}, not both")


def _check_train(t: TrainConfig, c: CheckpointConfig, given: set) -> None:
    _one_of("train.device", t.device, DEVICES)
    if not 0 <= t.epochs < math.inf:
        raise ConfigError(f"train.epochs = {t.epochs}: must be a finite number >= 0 (0 = use "
                          "train.steps)")
    # train.steps = 0 says "no step count", as train.epochs = 0 does: with train.epochs the steps
    # are derived from the data, so `--train.steps=0` can clear a file's steps explicitly.
    if t.steps < (1 if t.epochs == 0 else 0):
        raise ConfigError(f"train.steps = {t.steps}: must be >= 1 (or 0 with train.epochs set: "
                          "the steps are then derived from the passes)")
    if t.epochs > 0 and _steps_set(t, given):
        raise ConfigError(f"train.epochs = {t.epochs} and train.steps = {t.steps} are both set; "
                          f"give one: {ALTERNATIVES[('train.epochs', 'train.steps')]}")
    _at_least({"train.threads": t.threads}, 0)
    _at_least({"train.micro_batch_size": t.micro_batch_size,
               "train.grad_accum": t.grad_accum, "train.log_every": t.log_every}, 1)
    _at_least({"train.warmup_steps": t.warmup_steps, "train.grad_clip": t.grad_clip,
               "train.weight_decay": t.weight_decay, "checkpoint.every": c.every,
               "checkpoint.keep": c.keep, "train.seed": t.seed}, 0)
    if not 0 < t.lr < math.inf:
        raise ConfigError(f"train.lr = {t.lr}: must be a finite number > 0")
    for key, seconds in (("train.progress_every_s", t.progress_every_s),
                         ("train.collective_timeout_s", t.collective_timeout_s)):
        if not 0 < seconds < math.inf:
            raise ConfigError(f"{key} = {seconds}: must be a finite number of seconds > 0")
    if not t.eps > 0:
        raise ConfigError(f"train.eps = {t.eps}: must be > 0")
    _within("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
    _check_profile_steps(t.profile_steps)
    for key, beta in (("train.beta1", t.beta1), ("train.beta2", t.beta2)):
        if not 0 <= beta < 1:
            raise ConfigError(f"{key} = {beta}: must be in [0, 1)")


def _check_profile_steps(steps) -> None:
    """train.profile_steps: [] or [first, last], steps counted from 1 as in the log."""
    if not steps:
        return
    if not isinstance(steps, list) or len(steps) != 2 \
            or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
        raise ConfigError(f"train.profile_steps = {steps!r}: expected [first, last], two step "
                          "numbers (e.g. [10, 12]), or [] for no trace")
    first, last = steps
    if first < 1:
        raise ConfigError(f"train.profile_steps = {steps!r}: the first step must be >= 1 (steps "
                          "count from 1, as in log.jsonl)")
    if first > last:
        raise ConfigError(f"train.profile_steps = {steps!r}: the first step must be <= the last")


def _check_distill(d: DistillConfig) -> None:
    _at_least({"distill.max_new_tokens": d.max_new_tokens, "distill.batch_size": d.batch_size,
               "distill.repeat_ngram": d.repeat_ngram}, 1)
    _within("distill.max_repeat_fraction", d.max_repeat_fraction, 0.0, 1.0)   # 1 keeps every answer
    if not d.greedy and not (d.temperature > 0 and 0 < d.top_p <= 1):
        raise ConfigError(f"distill.temperature = {d.temperature}, distill.top_p = {d.top_p}: "
                          "sampling needs temperature > 0 and 0 < top_p <= 1 "
                          "(or distill.greedy = true)")


def _check_eval(e: EvalConfig) -> None:
    _at_least({"eval.max_new_tokens": e.max_new_tokens, "eval.batch_size": e.batch_size}, 1)
    _paths_table("eval.domains", e.domains)
    _paths_list("eval.files", e.files)


def _check_precision(t: TrainConfig, d: DataConfig) -> None:
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.fp8_recipe", t.fp8_recipe, FP8_RECIPES)
    tokens = t.micro_batch_size * d.seq_len
    # The weight gradient's FP8 GEMM contracts over a micro-batch's tokens (train/fp8.py).
    if t.precision == "fp8" and tokens % FP8_DIM_MULTIPLE:
        raise ConfigError(
            f"train.precision = 'fp8': a micro-batch holds {tokens} tokens (data.seq_len "
            f"{d.seq_len} x train.micro_batch_size {t.micro_batch_size}), not a multiple of "
            f"{FP8_DIM_MULTIPLE} as FP8 matmuls need; make data.seq_len a multiple of "
            f"{FP8_DIM_MULTIPLE}, e.g. {-(-d.seq_len // FP8_DIM_MULTIPLE) * FP8_DIM_MULTIPLE}")


def _check_parallel(p: ParallelConfig, seq_len: int) -> None:
    """What the values alone decide; their product against the number of processes is checked
    where that is known (train/parallel.py mesh_shape)."""
    _one_of("parallel.accumulate", p.accumulate, ACCUMULATE_MODES)
    if isinstance(p.cp, bool) or not isinstance(p.cp, int) or p.cp < 1:
        raise ConfigError(f"parallel.cp = {p.cp!r}: expected an integer >= 1 (the processes one "
                          "row is split over; 1 = no context parallelism)")
    if p.cp > 1 and seq_len % (2 * p.cp):
        fit = -(-seq_len // (2 * p.cp)) * 2 * p.cp
        raise ConfigError(f"parallel.cp = {p.cp}: data.seq_len = {seq_len} must be a multiple of "
                          f"2 x parallel.cp = {2 * p.cp} (each row is cut into that many equal "
                          f"chunks); use data.seq_len = {fit}")
    if isinstance(p.dp_replicate, bool) or not isinstance(p.dp_replicate, int) \
            or not (p.dp_replicate >= 1 or p.dp_replicate == -1):
        raise ConfigError(f"parallel.dp_replicate = {p.dp_replicate!r}: expected an integer >= 1, "
                          "or -1 (what parallel.dp_shard leaves of the processes)")
    if isinstance(p.dp_shard, str):
        if p.dp_shard != "auto":
            raise ConfigError(f"parallel.dp_shard = {p.dp_shard!r}: expected an integer >= 1, -1 "
                              "(every process parallel.dp_replicate leaves) or \"auto\" (the "
                              "processes of one node)")
    elif isinstance(p.dp_shard, bool) or not isinstance(p.dp_shard, int) \
            or not (p.dp_shard >= 1 or p.dp_shard == -1):
        raise ConfigError(f"parallel.dp_shard = {p.dp_shard!r}: expected an integer >= 1, -1 "
                          "(every process parallel.dp_replicate leaves) or \"auto\" (the "
                          "processes of one node)")
    if p.dp_replicate == -1 and p.dp_shard == -1:
        raise ConfigError("parallel.dp_replicate = -1 and parallel.dp_shard = -1: at most one of "
                          "them can take what the other leaves; give the other a number (or "
                          "parallel.dp_shard = \"auto\", the processes of one node)")


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_lora(lora: LoRAConfig, t: TrainConfig) -> None:
    _at_least({"lora.rank": lora.rank}, 0)
    if lora.rank == 0:
        return
    if not 0 < lora.alpha < math.inf:
        raise ConfigError(f"lora.alpha = {lora.alpha}: must be a finite number > 0")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout = {lora.dropout}: must be in [0, 1)")
    if not isinstance(lora.target_modules, list) or not lora.target_modules:
        raise ConfigError(f"lora.target_modules = {lora.target_modules!r}: expected a non-empty "
                          f"list of layer names from {', '.join(LORA_TARGET_MODULES)}")
    for name in lora.target_modules:
        if name == "lm_head":
            raise ConfigError("lora.target_modules: 'lm_head' cannot take an adapter here (the "
                              "fused cross-entropy reads the LM head's weight itself); adapt the "
                              "decoder layers only")
        if name not in LORA_TARGET_MODULES:
            raise ConfigError(f"lora.target_modules: {name!r} is not a linear layer of the model"
                              f"{_closest(str(name), LORA_TARGET_MODULES)}")
    if t.precision == "fp8":
        raise ConfigError("lora.rank > 0 with train.precision = 'fp8': FP8 replaces the linear "
                          "layers the adapters sit on; use train.precision = 'bf16' for LoRA runs")


def validate_config(config: RunConfig) -> RunConfig:
    """Every value's allowed range, checked once, here, before any stage runs; returns config.

    Only what the values alone decide: whether files exist and what they hold is checked by the
    stage that reads them. Every stage's entry point calls this too, for configs built in code."""
    _check_model(config.model)
    _check_data(config.data, config.roles)
    _check_train(config.train, config.checkpoint, getattr(config, "given", set()))
    _check_distill(config.distill)
    _check_eval(config.eval)
    _check_precision(config.train, config.data)
    _check_lora(config.lora, config.train)
    _check_parallel(config.parallel, config.data.seq_len)
    _check_tensor_parallel(config.parallel, config.data.seq_len)
    return config


def _check_tensor_parallel(p: ParallelConfig, seq_len: int) -> None:
    if isinstance(p.tp, bool) or not isinstance(p.tp, int) or p.tp < 1:
        raise ConfigError(f"parallel.tp = {p.tp!r}: expected an integer >= 1 (the processes a "
                          "block's matmuls are split over; 1 = no tensor parallelism)")
    if p.tp == 1:
        return
    # each tp rank keeps an equal share of its (cp rank's) tokens
    split = p.tp * p.cp
    if p.sequence_parallel and seq_len % split:
        what = "parallel.tp" if p.cp == 1 else "parallel.tp x parallel.cp"
        raise ConfigError(f"parallel.tp = {p.tp} with parallel.sequence_parallel = true: "
                          f"data.seq_len = {seq_len} must be a multiple of {what} (each rank "
                          f"keeps an equal share of a micro-batch's tokens); use data.seq_len = "
                          f"{-(-seq_len // split) * split}, or parallel.sequence_parallel = false")


def _field_comments() -> dict[tuple[str, str], str]:
    """{(class name, field): its comment}: the comment on the field's line(s), else the comment
    lines right above it. Read from this file, so each key's meaning is written once, next to it."""
    import ast
    import io
    import tokenize

    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            trailing = [comments[n] for n in range(item.lineno, item.end_lineno + 1)
                        if n in comments
                        and not lines[n - 1].lstrip().startswith("#")]
            above, n = [], item.lineno - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            found[(node.name, item.target.id)] = " ".join(trailing or above)
    return found


def config_keys() -> dict[str, list[tuple[str, object, str]]]:
    """Every key of a run configuration by section: [(key, default, one line of meaning)]."""
    comments = _field_comments()
    default = RunConfig()
    out = {}
    for section in dataclasses.fields(RunConfig):
        values = getattr(default, section.name)
        out[section.name] = [(toml_key(f.name), getattr(values, f.name),
                              comments.get((type(values).__name__, f.name), ""))
                             for f in dataclasses.fields(values)]
    return out


def _read_toml(path: str) -> dict:
    if os.path.isdir(path):
        raise ConfigError(f"--config {os.path.abspath(path)} is a directory; give the run's TOML "
                          "file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {os.path.abspath(path)}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}), so not a TOML file") from None
    except tomllib.TOMLDecodeError as e:   # its message ends with "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


# The keys whose values are paths (for a table or a list: its values). load_config makes each
# absolute: a path the TOML file gives, or a default the file leaves (runs/prepared, runs/train),
# is relative to the file's folder, so that one config names the same files from any working
# directory (`rega-engine eval --config own/rega.toml` from the parent folder finds what
# `cd own && rega-engine train --config rega.toml` wrote); a command-line override is relative to
# the working directory, as a shell user expects. Absolute paths also make every error about a
# file name the one that was looked at.
PATH_KEYS = frozenset({
    "model.path", "model.init_config", "data.tokenizer", "data.general", "data.domains",
    "data.files", "data.pretrain", "data.corpora", "data.prepared", "train.out_dir",
    "distill.instructions", "distill.output", "distill.model", "eval.checkpoint", "eval.general",
    "eval.domains", "eval.files", "eval.output"})


def absolute_paths(value, base: str):
    """`value` (a path, or a table or list of paths) with every relative path joined to the
    folder `base` (and `~` expanded); "" stays "" (it means "not set"), other types as they are
    (validate_config names a wrong one)."""
    if isinstance(value, str):
        return os.path.normpath(os.path.join(base, os.path.expanduser(value))) if value else value
    if isinstance(value, list):
        return [absolute_paths(v, base) for v in value]
    if isinstance(value, dict):
        return {k: absolute_paths(v, base) for k, v in value.items()}
    return value


def _warn_if_moved(key: str, value, base: str, source: str) -> None:
    """Relative paths in a config file were relative to the working directory before they were
    relative to the file's folder: where only the old reading names something that exists (a
    requeued `--resume` would otherwise start over in an empty folder), say so."""
    cwd = os.getcwd()
    if os.path.abspath(base) == cwd:
        return
    texts = value.values() if isinstance(value, dict) else value if isinstance(value, list) \
        else [value]
    for text in texts:
        if not isinstance(text, str) or not text or os.path.isabs(os.path.expanduser(text)):
            continue
        now, before = os.path.join(base, text), os.path.join(cwd, text)
        if not os.path.exists(now) and os.path.exists(before):
            log.warning(f"{source}: {key} = {text!r} is relative to the config file's folder, "
                        f"so it names {os.path.normpath(now)}, which does not exist; "
                        f"{os.path.normpath(before)} (relative to the working directory) does: "
                        "write the path relative to the config file, or absolute")


def load_config(path: str | os.PathLike | None = None,
                overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then the overrides in order (the command line's: a key they
    set displaces the file's alternative to it, see ALTERNATIVES). Paths come out absolute (see
    PATH_KEYS)."""
    config = RunConfig()
    cwd = os.getcwd()
    base = cwd
    if path is not None:
        path = os.fspath(path)
        base = os.path.dirname(os.path.abspath(path))
        _apply(config, _read_toml(path), path, base)
    for text in overrides:
        config.command_line |= _apply(config, parse_override(text), f"override '{text}'", cwd)
    for key in PATH_KEYS - config.given:   # the defaults, as if the file had written them
        section, name = key.split(".")
        values = getattr(config, section)
        setattr(values, name, absolute_paths(getattr(values, name), base))
    if path is not None:
        _displace_file_alternatives(config, path)
    return validate_config(config)
