"""`rega-engine <prepare|train|distill|eval|demo|bench>`.

Every subcommand that runs a job takes `--config run.toml` plus any number of `--section.key=value`
overrides; each stage's module is imported only when its subcommand runs, so `prepare` on a data
box never pays for importing the model code.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data.records import DataError
from .errors import TrainingError

JOBS = {
    "prepare": ("rega_engine.data.prepare", "prepare", "tokenize the REGA mixture into a memory-mapped dataset"),
    "train": ("rega_engine.train.loop", "train", "train on a prepared dataset (torchrun for several processes)"),
    "distill": ("rega_engine.distill", "distill", "self-distil general exemplars from the base model"),
    "eval": ("rega_engine.evaluate", "evaluate", "evaluate a checkpoint with the central prompt"),
}


def _run_job(name: str, argv: list[str]) -> int:
    module_name, function_name, help_text = JOBS[name]
    parser = argparse.ArgumentParser(prog=f"rega-engine {name}", description=help_text)
    parser.add_argument("--config", help="run configuration (TOML)")
    parser.add_argument("--resume", action="store_true", help="train: resume from the newest checkpoint")
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like --train.lr=1e-4)")
    if args.resume:
        overrides.append("--checkpoint.resume=true")
    config = load_config(args.config, overrides)
    module = __import__(module_name, fromlist=[function_name])
    result = getattr(module, function_name)(config)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = [*JOBS, "demo", "bench"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: rega-engine <command> [--config run.toml] [--section.key=value ...]\n")
        for name, (_, _, help_text) in JOBS.items():
            print(f"  {name:<8} {help_text}")
        print(f"  {'demo':<8} the whole REGA pipeline on a bundled synthetic world (CPU, minutes)")
        print(f"  {'bench':<8} end-to-end training throughput against Hugging Face baselines")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "demo":
            from .demo.run import main as demo_main
            return demo_main(rest)
        if command == "bench":
            return _run_bench(rest)
        return _run_job(command, rest)
    except (ConfigError, DataError) as e:
        print(f"rega-engine {command}: {e}", file=sys.stderr)
        return 2
    except (TrainingError, FileNotFoundError) as e:
        print(f"rega-engine {command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
