"""The tokenizer bundled for the smoke config is exactly what our trainer makes from the corpus."""
from pathlib import Path

from rega_engine.tokenizer import train_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "rega_engine" / "demo" / "sample"


def test_bundled_tokenizer_is_reproduced_from_the_bundled_corpus(tmp_path):
    texts = (SAMPLE / "corpus.txt").read_text(encoding="utf-8").splitlines()
    out = train_tokenizer(texts, tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (SAMPLE / "tokenizer" / name).read_bytes(), name


def test_load_tokenizer_loads_the_named_class_as_autotokenizer_would(tmp_path):
    """load_tokenizer takes the class tokenizer_config.json names without AutoTokenizer (whose
    imports pull in torch); the result is AutoTokenizer's, and a name that is no class falls
    back to AutoTokenizer."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from rega_engine.tokenizer import load_tokenizer

    text = "User: What is 12 + 30?\nAssistant: 42.</s> Lowmere"
    auto = AutoTokenizer.from_pretrained(SAMPLE / "tokenizer")
    ours = load_tokenizer(SAMPLE / "tokenizer")
    assert type(ours) is type(auto)
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (auto.bos_token, auto.eos_token,
                                                                 auto.pad_token)
    odd = shutil.copytree(SAMPLE / "tokenizer", tmp_path / "odd")
    config = json.loads((odd / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "NoSuchTokenizer"
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    fallback = load_tokenizer(odd)      # AutoTokenizer's answer, whatever it is
    assert fallback(text)["input_ids"] == auto(text)["input_ids"]
