"""`rega-engine demo`: the whole REGA pipeline on the bundled synthetic world, on a CPU, in minutes.

  1. a SentencePiece tokenizer trained on the world's text;
  2. a tiny Llama pretrained from scratch on the general skills (the "base model");
  3. self-distillation: the base model answers general instructions (temperature 0.7, top-p 0.95);
  4. five fine-tunes of the base model on the two domains, by configuration alone: standard
     fine-tuning (domains mixed under the central prompt, nothing else), full REGA, and REGA
     without self-distillation, without role prompts, without role integration;
  5. every model evaluated the way REGA serves, under the central prompt only, on the general
     skills and on each domain: exact match, content match (forgetting vs contamination) and
     inter-domain confusion (`report.analyse_set`).

All of it for several seeds (--seeds, default 3), each in its own process with one thread, in
<out>/seed_<S>/; then every number as mean and min-max over the seeds and every verdict decided
on all of them (`report`): tables, results.json and results.png (and sweep.png with --sweep).

Each stage runs the same functions as the command line, on a RunConfig built here (trainings in
a child process, `rega-engine train`); the config is also written to
<out>/seed_<S>/configs/<stage>.toml and the equivalent command printed, so every stage can be
rerun by hand. Stage output (data reports, training logs) goes to <out>/seed_<S>/<stage>/log.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from . import report
from . import world as world_module
from .world import DOMAINS, GENERAL, WORLDS, World, make_world

VARIANTS = (
    # name, label, data switches (self_distillation, role_prompts, role_integration)
    ("standard", "standard FT", (False, False, False)),
    ("rega", "REGA", (True, True, True)),
    ("no_distill", "REGA - self-distillation", (False, True, True)),
    ("no_roles", "REGA - role prompts", (True, False, True)),
    ("no_integration", "REGA - role integration", (True, True, False)),
)


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost. `full` is tuned for about 5 minutes on 2 CPU cores."""
    general_train: int          # pretraining samples of the general skills
    instructions: int           # general instructions the base model answers (self-distillation)
    domain_train: int           # training samples per domain
    eval_general: int
    eval_domain: int
    pretrain_steps: int
    # passes over each variant's own mixture (equal passes over the domains)
    finetune_epochs: int
    pretrain_lr: float
    finetune_lr: float
    integration_fraction: float # share of each domain's samples reused under the central prompt
    rows: int                   # micro-batch rows of seq_len tokens
    seq_len: int
    hidden: int
    layers: int
    vocab: int


# Sized for three seeds in parallel, one thread each, in about 5 minutes on 2 CPU cores: measured,
# seeds 0-2 took 4 min 48 s on a 2-core machine (about 186 s of CPU per seed: 500 pretraining and
# ~410 fine-tuning steps of 4 x 256 tokens, six training processes started at ~4.5 s each, six
# evaluations of 450 questions). At these sizes REGA's worst seed keeps 91% of the base's general
# exact match (the verdict asks 90%), and the fine-tunes have not yet learned to tell the
# domains' sign-offs apart (see docs/demo.md): more fine-tuning (domain_train, epochs) is the
# knob, at about 0.2 s of CPU per step and seed.
# The demo reuses half of each domain under the central prompt (the engine's default is 0.1): a
# model this small needs to see the domains under the central prompt often to answer them as
# well there (measured on seed 0 with an earlier, larger size: at 0.1 REGA scored 90.7% in lab,
# mostly wrong sums, against standard fine-tuning's 98.3%; at 0.5, 99.0%).
FULL = Sizes(general_train=6000, instructions=500, domain_train=500, eval_general=150,
             eval_domain=150,
             pretrain_steps=500, finetune_epochs=2, pretrain_lr=3e-3, finetune_lr=1e-3,
             integration_fraction=0.5, rows=4, seq_len=256, hidden=128, layers=4, vocab=512)
# A one-minute look on 2 cores (measured: 66 s for two seeds): every stage and table, models
# that learn next to nothing.
QUICK = Sizes(general_train=2000, instructions=150, domain_train=120, eval_general=45,
              eval_domain=45,
              pretrain_steps=70, finetune_epochs=2, pretrain_lr=3e-3, finetune_lr=1e-3,
              integration_fraction=0.5, rows=4, seq_len=256, hidden=128, layers=4, vocab=512)
