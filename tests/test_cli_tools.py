"""The CLI's tools and help: `rega-engine tokenizer`, `rega-engine model-config`, unknown commands,
and `rega-engine <job> --help` listing every config key the job reads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rega_engine import cli
from rega_engine.cli import main
from rega_engine.config import config_keys

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "rega_engine" / "demo" / "sample"


def test_an_unknown_command_is_named_with_the_closest_one(capsys):
    assert main(["tokenzer", "corpus.txt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rega-engine: unknown command 'tokenzer'; did you mean 'tokenizer'?")
    assert "model-config" in err and "usage: rega-engine <command>" in err
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "did you mean" not in err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("tokenizer", "model-config", "prepare", "train", "distill", "eval", "demo",
                    "bench"):
        assert f"  {command} " in out


def test_tokenizer_command_prints_what_a_model_config_needs(tmp_path, capsys):
    assert main(["tokenizer", str(SAMPLE / "corpus.txt"), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "600"]) == 0
    out = capsys.readouterr().out
    assert (f"tokenizer written to {tmp_path / 'tok'}: vocabulary of 600 tokens "
            "(vocab_size 600)") in out
    assert "special tokens: bos <s> = 1, eos </s> = 2, pad <pad> = 3, unk <unk> = 0" in out
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 600
    # too small a vocabulary is the user's to fix: one line, exit 2, no traceback
    assert main(["tokenizer", str(SAMPLE / "corpus.txt"), "--out", str(tmp_path / "t2"),
                 "--vocab-size", "10"]) == 2
    assert "raise vocab_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["tokenizer", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t3")])
    assert exited.value.code == 2


@pytest.mark.parametrize("preset, parameters", [("tiny", None), ("1b", 1.236e9), ("8b", 8.030e9)])
def test_model_config_presets_load_in_rega_engine_and_transformers(tmp_path, capsys, preset,
                                                                   parameters):
    from transformers import AutoConfig

    from rega_engine.model import ModelArgs, from_config
    from rega_engine.model.presets import parameter_count
    out = tmp_path / "config.json"
    vocab = 128256 if parameters else 500
    assert main(["model-config", "--preset", preset, "--vocab-size", str(vocab), "--out",
                 str(out)]) == 0
    assert f"wrote {out}: Llama, preset {preset}" in capsys.readouterr().out
    config = json.loads(out.read_text())
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == vocab
    args = ModelArgs.from_hf_config(config)
    assert args.vocab_size == vocab
    if parameters:   # the shapes of Llama 3.2 1B and Llama 3.1 8B
        assert parameter_count(config) == pytest.approx(parameters, rel=1e-3)
    else:            # tiny is small enough to build here
        model = from_config(config, seed=0)
        assert sum(p.numel() for p in model.parameters()) == parameter_count(config)


def test_model_config_takes_vocabulary_and_ids_from_the_tokenizer(tmp_path, capsys):
    out = tmp_path / "model.json"
    tokenizer = SAMPLE / "tokenizer"
    assert main(["model-config", "--preset", "tiny", "--tokenizer", str(tokenizer), "--out",
                 str(out)]) == 0
    assert "special token ids: bos 1, eos 2, pad 3" in capsys.readouterr().out
    config = json.loads(out.read_text())
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"],
            config["pad_token_id"]) == \
        (1000, 1, 2, 3)
    assert main(["model-config", "--preset", "tiny", "--tokenizer", str(tokenizer), "--vocab-size",
                 "999",
                 "--out", str(out)]) == 2
    assert "--vocab-size 999 is below the 1000 ids" in capsys.readouterr().err


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_job_help_lists_every_key_it_reads_with_default_and_meaning(job, capsys):
    with pytest.raises(SystemExit) as exited:
        main([job, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    listed = cli.keys_read(job)
    assert listed, job
    for key, _, meaning in listed:
        assert re.search(rf"^  {re.escape(key)} = .+\n      {re.escape(meaning)}$", out, re.M), key
    if job == "train":
        assert '  train.epochs = 0.0\n      passes over the prepared data' in out
        assert "  model.init_config = \"\"" in out and "  train.threads = 0" in out
        assert "distill.temperature" not in out


# The modules each job runs; their `config.<section>.<key>` reads (direct or through an alias such
# as `t = config.train`, or a whole section handed on) must all be in the job's --help.
_MODULES = {
    "prepare": ["rega_engine/data/prepare.py", "rega_engine/data/mixture.py"],
    "train": ["rega_engine/train/loop.py"],
    "distill": ["rega_engine/distill.py"],
    "eval": ["rega_engine/evaluate.py"],
}


def _reads(source: str) -> set[str]:
    sections = set(config_keys())
    found = set(re.findall(r"\bconfig\.(\w+)\.(\w+)", source))
    reads = {f"{s}.{k}" for s, k in found if s in sections}
    for alias, section in re.findall(r"\b(\w+) = config\.(\w+)\s*$", source, re.M):
        if section in sections:
            reads |= {f"{section}.{k}" for k in re.findall(rf"\b{alias}\.(\w+)", source)
                      if k in {name for name, _, _ in config_keys()[section]}}
    for section in re.findall(r"\(config\.(\w+)[,)]", source):   # a whole section handed on
        if section in sections:
            reads |= {f"{section}.{k}" for k, _, _ in config_keys()[section]}
    return reads


@pytest.mark.parametrize("job", list(_MODULES))
def test_help_keys_cover_what_the_job_modules_read(job):
    listed = {key for key, _, _ in cli.keys_read(job)}
    read = set().union(*(_reads((REPO / m).read_text()) for m in _MODULES[job]))
    assert read, job
    assert read <= listed, f"{job} reads keys its --help does not list: {sorted(read - listed)}"


def test_train_threads_sets_torch_threads_for_every_job(tmp_path, monkeypatch):
    import torch
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    # the job fails at once on a missing dataset; the thread setting comes first
    assert main(["train", "--train.threads=1", f"--data.prepared={tmp_path / 'none'}"]) == 2
    assert main(["eval", "--train.threads=1", f"--train.out_dir={tmp_path / 'none'}"]) == 2
    assert calls[:2] == [1, 1]
