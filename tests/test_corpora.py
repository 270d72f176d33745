"""Text corpora next to chat data (data.corpora, .txt files; the pretrain kind in a domain of its
own), documents longer than seq_len split into rows, and data.sizes as shares of the tokens."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rega_engine.config import ConfigError, RunConfig
from rega_engine.data.dataset import TokenDataset
from rega_engine.data.loader import PackedLoader
from rega_engine.data.mixture import build_mixture
from rega_engine.data.prepare import prepare
from rega_engine.kinds import KIND_ID
from rega_engine.tokenizer import load_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "rega_engine" / "demo" / "sample"
LAW = "You are a lawyer."


def config_for(tmp_path: Path, **data) -> RunConfig:
    c = RunConfig()
    c.roles.central_prompt = "You are a helpful assistant."
    c.roles.prompts = {"law": LAW, "medicine": "You are a physician."}
    c.data.tokenizer = str(SAMPLE / "tokenizer")
    c.data.general = str(SAMPLE / "general.jsonl")
    c.data.domains = {"law": str(SAMPLE / "law.jsonl")}
    c.data.seq_len = 64
    c.data.workers = 1
    c.data.prepared = str(tmp_path / "prepared")
    for key, value in data.items():
        setattr(c.data, key, value)
    if "medicine" not in c.data.domains:   # a role prompt without rows is refused (a misspelling)
        del c.roles.prompts["medicine"]
    return c


def corpus_files(tmp_path: Path):
    text = (SAMPLE / "corpus.txt").read_text(encoding="utf-8")
    long_doc = " ".join(text.split())[:700]          # several rows of 64 tokens
    jsonl = tmp_path / "law_corpus.jsonl"
    jsonl.write_text(json.dumps({"text": long_doc}) + "\n"
                     + json.dumps({"text": "Short law note."}) + "\n"
                     + json.dumps({"messages": []}) + "\n")
    txt = tmp_path / "notes.txt"
    txt.write_text("First block\nstill first.\n\n\nSecond block.\n")
    return long_doc, str(jsonl), str(txt)


def test_a_domain_corpus_is_split_into_rows_trained_on_every_token(tmp_path, capsys):
    long_doc, jsonl, txt = corpus_files(tmp_path)
    tok = load_tokenizer(SAMPLE / "tokenizer")
    report = first = prepare(config_for(tmp_path, corpora={"law": [jsonl], "general": txt},
                                        txt_documents="blank_line"))
    # a chat row in a corpus is named
    assert report["rows_rejected"] == {"missing text": 1}
    assert report["rows"][txt] == {"read": 2, "blank": 2, "kept": 2, "rejected": 0}
    data = TokenDataset(tmp_path / "prepared")
    pretrain = np.flatnonzero(data.kinds == KIND_ID["pretrain"])
    doc_ids = [tok.bos_token_id, *tok(long_doc, add_special_tokens=False)["input_ids"],
               tok.eos_token_id]
    pieces = -(-len(doc_ids) // 64)
    assert pieces >= 3 and report["split_documents"] == 1 and report["document_pieces"] == pieces
    # the pieces, the short note, the two .txt blocks
    assert len(pretrain) == pieces + 1 + 2
    assert report["samples"]["kind"]["pretrain"] == 4
    # The pieces, in order, are the document: nothing cut off, nothing dropped, each at most a row.
    note = [tok.bos_token_id, *tok("Short law note.", add_special_tokens=False)["input_ids"],
            tok.eos_token_id]
    law_pieces = [data.sample(i) for i in pretrain if data.domains[i] == 1
                  and data.sample(i)[0].tolist() != note]
    assert all(len(ids) <= 64 for ids, _ in law_pieces)
    assert sum((ids.tolist() for ids, _ in law_pieces), []) == doc_ids
    assert all(mask[1:].all() for _, mask in law_pieces)               # loss on every token
    general = [tok.decode(data.sample(i)[0].tolist(), skip_special_tokens=True) for i in pretrain
               if data.domains[i] == 0]
    assert sorted(general) == ["First block\nstill first.", "Second block."]
    # Each piece is its own document in a packed row: it attends only to itself.
    batch = next(iter(PackedLoader(data, batch_size=len(data), prefetch=0, shuffle=False)))
    segments = np.diff(batch.cu_seqlens.numpy())
    assert sorted(segments.tolist()).count(64) >= pieces - 1

    # Asked for: documents follow data.too_long like chats.
    report = prepare(config_for(tmp_path, corpora={"law": jsonl}, split_documents=False,
                                too_long="drop", overwrite=True))
    # the chats longer than a row (truncated before) and the one long document
    assert report["dropped_too_long"] == first["truncated"] + 1 and report["split_documents"] == 0


def test_a_corpus_trains_after_its_role_prompt_when_asked(tmp_path):
    _, jsonl, _ = corpus_files(tmp_path)
    config = config_for(tmp_path, corpora={"law": jsonl}, corpus_prompt=True, seq_len=512)
    prepare(config)
    tok = load_tokenizer(SAMPLE / "tokenizer")
    data = TokenDataset(tmp_path / "prepared")
    (note,) = [i for i in np.flatnonzero(data.kinds == KIND_ID["pretrain"])
               if len(data.sample(i)[0]) < 40]
    ids, mask = data.sample(note)
    prompt = len(tok(f"{LAW}\n\n", add_special_tokens=False)["input_ids"])
    assert LAW in tok.decode(ids.tolist())
    assert mask[:1 + prompt].sum() == 0 and mask[1 + prompt:].all()   # no loss on the prompt


def test_corpus_settings_are_checked():
    from rega_engine.config import validate_config
    c = config_for(Path("/tmp"), corpora={"tax": "x.txt"})
    with pytest.raises(ConfigError, match=r"data.corpora.tax: no such domain"):
        validate_config(c)
    with pytest.raises(ConfigError, match=r"data.txt_documents = 'lines'"):
        validate_config(config_for(Path("/tmp"), txt_documents="lines"))
    with pytest.raises(ConfigError, match=r"mixes sample counts and token shares"):
        validate_config(config_for(Path("/tmp"), sizes={"law": "50%", "general": 10}))
    with pytest.raises(ConfigError, match=r"add up to 90.00%"):
        validate_config(config_for(Path("/tmp"), sizes={"law": "50%", "general": "40%"}))
    with pytest.raises(ConfigError, match=r"data.sizes.law = '5 0%'"):
        validate_config(config_for(Path("/tmp"), sizes={"law": "5 0%"}))


def test_token_shares_are_met_and_reported(tmp_path, capsys):
    long_doc, jsonl, _ = corpus_files(tmp_path)
    corpus = tmp_path / "big_corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Note {i}: the law of Arden says {i}."}) + "\n"
                              for i in range(60)))
    shares = {"law": "60%", "pretrain": "30%", "general": "10%"}
    config = config_for(tmp_path, corpora={"law": str(corpus)}, sizes=shares, seq_len=256)
    report = prepare(config)
    achieved = report["token_shares"]["achieved"]
    for source, share in shares.items():
        assert achieved[source] == pytest.approx(float(share[:-1]) / 100, abs=0.03), (source,
                                                                                      achieved)
    plan = report["token_shares"]["samples"]
    # law is upsampled (more samples than its 82 rows), general downsampled (fewer than its 138)
    assert plan["law"] > 82 and plan["general"] < 138
    assert report["samples"]["kind"]["role"] == plan["law"]
    assert "token shares (target -> achieved): " in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not for medicine"):
        build_mixture(config_for(tmp_path, domains={"law": str(SAMPLE / "law.jsonl"),
                                                    "medicine": str(SAMPLE / "medicine.jsonl")},
                                 sizes={"law": "90%", "general": "10%"}))


def test_a_mixture_keeps_where_its_rows_are_not_their_content(tmp_path):
    """The mixture's samples are references into the files (bounded memory per sample); their
    content, read again, is the row's."""
    _, jsonl, txt = corpus_files(tmp_path)
    (tmp_path / "whole.txt").write_bytes("Ein Dokument.\n\nZwei Absätze, eine Datei.\n".encode())
    mixture = build_mixture(config_for(tmp_path, corpora={"law": jsonl, "general": [txt,
        str(tmp_path / "whole.txt")]}))
    assert all(s._messages is None and s._text is None for s in mixture.samples)
    law = [json.loads(line) for line in open(SAMPLE / "law.jsonl")]
    for s in mixture.samples:
        if s.origin.startswith(str(SAMPLE / "law.jsonl")):
            assert list(s.messages) == law[s.line - 1]["messages"]
    texts = {s.text for s in mixture.samples if s.is_text}
    assert "Ein Dokument.\n\nZwei Absätze, eine Datei." in texts          # txt_documents = "file"
    assert "First block\nstill first.\n\n\nSecond block." in texts
    assert "Short law note." in texts


def test_a_txt_file_that_is_not_utf8_is_named_and_counted(tmp_path):
    from rega_engine.errors import DataError
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good block\n\nbad \xff byte\n")
    report = prepare(config_for(tmp_path, corpora={"law": str(bad)}, txt_documents="blank_line"))
    assert report["rows_rejected"] == {"bad text": 1} and report["samples"]["kind"]["pretrain"] == 1
    with pytest.raises(DataError, match=r"bad.txt:3: not valid UTF-8"):
        prepare(config_for(tmp_path, corpora={"law": str(bad)}, txt_documents="blank_line",
                           bad_rows="error", overwrite=True))
