"""`rega-engine <tokenizer|model-config|prepare|train|distill|eval|export|convert|demo|bench>`.

Every subcommand that runs a job takes `--config run.toml` plus any number of `--section.key=value`
overrides (`rega-engine <job> --help` lists each key the job reads, with its default and meaning),
which win over the file, also over its alternative key (config.ALTERNATIVES: `--train.epochs=1`
on a file with train.steps trains one pass, and says so);
each stage's module is imported only when its subcommand runs, so `prepare` on a data box never
pays for importing the model code. `tokenizer`, `model-config`, `export` and `convert` are tools
with their own options.

A user's mistake ends in one line on stderr and a non-zero exit, never a traceback: every
deliberate error is a RegaError, and a file the operating system cannot open is named (absolute
path) with its reason. Anything else is a bug and keeps its traceback. The exit status follows one
rule (docs/pipeline.md "Exit status"; tests/test_cli_rules.py holds it):
  0    done;
  1    the run started and could not go on: a runtime failure (a non-finite loss, a full disk, a
       crashed rank, an unreadable device) or a bug;
  2    the command as given cannot run: usage, the configuration, or an input it names (missing,
       malformed, no usable row): fix it and run the same command again;
  130  interrupted (Ctrl-C);
  143  train stopped by SIGTERM after saving a checkpoint: run it again with --resume.
"""
from __future__ import annotations

import argparse
import difflib
import os
import runpy
import sys
import textwrap
from pathlib import Path

from .config import ALTERNATIVES, config_keys, load_config
from .errors import RegaError

# The operating system's refusals that come from a path the user gave: bad input, exit 2.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                FileExistsError)
EXIT_INTERRUPTED = 130    # 128 + SIGINT, what a shell reports for a Ctrl-C'd program
# What a job does when it is simply run again, for the --resume flag it does not take.
_RERUN = {
    "prepare": "prepare picks up an interrupted run by itself (complete shards are kept): run the "
               "same command again",
    "distill": "distill answers only the instructions that have no answer yet: run the same "
               "command again",
    "eval": "eval has nothing to resume: run the same command again",
}

JOBS = {
    "prepare": ("rega_engine.data.prepare", "prepare",
                "tokenize the REGA mixture into a memory-mapped dataset"),
    "train": ("rega_engine.train.loop", "train",
              "train on a prepared dataset (torchrun for several processes)"),
    "distill": ("rega_engine.distill", "distill",
                "self-distil general exemplars from the base model"),
    "eval": ("rega_engine.evaluate", "evaluate", "evaluate a checkpoint with the central prompt"),
}
# The config keys each job reads, for its --help: a section name stands for all its keys.
# tests/test_cli_tools.py holds this against the `config.<section>.<key>` reads in the jobs'
# modules.
READS = {
    "prepare": ("data", "roles", "model.path", "train.micro_batch_size", "train.grad_accum",
                "train.seed"),
    "train": ("model", "data.prepared", "data.seq_len", "data.kind_weights", "data.tokenizer",
              "data.verify", "train",
              "checkpoint", "lora", "parallel"),
    "distill": ("distill", "roles", "model.path", "model.dtype", "data.tokenizer", "data.general",
                "data.chat_template", "data.bad_rows", "train.threads", "train.progress",
                "train.progress_every_s"),
    "eval": ("eval", "roles", "model.dtype", "data.tokenizer", "data.chat_template",
             "data.bad_rows",
             "train.out_dir", "train.threads", "train.progress", "train.progress_every_s"),
}
TOOLS = {
    "tokenizer": "train a tokenizer on your text files (prints its vocabulary size and special "
                 "ids)",
    "model-config": "write a Llama config.json (tiny, 1b, 8b) for training a base model from "
                    "scratch",
    "export": "write a training checkpoint (any mesh) as a Hugging Face folder",
    "convert": "write a GGUF model as a Hugging Face folder (needs the gguf extra)",
}
OTHERS = {
    "demo": "the whole REGA pipeline on a bundled synthetic world (CPU, minutes)",
    "bench": "end-to-end training throughput against Hugging Face baselines",
}
COMMANDS = (*TOOLS, *JOBS, *OTHERS)


def keys_read(name: str) -> list[tuple[str, object, str]]:
    """[(dotted key, default, meaning)] of the keys job `name` reads, in config order."""
    reads = READS[name]
    return [(f"{section}.{key}", default, meaning) for section, keys in config_keys().items()
            for key, default, meaning in keys if section in reads or f"{section}.{key}" in reads]


