"""Data sources beyond one file per domain: `data.files` / `eval.files` (rows name their domain,
each file read and counted once) and `data.pretrain` (the `pretrain` kind: chats and plain text),
and datasets prepared before the pretrain kind existed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rega_engine.config import ConfigError, RunConfig, load_config
from rega_engine.errors import DataError
from rega_engine.kinds import KIND_ID, KINDS, check_kind_weights

SAMPLE = Path(__file__).resolve().parents[1] / "rega_engine" / "demo" / "sample"
CENTRAL = "You are a helpful assistant."
ROLES = {"law": "You are a lawyer.", "medicine": "You are a physician."}


def chat(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant",
                                                                 "content": answer}],
            **extra}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mixed_file(tmp_path: Path, law=6, medicine=4, general=3, untagged=1) -> str:
    rows = ([chat(f"law q{i}", f"law a{i}", domain="law") for i in range(law)]
            + [chat(f"med q{i}", f"med a{i}", domain="medicine") for i in range(medicine)]
            + [chat(f"gen q{i}", f"gen a{i}", domain="general",
                    distilled=True) for i in range(general)]
            + [chat(f"who q{i}", f"who a{i}") for i in range(untagged)])
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def config_for(tmp_path: Path, **data) -> RunConfig:
    c = RunConfig()
    c.roles.central_prompt = CENTRAL
    c.roles.prompts = dict(ROLES)
    c.data.tokenizer = str(SAMPLE / "tokenizer")
    c.data.seq_len = 128
    c.data.workers = 1
    c.data.prepared = str(tmp_path / "prepared")
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


# -- data.files ----------------------------------------------------------------------------------
def test_one_file_feeds_several_domains_and_every_row_is_counted_once(tmp_path):
    from rega_engine.data.mixture import build_mixture
    path = mixed_file(tmp_path)
    config = config_for(tmp_path, files=[path], integration_fraction=0.5)
    m = build_mixture(config)
    assert m.counts["kind"] == {"distilled": 3, "role": 10, "integration": 5, "pretrain": 0}
    assert m.counts["kind_domain"]["role/law"] == 6
    assert m.counts["kind_domain"]["role/medicine"] == 4
    role = [s for s in m.samples if s.kind == KIND_ID["role"]]
    assert {s.system for s in role if s.domain == 1} == {ROLES["law"]}
    assert {s.system for s in role if s.domain == 2} == {ROLES["medicine"]}
    # 14 rows, read once: 13 kept, the row without a domain rejected and counted
    assert m.rows.files == {path: {"read": 14, "blank": 0, "kept": 13, "rejected": 1}}
    assert dict(m.rows.rejected) == {"missing domain": 1}
    # data.sizes applies to a domain that only data.files holds
    config.data.sizes = {"law": 2}
    assert build_mixture(config).counts["kind_domain"]["role/law"] == 2


def test_a_row_of_data_files_without_a_domain_is_named(tmp_path):
    from rega_engine.data.mixture import build_mixture
    config = config_for(tmp_path, files=[mixed_file(tmp_path)], bad_rows="error")
    with pytest.raises(DataError,
                       match=r"mixed.jsonl:14: no 'domain' field: each row of data.files\[0\] "
                                        r"names its domain"):
        build_mixture(config)


def test_listing_a_mixed_file_under_one_domain_rejects_the_others_and_points_to_data_files(tmp_path,
                                                                                           capsys):
    from rega_engine.data.mixture import build_mixture
    path = mixed_file(tmp_path, general=0, untagged=0)
    config = config_for(tmp_path, domains={"law": path}, self_distillation=False)
    # medicine's rows were all in that file: the domain would train on nothing
    with pytest.raises(ConfigError, match=r"roles.prompts.medicine: no row of the data has domain "
                                          r"'medicine' where it counts: its 4 rows were skipped .*"
                                          r"a file holding several domains goes in data.files"):
        build_mixture(config)
    assert "a file holding several domains goes in data.files" in capsys.readouterr().err
    config.roles.prompts = {"law": ROLES["law"]}   # law alone: the other rows are unknown domains
    assert dict(build_mixture(config).rows.rejected) == {"unknown domain": 4}


def test_self_distillation_needs_general_rows_somewhere(tmp_path):
    from rega_engine.data.mixture import build_mixture
    config = config_for(tmp_path, files=[mixed_file(tmp_path, general=0, untagged=0)])
    with pytest.raises(ConfigError, match=r"no general exemplars.*\"domain\": \"general\""):
        build_mixture(config)
    config.data.self_distillation = False
    assert build_mixture(config).counts["kind"]["distilled"] == 0


def test_prepare_reports_a_mixed_file_once(tmp_path, capsys):
    from rega_engine.data.prepare import prepare
    path = mixed_file(tmp_path)
    report = prepare(config_for(tmp_path, files=[path]))
    out = capsys.readouterr().out
    assert f"  {path}: 14 (13 / 1 / 0)" in out
    assert report["rows"] == {path: {"read": 14, "blank": 0, "kept": 13, "rejected": 1}}
    # law: 6 role + 1 integration
    assert report["samples"]["domain"] == {"general": 3, "law": 7, "medicine": 4}


def test_eval_files_split_by_each_rows_domain(tmp_path):
    from rega_engine.evaluate import load_eval_sets
    path = mixed_file(tmp_path)
    config = RunConfig()
    config.roles.prompts = {"law": "L", "medicine": "M"}   # eval accepts the rows prepare does
    config.eval.files = [path]
    sets = load_eval_sets(config)
    assert list(sets) == ["general", "law", "medicine"]          # general first
    assert {name: len(items) for name, items in sets.items()} == {"general": 3, "law": 6,
                                                                  "medicine": 4}
    assert sets["law"][0].origin == f"{path}:1"
    config.data.bad_rows = "error"
    with pytest.raises(DataError,
                       match=r"mixed.jsonl:14: no 'domain' field: each row of eval.files\[0\]"):
        load_eval_sets(config)


# -- data.pretrain -------------------------------------------------------------------------------
def test_pretrain_rows_are_a_kind_of_their_own_text_trained_on_every_token(tmp_path, capsys):
    from rega_engine.data.dataset import TokenDataset
    from rega_engine.data.prepare import prepare
    from rega_engine.tokenizer import load_tokenizer
    pretrain = write_jsonl(tmp_path / "pretrain.jsonl", [
        {"text": "The capital of Eskel is Varn."}, chat("How much is 2 + 2?", "4."), {"text": "  "},
        {"text": "x", "messages": []}])
    # pretraining alone: no data.general needed, although self_distillation is on by default (and
    # the role table, for eval and the later stages, declares no data of its own here)
    report = prepare(config_for(tmp_path, pretrain=[pretrain]))
    out = capsys.readouterr().out
    assert "samples per kind:   distilled 0, role 0, integration 0, pretrain 2" in out
    assert report["rows_rejected"] == {"empty text": 1, "wrong type": 1}
    assert "one pass over the data = 1 micro-batches per rank = 1 optimizer steps" in out
    data = TokenDataset(tmp_path / "prepared")
    assert list(data.kinds) == [KIND_ID["pretrain"]] * 2 and list(data.domains) == [0, 0]
    tokenizer = load_tokenizer(SAMPLE / "tokenizer")
    texts = {tokenizer.decode(data.sample(i)[0].tolist()) for i in range(2)}
    text_ids = tokenizer("The capital of Eskel is Varn.", add_special_tokens=False)["input_ids"]
    expected = [tokenizer.bos_token_id, *text_ids, tokenizer.eos_token_id]
    found = [i for i in range(2) if data.sample(i)[0].tolist() == expected]
    assert found, texts
    ids, mask = data.sample(found[0])
    assert mask.tolist() == [0] + [1] * (len(ids) - 1)     # every token but the unpredictable first
    chat_ids, chat_mask = data.sample(1 - found[0])
    assert CENTRAL in tokenizer.decode(chat_ids.tolist())   # chats train under the central prompt
    assert 0 < chat_mask.sum() < len(chat_ids)              # on the answer only


def test_kind_weights_for_the_three_rega_kinds_still_hold():
    assert check_kind_weights({"distilled": 1, "role": 2, "integration": 0.5}) == {
        "distilled": 1.0, "role": 2.0, "integration": 0.5, "pretrain": 1.0}
    assert check_kind_weights({"distilled": 0, "role": 0, "integration": 0,
                               "pretrain": 2})["pretrain"] == 2.0
    with pytest.raises(ConfigError, match="every weight is 0"):
        check_kind_weights({"distilled": 0, "role": 0, "integration": 0})
    with pytest.raises(ConfigError, match="no weight for role"):
        load_config(None, ["--data.kind_weights={distilled=1.0, integration=1.0, pretrain=1.0}"])


def test_a_dataset_prepared_before_the_pretrain_kind_still_trains(tmp_path):
    from rega_engine.data.dataset import TokenDataset, TokenDatasetWriter
    from rega_engine.data.loader import PackedLoader
    with TokenDatasetWriter(tmp_path / "old", domains=["general"], kind_weights={}, pad_id=0,
                            vocab_size=50,
                            seq_len=16) as writer:
        for kind in range(3):
            writer.add(np.arange(1, 6), np.ones(5, bool), kind, 0)
    meta_path = tmp_path / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["kinds"] = ["distilled", "role", "integration"]        # as the earlier version wrote it
    meta["kind_weights"] = {"distilled": 1.0, "role": 2.0, "integration": 0.5}
    meta_path.write_text(json.dumps(meta))
    old = TokenDataset(tmp_path / "old")
    assert old.kind_weights == {"distilled": 1.0, "role": 2.0, "integration": 0.5, "pretrain": 1.0}
    batch = next(iter(PackedLoader(old, batch_size=1, prefetch=0)))
    assert set(batch.loss_weights[batch.labels != -100].tolist()) == {1.0, 2.0, 0.5}
    meta["kinds"] = ["role", "distilled", "integration"]        # not a prefix of KINDS: refused
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="kinds .* differ from this version's"):
        TokenDataset(tmp_path / "old")
    assert KINDS[:3] == ("distilled", "role", "integration")    # ids only ever appended
