"""Every command on bad input, as a new user would give it: each case must end in one line on
stderr that names the culprit (the key, file or path), exit status 1 or 2, no traceback, and leave
nothing half-written behind (the case's directory is exactly as it was before the command).

The cases that were tracebacks before (broken JSON, TOML, safetensors, tokenizer files, a prepared
dataset read by the loader) run as real `python -m rega_engine.cli` processes, so that nothing but
the CLI stands between the error and the user. The others call `rega_engine.cli.main` in this
process (a subprocess costs seconds of imports each); there an escaping exception fails the test
just as a traceback would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rega_engine.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "rega_engine" / "demo" / "sample"
TINY_LLAMA = REPO / "configs" / "tiny_llama.json"

RUN_TOML = """
[model]
init_config = "{world}/model.json"

[roles]
central_prompt = "You are a helpful assistant."
prompts = {{ law = "You are an expert in the law of Arden.", medicine = "You are a physician." }}

[data]
tokenizer = "{sample}/tokenizer"
general = "{sample}/general.jsonl"
domains = {{ law = "{sample}/law.jsonl", medicine = "{sample}/medicine.jsonl" }}
sizes = {{ general = 12, law = 12, medicine = 12 }}
seq_len = 256
workers = 1
prepared = "{world}/prepared"

[train]
steps = 1
micro_batch_size = 2
device = "cpu"
progress = false
plot = false

[checkpoint]
export = false

[distill]
instructions = "{world}/instructions.jsonl"

