"""The tokenizer bundled for the smoke config is exactly what our trainer makes from the corpus."""
from pathlib import Path

from rega_engine.tokenizer import train_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "rega_engine" / "demo" / "sample"


def test_bundled_tokenizer_is_reproduced_from_the_bundled_corpus(tmp_path):
    texts = (SAMPLE / "corpus.txt").read_text(encoding="utf-8").splitlines()
    out = train_tokenizer(texts, tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (SAMPLE / "tokenizer" / name).read_bytes(), name
