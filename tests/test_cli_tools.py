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
    # too small a vocabulary is the user's to fix: one line saying the least that works, exit 2
    assert main(["tokenizer", str(SAMPLE / "corpus.txt"), "--out", str(tmp_path / "t2"),
                 "--vocab-size", "10"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("rega-engine")] == [
        "rega-engine tokenizer: vocabulary size 10 is too small for this text: it needs at least "
        "329 (256 byte pieces, 5 special pieces and the text's 68 distinct characters); give a "
        "vocabulary of at least 329 (--vocab-size 329)"]
    assert "character_coverage" not in err and "trainer_interface" not in err
    with pytest.raises(SystemExit) as exited:
        main(["tokenizer", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t3")])
    assert exited.value.code == 2
    assert f"{tmp_path / 'missing.txt'}: file not found" in capsys.readouterr().err


def test_the_least_vocabulary_the_tokenizer_names_is_the_least_sentencepiece_takes(tmp_path,
                                                                                   monkeypatch):
    import rega_engine.tokenizer as tokenizer

    text = "Grüße, 12 cows.\nÇa va?\tyes"
    least = tokenizer.minimum_vocab_size(text.split("\n"), ["<|im_start|>"])
    tokenizer.train_tokenizer([text], tmp_path / "a", least, special_tokens=["<|im_start|>"])
    # one below: SentencePiece itself refuses (our check off), and its refusal reads as ours
    monkeypatch.setattr(tokenizer, "minimum_vocab_size", lambda *args: 0)
    with pytest.raises(ValueError, match=rf"too small for this text: it needs at least {least} "):
        tokenizer.train_tokenizer([text], tmp_path / "b", least - 1,
                                  special_tokens=["<|im_start|>"])


def test_tokenizer_reads_the_text_of_a_jsonl_file_not_its_json(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "How many cows graze here?"},
                          {"role": "assistant", "content": "Twelve cows graze here."}],
             "domain": "law"},
            {"text": "Cows graze in the meadow."}, [1, 2], {"other": "field"}]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n\n")
    assert main(["tokenizer", str(chats), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "400"]) == 0
    out = capsys.readouterr().out
    assert (f"read {chats}: 3 messages of 1 chats, 1 text rows; 3 lines without text skipped "
            "(first: line 3: not a JSON object)") in out
    from transformers import AutoTokenizer
    vocab = AutoTokenizer.from_pretrained(tmp_path / "tok").get_vocab()
    # trained on what the messages say, not on the JSON around them
    assert not any(piece in vocab for piece in ('{"', '":', "role", "content", "messages"))
    assert "▁graze" in vocab and "▁cows" in vocab
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": 1}\n')
    assert main(["tokenizer", str(empty), "--out", str(tmp_path / "t2")]) == 2
    assert f"{empty}: no text in it" in capsys.readouterr().err


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