[eval]
general = "{sample}/general.jsonl"
"""


@dataclass(frozen=True)
class World:
    """Good inputs, made once per module: a run config, a model config, a prepared dataset."""
    root: Path

    @property
    def toml(self) -> Path:
        return self.root / "run.toml"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def args(self, command: str, tmp: Path) -> list[str]:
        """`command` on the good config, with every output inside `tmp`."""
        outputs = [f"--train.out_dir={tmp / 'run'}", f"--eval.output={tmp / 'eval.json'}",
                   f"--distill.output={tmp / 'distilled.jsonl'}"]
        if command == "prepare":
            outputs.append(f"--data.prepared={tmp / 'prepared'}")
        return [command, "--config", str(self.toml), *outputs]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from rega_engine.config import load_config
    from rega_engine.data.prepare import prepare

    root = tmp_path_factory.mktemp("world")
    (root / "run.toml").write_text(RUN_TOML.format(world=root, sample=SAMPLE))
    shutil.copy(TINY_LLAMA, root / "model.json")
    instruction = {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}
    (root / "instructions.jsonl").write_text(json.dumps(instruction) + "\n")
    prepare(load_config(root / "run.toml"))
    return World(root)


# -- building bad inputs -------------------------------------------------------------------------
def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def model_json(**changes) -> str:
    config = json.loads(TINY_LLAMA.read_text())
    config.update(changes)
    return json.dumps({k: v for k, v in config.items() if v is not None})


def model_dir(tmp: Path, weights: bytes | None = None, config: str | None = None) -> Path:
    """A checkpoint directory: config.json, the bundled tokenizer's files, and `weights` as
    model.safetensors (absent when None)."""
    path = tmp / "model"
    shutil.copytree(SAMPLE / "tokenizer", path)
    write(path / "config.json", model_json() if config is None else config)
    if weights is not None:
        write(path / "model.safetensors", weights)
    return path


def safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save
    return save({"model.embed_tokens.weight": torch.zeros(1024, 128)})


def tokenizer_copy(tmp: Path, tokenizer_json: str | None = None) -> Path:
    path = tmp / "tokenizer"
    shutil.copytree(SAMPLE / "tokenizer", path)
    if tokenizer_json is not None:
        write(path / "tokenizer.json", tokenizer_json)
    return path


def prepared_copy(world: World, tmp: Path) -> Path:
    path = tmp / "prepared-copy"
    shutil.copytree(world.prepared, path)
    return path


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


# -- the cases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable      # (world, tmp) -> (argv, culprit: a substring the error line must hold)
    in_subprocess: bool


CASES: list[Case] = []


def case(in_subprocess: bool = False):
    def register(build):
        CASES.append(Case(build.__name__, build, in_subprocess))
        return build
    return register


# Configuration: keys, sections, types, ranges, enums.
@case()
def unknown_key(w, tmp):
    return [*w.args("prepare", tmp), "--data.seq_lenn=4"], "did you mean 'data.seq_len'"


@case()
def unknown_section(w, tmp):
    toml = write(tmp / "run.toml", w.toml.read_text() + "\n[trian]\nsteps = 3\n")
    return ["train", "--config", str(toml)], "unknown section [trian]"


@case()
def wrong_type(w, tmp):
    return [*w.args("train", tmp), "--train.steps=many"], "'train.steps': expected int"


@case()
def seq_len_out_of_range(w, tmp):
    return [*w.args("prepare", tmp), "--data.seq_len=1"], "data.seq_len = 1"


@case()
def lr_out_of_range(w, tmp):
    return [*w.args("train", tmp), "--train.lr=0"], "train.lr = 0"


@case()
def integration_fraction_out_of_range(w, tmp):
    return [*w.args("prepare", tmp), "--data.integration_fraction=1.5"], "data.integration_fraction"


@case()
def workers_negative(w, tmp):
    return [*w.args("prepare", tmp), "--data.workers=-1"], "data.workers = -1"


@case()
def top_p_out_of_range(w, tmp):
    return [*w.args("distill", tmp), "--distill.top_p=0"], "distill.top_p = 0"


@case()
def eval_batch_size_zero(w, tmp):
    return [*w.args("eval", tmp), "--eval.batch_size=0"], "eval.batch_size = 0"


@case()
def sizes_of_an_unknown_source(w, tmp):
    return [*w.args("prepare", tmp), "--data.sizes={finance=3}"], "data.sizes.finance"


@case(in_subprocess=True)   # the case: a bare ValueError from the loader before
def kind_weight_negative(w, tmp):
    return [*w.args("train", tmp), "--data.kind_weights={distilled=-1.0}"], \
        "data.kind_weights.distilled = -1.0"


@case()
def kind_weight_of_an_unknown_kind(w, tmp):
    weights = "{distilled=1.0, role=1.0, integration=1.0, chitchat=1.0}"
    return [*w.args("prepare", tmp), f"--data.kind_weights={weights}"], "chitchat"


@case()
def kind_weight_missing(w, tmp):
    return [*w.args("train", tmp), "--data.kind_weights={distilled=1.0, role=1.0}"], \
        "no weight for integration"


@case()
def too_long_enum(w, tmp):
    return [*w.args("prepare", tmp), "--data.too_long=cut"], "data.too_long = 'cut'"


@case()
def attention_backend_enum(w, tmp):
    return [*w.args("train", tmp), "--model.attention_backend=trition"], \
        "model.attention_backend = 'trition'"


@case()
def chat_template_enum(w, tmp):
    return [*w.args("distill", tmp), "--data.chat_template=chatml"], "data.chat_template = 'chatml'"


# The config file itself.
@case()
def config_file_missing(w, tmp):
    return ["prepare", "--config", str(tmp / "nope.toml")], "nope.toml"


@case()
def config_path_is_a_directory(w, tmp):
    (tmp / "configs").mkdir()
    return ["train", "--config", str(tmp / "configs")], "configs is a directory"


@case(in_subprocess=True)
def toml_syntax_error(w, tmp):
    toml = write(tmp / "run.toml", w.toml.read_text().replace("steps = 1", "steps = = 1"))
    return ["train", "--config", str(toml)], "run.toml: invalid TOML"


@case(in_subprocess=True)
def toml_garbage_bytes(w, tmp):
    toml = write(tmp / "run.toml", b"\xff\xfe\x00[train]\x81\n")
    return ["train", "--config", str(toml)], "run.toml: not UTF-8"


@case()
def empty_toml_for_prepare(w, tmp):
    toml = write(tmp / "empty.toml", "")
    return ["prepare", "--config", str(toml)], "set data.tokenizer"


# CLI arguments.
@case()
def override_without_value(w, tmp):
    return [*w.args("train", tmp), "--train.lr"], "--train.lr"


@case()
def override_without_section(w, tmp):
    return [*w.args("train", tmp), "--lr=3e-4"], "--lr=3e-4"


# The model's config.json.
@case(in_subprocess=True)   # the case: two ConfigError classes before
def init_config_gpt2(w, tmp):
    bad = write(tmp / "bad.json", model_json(model_type="gpt2"))
    return [*w.args("train", tmp), f"--model.init_config={bad}"], "bad.json: model_type 'gpt2'"


@case(in_subprocess=True)   # the case: a bare JSONDecodeError before
def init_config_truncated(w, tmp):
    bad = write(tmp / "bad.json", model_json()[:150])
    return [*w.args("train", tmp), f"--model.init_config={bad}"], "bad.json:"


@case()
def init_config_missing_required_key(w, tmp):
    bad = write(tmp / "bad.json", model_json(vocab_size=None))
    return [*w.args("train", tmp), f"--model.init_config={bad}"], "'vocab_size'"


@case()
def init_config_wrong_type(w, tmp):
    bad = write(tmp / "bad.json", model_json(hidden_size="big"))
    return [*w.args("train", tmp), f"--model.init_config={bad}"], "hidden_size = 'big'"


@case()
def init_config_is_a_directory(w, tmp):
    (tmp / "configs").mkdir()
    return [*w.args("train", tmp), f"--model.init_config={tmp / 'configs'}"], str(tmp / "configs")


@case()
def init_config_missing(w, tmp):
    return [*w.args("train", tmp), f"--model.init_config={tmp / 'nope.json'}"], "nope.json"


# A checkpoint directory (model.path).
@case()
def model_path_without_weights(w, tmp):
    path = model_dir(tmp)
    return [*w.args("train", tmp), "--model.init_config=", f"--model.path={path}"], \
        "neither model.safetensors"


@case()
def model_path_without_config(w, tmp):
    path = model_dir(tmp, safetensors_bytes())
    (path / "config.json").unlink()
    return [*w.args("train", tmp), "--model.init_config=", f"--model.path={path}"], "config.json"


@case(in_subprocess=True)
def weights_truncated(w, tmp):
    path = model_dir(tmp, safetensors_bytes()[:-1000])
    return [*w.args("train", tmp), "--model.init_config=", f"--model.path={path}"], \
        "model.safetensors: not a readable safetensors file"


@case(in_subprocess=True)
def weights_garbage(w, tmp):
    path = model_dir(tmp, os.urandom(4096))
    return [*w.args("train", tmp), "--model.init_config=", f"--model.path={path}"], \
        "model.safetensors: not a readable safetensors file"


# The tokenizer.
@case()
def tokenizer_dir_missing(w, tmp):
    return [*w.args("prepare", tmp), f"--data.tokenizer={tmp / 'nope'}"], "data.tokenizer = "


@case()
def tokenizer_dir_empty(w, tmp):
    (tmp / "tokenizer").mkdir()
    return [*w.args("prepare", tmp), f"--data.tokenizer={tmp / 'tokenizer'}"], \
        f"{tmp / 'tokenizer'}': cannot load a tokenizer"


@case(in_subprocess=True)
def tokenizer_json_corrupted(w, tmp):
    path = tokenizer_copy(tmp, '{"version": "1.0", "truncation": nul')
    return [*w.args("prepare", tmp), f"--data.tokenizer={path}"], "tokenizer.json:1:"


# The JSONL data.
@case()
def data_file_missing(w, tmp):
    return [*w.args("prepare", tmp), f"--data.domains={{law = '{tmp / 'law.jsonl'}'}}",
            "--data.sizes={}"], "data.domains.law"


@case()
def data_path_is_a_directory(w, tmp):
    (tmp / "law").mkdir()
    return [*w.args("prepare", tmp), f"--data.domains={{law = '{tmp / 'law'}'}}",
            "--data.sizes={}"], "is a directory"


@case()
def bad_row_under_bad_rows_error(w, tmp):
    law = write(tmp / "law.jsonl", (SAMPLE / "law.jsonl").read_text() + "{not json\n")
    return [*w.args("prepare", tmp), f"--data.domains={{law = '{law}'}}", "--data.sizes={}",
            "--data.bad_rows=error"], "law.jsonl:83: invalid JSON"


@case()
def prepare_into_a_directory_that_is_not_a_dataset(w, tmp):
    write(tmp / "prepared" / "notes.txt", "mine")
    return w.args("prepare", tmp), "not a prepared dataset"


# The prepared dataset.
@case()
def prepared_dataset_missing(w, tmp):
    return [*w.args("train", tmp), f"--data.prepared={tmp / 'nope'}"], "data.prepared"


@case(in_subprocess=True)
def prepared_meta_truncated(w, tmp):
    path = prepared_copy(w, tmp)
    meta = path / "meta.json"
    meta.write_text(meta.read_text()[:200])
    return [*w.args("train", tmp), f"--data.prepared={path}"], "meta.json:"


@case()
def prepared_by_another_version(w, tmp):
    path = prepared_copy(w, tmp)
    edit_meta(path, format=99)
    return [*w.args("train", tmp), f"--data.prepared={path}"], "unknown dataset format 99"


@case()
def prepared_meta_kind_weight_negative(w, tmp):
    path = prepared_copy(w, tmp)
    edit_meta(path, kind_weights={"distilled": -1.0, "role": 1.0, "integration": 1.0})
    return [*w.args("train", tmp), f"--data.prepared={path}"], "meta.json: kind_weights.distilled"


@case()
def prepared_token_file_cut_short(w, tmp):
    path = prepared_copy(w, tmp)
    with open(path / "shard_00000" / "tokens.bin", "r+b") as f:   # prepare writes shards
        f.truncate(100)
    return [*w.args("train", tmp), f"--data.prepared={path}"], "tokens.bin: 100 bytes"


@case()
def vocab_mismatch(w, tmp):
    small = write(tmp / "small.json", model_json(vocab_size=512))
    return [*w.args("train", tmp), f"--model.init_config={small}"], "vocab_size is 512"


# eval and distill.
@case()
def eval_checkpoint_missing(w, tmp):
    return [*w.args("eval", tmp), f"--eval.checkpoint={tmp / 'nope'}"], "eval.checkpoint"


@case()
def eval_set_missing(w, tmp):
    path = model_dir(tmp, safetensors_bytes())
    return [*w.args("eval", tmp), f"--eval.checkpoint={path}",
            f"--eval.general={tmp / 'nope.jsonl'}"], "eval.general"


@case(in_subprocess=True)
def eval_checkpoint_config_truncated(w, tmp):
    path = model_dir(tmp, safetensors_bytes(), config=model_json()[:100])
    return [*w.args("eval", tmp), f"--eval.checkpoint={path}"], "config.json:"


@case()
def distill_instructions_missing(w, tmp):
    path = model_dir(tmp, safetensors_bytes())
    return [*w.args("distill", tmp), f"--distill.model={path}",
            f"--distill.instructions={tmp / 'nope.jsonl'}"], "distill.instructions"


@case()
def distill_model_without_config(w, tmp):
    (tmp / "model").mkdir()
    return [*w.args("distill", tmp), f"--distill.model={tmp / 'model'}"], "distill.model"


@case(in_subprocess=True)
def distill_model_weights_garbage(w, tmp):
    path = model_dir(tmp, os.urandom(4096))
    return [*w.args("distill", tmp), f"--distill.model={path}"], "model.safetensors"


# -- running them --------------------------------------------------------------------------------
def tree(root: Path) -> list[tuple[str, int]]:
    """Every file and directory under root with its size: what a command may not change."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                  for p in root.rglob("*"))


def run_in_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "rega_engine.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as e:    # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def test_there_are_at_least_30_kinds_of_bad_input():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_in_one_line_naming_the_culprit(bad, world, tmp_path, monkeypatch, capsys):
    argv, culprit = bad.build(world, tmp_path)
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)   # relative default paths (runs/...) land where they are watched
    if bad.in_subprocess:
        code, err = run_in_subprocess(argv, tmp_path)
    else:
        code, err = run_in_process(argv, capsys)
    assert "Traceback" not in err, err
    assert code in (1, 2), f"exit status {code}; stderr:\n{err}"
    lines = [line for line in err.splitlines() if culprit in line]
    assert lines, f"no line of stderr names {culprit!r}:\n{err}"
    assert lines[-1].startswith(f"rega-engine {argv[0]}"), err
    assert tree(tmp_path) == before, "the failed command left files behind"