# The tests' sizes: every stage runs, in seconds; the models learn next to nothing.
SMOKE = Sizes(general_train=300, instructions=40, domain_train=60, eval_general=20, eval_domain=10,
              pretrain_steps=8, finetune_epochs=1, pretrain_lr=3e-3, finetune_lr=1e-3,
              integration_fraction=0.1, rows=2, seq_len=128, hidden=64, layers=1, vocab=400)


# -- small helpers -------------------------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)      # a JSON string is a TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(config: RunConfig) -> str:
    """The config's non-default values as TOML, section by section."""
    default = RunConfig().to_dict()
    lines = []
    for section, values in config.to_dict().items():
        changed = {k: v for k, v in values.items() if v != default[section][k]}
        if changed:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in changed.items()]
            lines.append("")
    return "\n".join(lines)


class Stages:
    """Runs the stages, each with its output in a log file, and keeps their timings and the
    commands that would run them by hand."""

    def __init__(self, out: Path):
        self.out = out
        self.timings: dict[str, float] = {}
        self.commands: list[str] = []

    def save_config(self, name: str, config: RunConfig, *commands: str) -> Path:
        path = self.out / "configs" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(config))
        for command in commands:
            self.commands.append(f"rega-engine {command} --config {path}")
        return path

    @contextlib.contextmanager
    def run(self, name: str, title: str, log_path: Path):
        print(f"[{name}] {title} ...", flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log_path, "a", encoding="utf-8") as log:
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield
            except BaseException:
                print(f"[{name}] failed; its output is in {log_path}", file=sys.stderr)
                raise
        seconds = time.time() - started
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        print(f"[{name}] done in {seconds:.1f} s (log: {log_path})", flush=True)


# -- the pipeline --------------------------------------------------------------------------------
def write_world(world: World, sizes: Sizes, data: Path) -> dict:
    """The world's JSONL files: pretraining set, instructions, domain sets, eval sets."""
    files = {
        "general_train": world_module.write_jsonl(data / "general_train.jsonl",
                                                  world.examples(GENERAL, sizes.general_train,
                                                                 "train")),
        "instructions": world_module.write_jsonl(data / "general_instructions.jsonl",
                                                 world.examples(GENERAL, sizes.instructions,
                                                                "distill"),
                                                 with_answer=False),
        "eval_general": world_module.write_jsonl(data / "eval_general.jsonl",
                                                 world.examples(GENERAL, sizes.eval_general,
                                                                "eval")),
    }
    for domain in DOMAINS:
        files[domain] = world_module.write_jsonl(data / f"{domain}.jsonl",
                                                 world.examples(domain, sizes.domain_train,
                                                                "train"))
        files[f"eval_{domain}"] = world_module.write_jsonl(data / f"eval_{domain}.jsonl",
                                                           world.examples(domain, sizes.eval_domain,
                                                                          "eval"))
    return files


def tokenizer_texts(world: World) -> list[str]:
    """The world's text the way the plain chat template lays it out, so that "User:" and friends
    become single tokens."""
    texts = [f"System: {p}" for p in (world.central_prompt, *world.role_prompts.values())]
    for i, text in enumerate(world.corpus()):
        texts.append(f"{'User' if i % 2 == 0 else 'Assistant'}: {text}")
    return texts


def model_config(vocab_size: int, sizes: Sizes) -> dict:
    heads = max(1, sizes.hidden // 32)
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": sizes.hidden, "intermediate_size": 3
        * sizes.hidden,
        "num_hidden_layers": sizes.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": sizes.seq_len, "initializer_range": 0.02,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
    }


def base_config(world: World, sizes: Sizes, out: Path, seed: int, device: str) -> RunConfig:
    config = RunConfig()
    config.roles.central_prompt = world.central_prompt
    config.roles.prompts = dict(world.role_prompts)
    config.data.tokenizer = str(out / "tokenizer")
    config.data.chat_template = "plain"
    config.data.seq_len = sizes.seq_len
    config.data.workers = 1
    config.data.seed = seed
    config.train.micro_batch_size = sizes.rows
    config.train.seed = seed
    import torch
    # the training processes use as many as the demo
    config.train.threads = torch.get_num_threads()
    config.train.device = device
    config.train.progress = False
    config.train.plot = False
    config.train.log_every = 10
    config.train.weight_decay = 0.0
    config.checkpoint.every = 0
    return config