def _toml(value) -> str:
    """A default as one would write it in the TOML file."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)   # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}"
                                for k, v in value.items()) + " }" if value else "{}"
    return repr(value)


def _keys_help(name: str) -> str:
    pairs = "; ".join(f"{a} / {b}" for a, b in ALTERNATIVES)
    # The epilog is printed as it is (RawDescriptionHelpFormatter): this paragraph is wrapped here.
    lines = [*textwrap.wrap("A --section.key=value override wins over the TOML file, also over the "
                            f"file's value of its alternative key ({pairs}: a run takes one of "
                            "each pair); two alternatives on the command line are refused.", 88),
             "",
             f"config keys {name} reads (in the TOML file, or --section.key=value), default and "
             "meaning:"]
    for key, default, meaning in keys_read(name):
        lines.append(f"  {key} = {_toml(default)}")
        lines.append(f"      {meaning}")
    return "\n".join(lines)


def _run_job(name: str, argv: list[str]) -> int:
    module_name, function_name, help_text = JOBS[name]
    # No abbreviations: "--con=x" must not silently mean --config.
    parser = argparse.ArgumentParser(prog=f"rega-engine {name}", description=help_text,
                                     allow_abbrev=False, epilog=_keys_help(name),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run configuration (TOML); its relative paths are "
                        "relative to its folder, those of --section.key=value overrides to the "
                        "working directory")
    if name == "train":   # only train resumes on request; the others resume by themselves
        parser.add_argument("--resume", action="store_true",
                            help="resume from the newest complete checkpoint in train.out_dir")
    if name == "prepare":
        parser.add_argument("--shard", metavar="I/N",
                            help="this process is I of N sharing the prepare (a job "
                            "array); under torchrun RANK/WORLD_SIZE say so instead")
    args, rest = parser.parse_known_args(argv)
    # --section.key=value, or a bare --section.key for a boolean switch (--train.overwrite)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    if "--resume" in unknown and name in _RERUN:
        parser.error(f"--resume is train's; {_RERUN[name]}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like "
                     "--train.lr=1e-4)")
    if getattr(args, "resume", False):
        overrides.append("--checkpoint.resume=true")
    config = load_config(args.config, overrides)
    if config.train.threads:   # train, distill and eval: torch's CPU threads, before any work
        import torch
        torch.set_num_threads(config.train.threads)
    module = __import__(module_name, fromlist=[function_name])
    kwargs = {"shard": args.shard} if name == "prepare" and args.shard else {}
    result = getattr(module, function_name)(config, **kwargs)
    return result if isinstance(result, int) else 0


def _run_bench(argv: list[str]) -> int:
    # The benchmark lives with the others in benchmarks/ of the source tree (editable installs).
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    if not script.is_file():
        print(f"rega-engine bench: {script} not found; the benchmarks ship with the source tree "
              "(git clone, then pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _usage(file=None) -> None:
    file = file or sys.stdout   # looked up now: tests and notebooks replace sys.stdout
    print("usage: rega-engine <command> [--config run.toml] [--section.key=value ...]\n", file=file)
    helps = {**TOOLS, **{name: help_text for name, (_, _, help_text) in JOBS.items()}, **OTHERS}
    for name in COMMANDS:
        print(f"  {name:<12} {helps[name]}", file=file)
    print("\nrega-engine <command> --help: its options (for a job: every config key it reads)",
          file=file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _usage()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"rega-engine: unknown command '{command}'{hint}\n", file=sys.stderr)
        _usage(sys.stderr)
        return 2
    try:
        if command == "tokenizer":
            from .tokenizer import main as tokenizer_main
            return tokenizer_main(rest, prog="rega-engine tokenizer")
        if command == "model-config":
            from .model.presets import main as model_config_main
            return model_config_main(rest)
        if command == "convert":
            from .convert import main as convert_main
            return convert_main(rest)
        if command == "export":
            from .export import main as export_main
            return export_main(rest)
        if command == "demo":
            from .demo.run import main as demo_main
            return demo_main(rest)
        if command == "bench":
            return _run_bench(rest)
        return _run_job(command, rest)
    except RegaError as e:
        return _fail(command, str(e), e.exit_code)
    except _PATH_ERRORS as e:
        return _fail(command, _os_error_text(e), 2)
    except OSError as e:
        if e.filename is None:   # not about a file we were given: a bug, keep the traceback
            raise
        return _fail(command, _os_error_text(e), 1)
    except KeyboardInterrupt:
        # Ctrl-C is the user's own doing: no traceback, and the status a shell expects of it.
        return _fail(command, "interrupted", EXIT_INTERRUPTED)


def _os_error_text(e: OSError) -> str:
    """"absolute path: reason" for the operating system's own errors; our own messages as they
    are."""
    if e.filename is not None and e.strerror:
        name = e.filename
        if isinstance(name, (str, bytes, os.PathLike)):
            name = os.path.abspath(os.fsdecode(name))
        return f"{name}: {e.strerror}"
    return str(e)


def _fail(command: str, message: str, code: int) -> int:
    # One line, whatever the message holds (third-party causes can span several).
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"rega-engine {command}: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