def with_eval(config: RunConfig, files: dict, model_dir: Path) -> RunConfig:
    """The eval section: the general set and each domain's, under the central prompt."""
    config.eval.checkpoint = str(model_dir / "hf")
    config.eval.general = files["eval_general"]
    config.eval.domains = {d: files[f"eval_{d}"] for d in DOMAINS}
    config.eval.output = str(model_dir / "eval.json")
    config.eval.max_new_tokens = 12       # the longest right answer ("0 1 7 noted") is well under
    config.eval.batch_size = 64
    return config


def pretrain_config(base: RunConfig, files: dict, sizes: Sizes, out: Path) -> RunConfig:
    config = copy.deepcopy(base)
    config.model.init_config = str(out / "tiny_llama.json")
    # The base model learns the general skills from the world's own answers, under the central
    # prompt: pretraining data, samples of kind `pretrain` (the same samples, in the same order,
    # as when they posed as data.general, so the results do not change).
    config.data.pretrain = [files["general_train"]]
    config.data.prepared = str(out / "base" / "prepared")
    config.train.out_dir = str(out / "base")
    config.train.steps = sizes.pretrain_steps
    config.train.lr = sizes.pretrain_lr
    config.train.warmup_steps = max(1, sizes.pretrain_steps // 20)
    return with_eval(config, files, out / "base")


def distill_config(base: RunConfig, files: dict, out: Path, seed: int) -> RunConfig:
    config = copy.deepcopy(base)
    config.model.path = str(out / "base" / "hf")
    config.distill.instructions = files["instructions"]
    config.distill.output = str(out / "distilled" / "general.jsonl")
    config.distill.temperature = 0.7        # the paper's sampling
    config.distill.top_p = 0.95
    config.distill.max_new_tokens = 16      # answers are a few tokens; longer ones are cut off
    config.distill.batch_size = 64
    config.distill.seed = seed
    return config


def variant_config(base: RunConfig, files: dict, sizes: Sizes, out: Path, name: str,
                   switches) -> RunConfig:
    config = copy.deepcopy(base)
    config.model.path = str(out / "base" / "hf")
    config.data.general = str(out / "distilled" / "general.jsonl")
    config.data.domains = {d: files[d] for d in DOMAINS}
    config.data.self_distillation, config.data.role_prompts, config.data.role_integration = switches
    config.data.integration_fraction = sizes.integration_fraction
    config.data.prepared = str(out / name / "prepared")
    config.train.out_dir = str(out / name)
    config.train.lr = sizes.finetune_lr
    return with_eval(config, files, out / name)


def set_epochs(config: RunConfig, epochs: int) -> None:
    """Steps for `epochs` passes over the prepared mixture. Every variant sees each domain sample
    equally often (as in the paper); REGA's extra general samples cost it extra steps."""
    from ..data.loader import PackedLoader

    loader = PackedLoader(config.data.prepared, seq_len=config.data.seq_len,
                          batch_size=config.train.micro_batch_size, seed=config.train.seed)
    config.train.steps = max(1, epochs * len(loader))
    config.train.warmup_steps = max(1, config.train.steps // 20)


def evaluate_one(model_dir: Path, world: World, sizes: Sizes, config: RunConfig,
                 device: str) -> dict:
    """Per set under the central prompt: exact match, content match, conventions, perplexity and
    the same per kind of question (`report.analyse_set`)."""
    from ..evaluate import evaluate_model

    examples = {GENERAL: world.examples(GENERAL, sizes.eval_general, "eval"),
                **{d: world.examples(d, sizes.eval_domain, "eval") for d in DOMAINS}}
    sets = {name: [e.record()["messages"] for e in exs] for name, exs in examples.items()}
    result = evaluate_model(model_dir, sets, central_prompt=config.roles.central_prompt,
                            chat_template=config.data.chat_template,
                            max_new_tokens=config.eval.max_new_tokens,
                            batch_size=config.eval.batch_size, device=device, keep_predictions=True)
    return {name: report.analyse_set(world, name, examples[name], metrics["predictions"],
                                     loss=metrics["loss"], perplexity=metrics["perplexity"])
            for name, metrics in result["central"].items()}


def run_seed(seed: int, out: Path, sizes: Sizes, world_name: str, device: str,
             sweep: bool = False) -> dict:
    """The whole pipeline for one seed, in this process; its results also go to
    <out>/seed_results.json. Returns {"seed", "results", "timings_s", ...} or {"stopped": code}."""
    from ..data.prepare import prepare
    from ..distill import distill
    from ..tokenizer import train_tokenizer
    started, cpu_started, children_started = time.time(), time.process_time(), _children_cpu()
    generation_device = "cpu" if device == "cpu" else "auto"
    # Absolute: the stage configs written under <out>/configs name these paths, and a config's
    # relative paths are relative to its own folder (config.PATH_KEYS).
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    stages = Stages(out)
    world = make_world(world_name, seed)

    with stages.run("data", "writing the synthetic world and training its tokenizer",
                    out / "data" / "log.txt"):
        files = write_world(world, sizes, out / "data")
        tokenizer_dir = train_tokenizer(tokenizer_texts(world), out / "tokenizer",
                                        vocab_size=sizes.vocab,
                                        seed=seed)
        from transformers import AutoTokenizer
        vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
        (out / "tiny_llama.json").write_text(json.dumps(model_config(vocab_size, sizes), indent=2))
    base = base_config(world, sizes, out, seed, device)

    config = pretrain_config(base, files, sizes, out)
    path = stages.save_config("pretrain", config, "prepare", "train", "eval")
    with stages.run("pretrain",
        f"pretraining a tiny Llama on the general skills ({sizes.pretrain_steps} steps)",
                    out / "base" / "log.txt"):
        prepare(config)
        code = train_in_child(path)
    if code:   # a SIGTERM stopped training: there is no model to go on with
        log_file = out / "base" / "log.txt"
        print(f"[pretrain] stopped by SIGTERM (log: {log_file}); the demo ends here",
              file=sys.stderr)
        return {"stopped": code}
    results = {}
    with stages.run("eval base", "evaluating the base model", out / "base" / "eval_log.txt"):
        results["base"] = evaluate_one(out / "base" / "hf", world, sizes, config, generation_device)
    print(f"  base model: general exact match {results['base'][GENERAL]['exact_match']:.1%} ("
          + ", ".join(f"{k} {v:.0%}" for k, v in results["base"][GENERAL]["by_kind"].items()) + ")",
          flush=True)

    config = distill_config(base, files, out, seed)
    stages.save_config("distill", config, "distill")
    with stages.run("distill", "self-distilling general exemplars from the base model",
                    out / "distilled" / "log.txt"):
        distilled = distill(config)
    print(f"  {distilled['answered']} distinct instructions answered, {distilled['kept']} kept; "
          "filtered: "
          + ", ".join(f"{r} {n}" for r, n in distilled["filtered"].items()), flush=True)

    runs = [(name, label, switches, sizes.integration_fraction,
             1.0) for name, label, switches in VARIANTS]
    if sweep:
        runs += sweep_runs(sizes)
    steps = {}
    for name, label, switches, fraction, share in runs:
        config = variant_config(base, files, sizes, out, name, switches)
        config.data.integration_fraction = fraction
        if share < 1.0:
            config.data.general = subsample(out / "distilled" / "general.jsonl", share,
                                            out / "distilled" / f"general_{share:g}.jsonl")
        with stages.run(name, f"fine-tuning: {label}", out / name / "log.txt"):
            prepare(config)
            set_epochs(config, sizes.finetune_epochs)
            path = stages.save_config(name, config, "prepare", "train", "eval")
            code = train_in_child(path)
        if code:
            log_file = out / name / "log.txt"
            print(f"[{name}] stopped by SIGTERM (log: {log_file}); the demo ends here",
                  file=sys.stderr)
            return {"stopped": code}
        steps[name] = config.train.steps
        print(f"  {config.train.steps} steps ({sizes.finetune_epochs} passes over its mixture)",
              flush=True)
        with stages.run(f"eval {name}", f"evaluating {label}", out / name / "eval_log.txt"):
            results[name] = evaluate_one(out / name / "hf", world, sizes, config, generation_device)
        print("  exact match: " + ", ".join(f"{s} {m['exact_match']:.1%}"
                                            for s, m in results[name].items()),
              flush=True)
    total = time.time() - started
    payload = {"seed": seed, "world": world_name, "results": results, "steps": steps,
               "distilled": {k: distilled[k] for k in ("answered", "kept")},
               "commands": stages.commands,
               "timings_s": {**{k: round(v, 1) for k, v in stages.timings.items()},
                             "total": round(total, 1),
                             "cpu": round(time.process_time() - cpu_started + _children_cpu()
                                          - children_started, 1)}}
    (out / "seed_results.json").write_text(json.dumps(payload, indent=2))
    return payload


def _children_cpu() -> float:
    """CPU seconds of the finished child processes (the trainings), user and system."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_in_child(config_path: Path) -> int:
    """`rega-engine train --config <path>` in a process of its own (its output into the stage's
    log); returns its exit code, 143 when a SIGTERM stopped it. Training in a fresh process
    keeps one training's state (allocator, registered ops, threads) from reaching the next: in
    the working tree of this change, a second in-process training crashed in the custom ops."""
    import subprocess

    sys.stdout.flush()
    code = subprocess.run([sys.executable, "-m", "rega_engine.cli", "train", "--config",
                           str(config_path)],
                          stdout=sys.stdout, stderr=sys.stderr).returncode
    if code not in (0, 143):
        raise RuntimeError(f"rega-engine train --config {config_path} exited with {code}")
    return code


# -- the sweep (--sweep) -------------------------------------------------------------------------
SWEEP_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5)
SWEEP_SHARES = (0.25, 0.5, 1.0)


def sweep_name(fraction: float, share: float) -> str:
    return f"sweep_f{fraction:g}_d{share:g}"


def sweep_points(sizes: Sizes) -> list[tuple[float, float, str]]:
    """(integration fraction, distilled share, model name) of every sweep point; the points the
    five main models already are reuse them (REGA, and REGA without role integration at 0)."""
    points = []
    for fraction in SWEEP_FRACTIONS:
        name = ("no_integration" if fraction == 0.0 else "rega" if fraction
                == sizes.integration_fraction
                else sweep_name(fraction, 1.0))
        points.append((fraction, 1.0, name))
    for share in SWEEP_SHARES:
        if share != 1.0:
            points.append((sizes.integration_fraction, share, sweep_name(sizes.integration_fraction,
                                                                         share)))
    return points


def sweep_runs(sizes: Sizes) -> list[tuple]:
    main_names = {name for name, _, _ in VARIANTS}
    return [(name, f"REGA, integration fraction {fraction:g}, distilled share {share:g}", (True,
        True, True),
             fraction, share) for fraction, share, name in sweep_points(sizes)
             if name not in main_names]


def subsample(path: Path, share: float, target: Path) -> str:
    """The first `share` of a JSONL file's rows (the distilled answers come in a seeded order)."""
    rows = path.read_text(encoding="utf-8").splitlines()
    target.write_text("\n".join(rows[:max(1, round(share * len(rows)))]) + "\n", encoding="utf-8")
    return str(target)


def format_sweep(per_seed: list[dict], sizes: Sizes) -> str:
    lines = ["sweep (REGA, exact match %, mean (min-max) over seeds): general and the domains' "
             "mean",
             f"{'integration fraction':>21} {'distilled share':>16} {'general':>18} "
             f"{'domains':>18}"]
    for fraction, share, name in sweep_points(sizes):
        general = report.spread(report.metric(per_seed, name, GENERAL, "exact_match"))
        domains = report.spread(domain_mean(per_seed, name))
        cells = f"{report._cell(general)} {report._cell(domains)}"
        lines.append(f"{fraction:>21g} {share:>16g} {cells}")
    return "\n".join(lines)


def domain_mean(per_seed: list[dict], name: str) -> list[float]:
    return [sum(r[name][d]["exact_match"] for d in DOMAINS) / len(DOMAINS) for r in per_seed]


def plot_sweep(per_seed: list[dict], sizes: Sizes, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep_points(sizes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (xlabel, selected, x_of) in zip(axes, (
            ("integration fraction (distilled share 1)", [p for p in points if p[1] == 1.0],
             lambda p: p[0]),
            (f"distilled share (integration fraction {sizes.integration_fraction:g})",
             [p for p in points if p[0] == sizes.integration_fraction], lambda p: p[1]))):
        selected = sorted(selected, key=x_of)
        xs = [x_of(p) for p in selected]
        for label, values_of in (("general", lambda n: report.metric(per_seed, n, GENERAL,
                                                                     "exact_match")),
                                 ("domains (mean)", lambda n: domain_mean(per_seed, n))):
            spreads = [report.spread(values_of(p[2])) for p in selected]
            ax.errorbar(xs, [100 * s["mean"] for s in spreads],
                        yerr=[[max(0.0, 100 * (s["mean"] - s["min"])) for s in spreads],
                              [max(0.0, 100 * (s["max"] - s["mean"])) for s in spreads]],
                        marker="o", capsize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match (%), central prompt")
    axes[0].legend()
    fig.suptitle(f"REGA's knobs: mean and min-max over {len(per_seed)} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- several seeds -------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="rega-engine demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo",
                        help="output directory (default runs/demo); the "
                        "demo's folders in it are replaced")
    parser.add_argument("--seed", type=int, default=0,
                        help="the first seed (of the world, the models and "
                        "the sampling); --seeds N runs seed, seed+1, ...")
    parser.add_argument("--seeds", type=int, default=None,
                        help="how many seeds (default 3, 2 with --quick): every number is "
                        "reported as mean and min-max over them, and every verdict decided on all "
                        "of them")
    parser.add_argument("--world", default="lookalike", choices=tuple(WORLDS),
                        help="lookalike (default): domains named in every question; confusion: the "
                             "domains "
                        "ask the same questions, told apart only by who asks")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and steps, two seeds: a look of "
                        "about two minutes on 2 cores (the models learn much less; read it as a "
                        "preview)")
    parser.add_argument("--sweep", action="store_true", help="also REGA at integration fractions "
                        f"{', '.join(map(str, SWEEP_FRACTIONS))} and distilled shares "
                        f"{', '.join(map(str, SWEEP_SHARES))}: sweep.png (several more minutes)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="seeds run at once, one process each (default: "
                        "all of them; with one thread each they share the cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="training and generation device (auto: a GPU when there is one)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per seed (default: 1 when seeds run in parallel, "
                             "else one "
                        "per core, at most 8)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)   # tests: seconds
    # one seed, for main
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the table, verdicts and plots "
                        "from the seed folders an earlier run left in --out (no training)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick or args.smoke else 3
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def sizes_for(args) -> Sizes:
    return SMOKE if args.smoke else QUICK if args.quick else FULL


# Folders the demo owns under --out (and under each seed's folder); a rerun replaces them (a stale
# checkpoint or distilled file would otherwise be resumed).
OWNED = ("data", "tokenizer", "configs", "base", "distilled", *(name for name, _, _ in VARIANTS))


def _worker_argv(args, seed: int, out: Path, threads: int) -> list[str]:
    argv = [sys.executable, "-m", "rega_engine.demo.run", "--worker", "--seed", str(seed), "--out",
            str(out),
            "--world", args.world, "--device", args.device, "--threads", str(threads)]
    return argv + [flag for flag, on in (("--quick", args.quick), ("--smoke", args.smoke),
                                          ("--sweep", args.sweep)) if on]


def worker_env(threads: int) -> dict[str, str]:
    """The seed workers' environment: `threads` threads each, and the folder that holds this
    rega_engine package first on their path, so that they run the same code as this process
    (a checkout's root, where its `kernels/` folder leaves the name `kernels` to Hugging Face's
    package: kernels/__init__.py)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                           *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_seeds(args, seeds: list[int], out: Path, threads: int) -> list[dict]:
    """Each seed in its own process (one torch thread each by default), at most --jobs at once;
    their stage lines are echoed here as they come, prefixed by the seed."""
    import subprocess

    jobs = args.jobs or len(seeds)
    pending = list(seeds)
    running: dict[int, tuple] = {}
    failed = []
    env = worker_env(threads)
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            seed_out = out / f"seed_{seed}"
            seed_out.mkdir(parents=True, exist_ok=True)
            log_path = seed_out / "demo_log.txt"
            log = open(log_path, "w", encoding="utf-8")
            process = subprocess.Popen(_worker_argv(args, seed, seed_out, threads), stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            running[seed] = (process, log, log_path, 0)
        time.sleep(0.5)
        for seed in list(running):
            process, log, log_path, offset = running[seed]
            with open(log_path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                text = f.read()
            if process.poll() is None:
                text = text[:text.rfind("\n") + 1]        # whole lines only while it runs
            for line in text.splitlines():
                if line.startswith("["):
                    print(f"[seed {seed}] {line}", flush=True)
            offset += len(text.encode("utf-8"))
            running[seed] = (process, log, log_path, offset)
            if process.poll() is not None:
                log.close()
                del running[seed]
                if process.returncode:
                    failed.append((seed, process.returncode, log_path))
    if failed:
        for seed, code, log_path in failed:
            print(f"[seed {seed}] failed with exit code {code}; its output is in {log_path}",
                  file=sys.stderr)
        raise SystemExit(failed[0][1] if failed[0][1] > 0 else 1)
    return [json.loads((out / f"seed_{seed}" / "seed_results.json").read_text()) for seed in seeds]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = sizes_for(args)
    out = Path(args.out)
    if args.worker:
        import torch
        torch.set_num_threads(args.threads or 1)
        payload = run_seed(args.seed, out, sizes, args.world, args.device, args.sweep)
        return payload.get("stopped", 0)

    started = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    parallel = len(seeds) > 1 and (args.jobs or len(seeds)) > 1
    cores = os.cpu_count() or 1
    threads = args.threads or (1 if parallel else min(cores, 8))
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in OWNED:   # an older single-seed layout
            shutil.rmtree(out / name, ignore_errors=True)
        for old in out.glob("seed_*"):
            shutil.rmtree(old, ignore_errors=True)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    print(f"REGA demo: {args.world} world, seeds {', '.join(map(str, seeds))}, {mode} sizes, "
          f"{min(len(seeds), args.jobs or len(seeds)) if parallel else 1} process(es) x {threads} "
          f"CPU thread(s) on {cores} core(s), output in {out}", flush=True)
    if args.report_only:
        per_seed = [json.loads((out / f"seed_{seed}" / "seed_results.json").read_text())
                    for seed in seeds]
    elif parallel:
        per_seed = run_seeds(args, seeds, out, threads)
    else:
        import torch
        torch.set_num_threads(threads)
        per_seed = []
        for seed in seeds:
            payload = run_seed(seed, out / f"seed_{seed}", sizes, args.world, args.device,
                               args.sweep)
            if "stopped" in payload:
                return payload["stopped"]
            per_seed.append(payload)

    main_models = ["base", *(name for name, _, _ in VARIANTS)]
    results = [{m: p["results"][m] for m in main_models} for p in per_seed]
    labels = {"base": "base model", **{name: label for name, label, _ in VARIANTS}}
    summary = report.aggregate(results)
    checks = report.verdicts(results, DOMAINS)
    print()
    print(report.format_results(summary, labels, DOMAINS, seeds))
    print()
    print(report.format_verdicts(checks))
    title = (f"REGA on the {args.world} world ({mode} sizes, "
             + (f"seed {seeds[0]})" if len(seeds) == 1 else f"{len(seeds)} seeds)"))
    report.plot(summary, labels, DOMAINS, seeds, out / "results.png", title)
    written = [out / "results.json", out / "results.png"]
    sweep = None
    if args.sweep:
        all_results = [p["results"] for p in per_seed]
        print()
        print(format_sweep(all_results, sizes))
        plot_sweep(all_results, sizes, out / "sweep.png")
        written.append(out / "sweep.png")
        sweep = [{"integration_fraction": f, "distilled_share": s, "model": n,
                  "general": report.spread(report.metric(all_results, n, GENERAL, "exact_match")),
                  "domains": report.spread(domain_mean(all_results,
                                                       n))} for f, s, n in sweep_points(sizes)]
    total = time.time() - started
    payload = {"world": args.world, "seeds": seeds, "mode": mode,
               "sizes": dataclasses.asdict(sizes),
               "threads_per_seed": threads, "device": args.device, "labels": labels,
               "summary": summary,
               "per_seed": {str(p["seed"]): p["results"] for p in per_seed},
               "checks": checks, "sweep": sweep,
               "timings_s": {"per_seed": {str(p["seed"]): p["timings_s"] for p in per_seed},
                             "total": round(total, 1)}}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    print("\nper-seed time: " + ", ".join(f"seed {p['seed']} {p['timings_s']['total']:.0f} s "
                                         f"({p['timings_s']['cpu']:.0f} s of CPU)"
                                         for p in per_seed)
          + f"; total {total:.0f} s")
    print("wrote " + ", ".join(map(str, written)))
    print(f"\nthe same stages by hand, with the configs seed {seeds[0]} wrote:")
    for command in per_seed[0]["commands"]:
        print(f"  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
