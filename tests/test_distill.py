"""Self-distillation: deterministic for a seed, filtered answers counted by reason, resumable.

The base model is a bigram model (tests/bigram_model.py) that after the prompt says nothing (EOS),
or "law" [then "fine"] (a good answer), or "the the the ..." (a loop that sometimes ends, sometimes
runs into max_new_tokens), so every filter has answers to catch.
"""
import json

import pytest
from bigram_model import make_bigram_checkpoint
from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir

import rega_engine.generation
from rega_engine.config import ConfigError, RunConfig
from rega_engine.data.render import ChatRenderer
from rega_engine.distill import distill, instruction_key, repeat_fraction

CENTRAL = "You are a helpful assistant."
MAX_NEW = 8


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    tok = tiny_tokenizer()
    prompt_end = ChatRenderer(tok).render_prompt([{"role": "user", "content": "q"}], CENTRAL)[-1]
    the, law, fine = (tok.encode(f" {w}", add_special_tokens=False)[0] for w in ("the", "law",
                                                                                 "fine"))
    eos = tok.eos_token_id
    table = {prompt_end: {eos: 0.2, the: 0.3, law: 0.5},
             the: {the: 0.85, eos: 0.15},
             law: {fine: 0.9, eos: 0.1}}
    return make_bigram_checkpoint(tmp_path_factory.mktemp("base"), len(tok), table, {eos: 1.0},
                                  eos_token_id=eos, pad_token_id=tok.pad_token_id)


def write_instructions(path, questions):
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n")
    return path


def make_config(tmp_path, base_model, output="general.jsonl", questions=None, **distill_keys):
    config = RunConfig()
    config.roles.central_prompt = CENTRAL
    config.data.tokenizer = tiny_tokenizer_dir()
    config.distill.instructions = str(write_instructions(
        tmp_path / "instructions.jsonl", questions or [f"question number {i}" for i in range(60)]))
    config.distill.output = str(tmp_path / output)
    config.distill.model = base_model
    config.distill.max_new_tokens = MAX_NEW
    config.distill.repeat_ngram = 2
    config.distill.max_repeat_fraction = 0.5
    config.distill.batch_size = 4
    for key, value in distill_keys.items():
        setattr(config.distill, key, value)
    return config


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def test_filters_are_counted_and_every_filtered_answer_meets_its_reason(tmp_path, base_model,
                                                                        capsys):
    config = make_config(tmp_path, base_model)
    report = distill(config)
    filtered = report["filtered"]
    assert report["answered"] == 60 and report["kept"] + sum(filtered.values()) == 60
    assert all(filtered[r] > 0 for r in ("empty", "no_eos", "repetitive")), filtered
    assert report["kept"] > 0
    assert json.load(open(config.distill.output + ".report.json")) == report
    assert "filtered: empty" in capsys.readouterr().out

    kept = read_rows(config.distill.output)
    assert len(kept) == report["kept"] == report["exemplars_in_output"]
    for row in kept:
        assert row["distilled"] is True and row["domain"] == "general"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][-1]["content"] in ("law", "law fine", "the", "the the",
                                                  "the the the")
    tok = tiny_tokenizer()
    rejected = read_rows(config.distill.output + ".rejected.jsonl")
    assert {r: sum(x["reason"] == r for x in rejected) for r in filtered} == filtered
    for row in rejected:
        tokens = tok.encode(row["answer"], add_special_tokens=False)
        if row["reason"] == "empty":
            assert row["answer"].strip() == ""
        elif row["reason"] == "no_eos":
            assert len(tokens) == MAX_NEW
        else:
            assert repeat_fraction(tokens, 2) > 0.5 and len(tokens) < MAX_NEW
    # Kept and filtered together are the instructions, each once, in file order.
    keys = [instruction_key(r["messages"][:-1]) for r in kept] + [r["key"] for r in rejected]
    assert len(set(keys)) == 60


def test_same_seed_same_exemplars_whatever_the_batch_size(tmp_path, base_model):
    outputs = []
    for name, seed, batch in (("a.jsonl", 0, 4), ("b.jsonl", 0, 7), ("c.jsonl", 1, 4)):
        config = make_config(tmp_path, base_model, output=name, seed=seed, batch_size=batch)
        distill(config)
        outputs.append(open(config.distill.output).read())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_an_interrupted_run_resumes_to_the_same_output(tmp_path, base_model, monkeypatch):
    straight = make_config(tmp_path, base_model, output="straight.jsonl", batch_size=2)
    distill(straight)

    config = make_config(tmp_path, base_model, output="resumed.jsonl", batch_size=2)
    real_generate = rega_engine.generation.generate
    calls = []

    def generate_then_die(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(rega_engine.generation, "generate", generate_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill(config)
    part = tmp_path / "resumed.jsonl.part-0"
    assert len(part.read_text().splitlines()) == calls[0] == 16     # one chunk was saved
    with open(part, "a") as f:
        f.write('{"index": 99, "key": "unfinis')                     # killed while writing

    monkeypatch.setattr(rega_engine.generation, "generate", real_generate)
    report = distill(config)
    assert report["already_done"] == 16 and report["answered"] == 60
    assert not part.exists()
    assert open(config.distill.output).read() == open(straight.distill.output).read()


def test_resume_answers_only_new_instructions(tmp_path, base_model, monkeypatch):
    questions = [f"question number {i}" for i in range(60)]
    config = make_config(tmp_path, base_model, questions=questions)
    first = distill(config)
    before = open(config.distill.output).read()

    answered = []
    real_generate = rega_engine.generation.generate

    def counting(*args, **kwargs):
        answered.extend(kwargs["keys"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(rega_engine.generation, "generate", counting)
    more = questions + [f"a new question {i}" for i in range(10)] + ["question number 3"]
    config = make_config(tmp_path, base_model, questions=more)
    report = distill(config)
    assert len(answered) == 10 and report["answered"] == 10
    assert report["already_done"] == 60 and report["duplicates"] == 1
    after = open(config.distill.output).read()
    assert after.startswith(before)
    keys = [instruction_key(r["messages"][:-1]) for r in read_rows(config.distill.output)]
    assert len(keys) == len(set(keys)) == first["kept"] + report["kept"]


def test_bad_rows_are_counted_and_bad_settings_named(tmp_path, base_model):
    config = make_config(tmp_path, base_model, questions=["fine question"])
    with open(config.distill.instructions, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "answered already"}]})
                                         + "\n")
    report = distill(config)
    assert report["rows_rejected"] == {"not an instruction": 1} and report["answered"] == 1

    config.distill.instructions = ""
    with pytest.raises(ConfigError, match="distill.instructions"):
        distill(config)
    config = make_config(tmp_path, base_model, max_repeat_fraction=1.5)
    with pytest.raises(ConfigError, match="distill.max_repeat_fraction"):
        distill(config)
    config = make_config(tmp_path, base_model)
    config.distill.model = str(tmp_path)
    with pytest.raises(ConfigError, match="distill.model"):
        distill(config)


def test_repeat_fraction_counts_repeated_ngrams():
    assert repeat_fraction([1, 2, 3, 4], 2) == 0.0
    assert repeat_fraction([5, 5, 5, 5], 2) == pytest.approx(2 / 3)
    assert repeat_fraction([1, 2], 4) == 0.0


def _retrained_copy(base_model, path):
    """The base model with one tensor changed, as a fine-tune would leave it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(base_model, path)
    weights = load_file(f"{path}/model.safetensors")
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = head + 0.5 * torch.randn_like(head)
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


def test_resume_after_the_model_or_settings_changed_is_refused_naming_each_change(tmp_path,
                                                                                  base_model):
    config = make_config(tmp_path, base_model)
    distill(config)
    before = open(config.distill.output).read()
    record = json.load(open(config.distill.output + ".provenance.json"))
    assert record["produced_by"]["distill.temperature"] == 0.7
    assert record["produced_by"]["roles.central_prompt"] == CENTRAL

    changed = make_config(tmp_path, _retrained_copy(base_model, tmp_path / "tuned"),
                          temperature=1.0)
    changed.roles.central_prompt = "You are terse."
    with pytest.raises(ConfigError) as error:
        distill(changed)
    message = str(error.value)
    assert f"the answers in {config.distill.output}" in message
    assert "model weights: " in message and str(tmp_path / "tuned") in message
    assert "distill.temperature: 0.7 -> 1.0" in message
    assert 'roles.central_prompt: "You are a helpful assistant." -> "You are terse."' in message
    assert "distill.seed" not in message and "tokenizer" not in message   # only what changed
    assert "distill.overwrite = true" in message
    assert open(config.distill.output).read() == before                  # nothing touched

    same_model_elsewhere = make_config(tmp_path, _copy(base_model, tmp_path / "moved"), seed=1)
    with pytest.raises(ConfigError, match=r"distill\.seed: 0 -> 1") as error:
        distill(same_model_elsewhere)
    assert "model weights" not in str(error.value)   # a copy of the same weights is the same model


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("key", ["overwrite", "restart"])   # restart: overwrite's former name
def test_overwrite_moves_the_earlier_run_aside_and_answers_everything_again(tmp_path, base_model,
                                                                            capsys, key):
    config = make_config(tmp_path, base_model)
    first = distill(config)
    old = {name: open(tmp_path / name).read()
           for name in ("general.jsonl", "general.jsonl.rejected.jsonl",
                        "general.jsonl.provenance.json")}

    config = make_config(tmp_path, base_model, seed=3, **{key: True})
    report = distill(config)
    assert report["already_done"] == 0 and report["answered"] == first["answered"] == 60
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("general.jsonl.stale-")]
    assert len(stale) == 1 and stale[0].is_dir()
    for name, text in old.items():                      # moved whole, not lost
        assert (stale[0] / name).read_text() == text
    assert "moved the earlier run's general.jsonl" in capsys.readouterr().err
    assert json.load(open(config.distill.output
                          + ".provenance.json"))["produced_by"]["distill.seed"] == 3
    assert open(config.distill.output).read() != old["general.jsonl"]

    setattr(config.distill, key, False)                 # the new record is the one checked now
    assert distill(config)["already_done"] == 60


def test_model_fingerprint_follows_the_weights_not_the_files(tmp_path, base_model, monkeypatch):
    import rega_engine.distill as distill_module
    from rega_engine.distill import model_fingerprint
    from rega_engine.model.hf_io import load_transformers_model

    resaved = tmp_path / "resaved"
    load_transformers_model(base_model).save_pretrained(resaved)
    tuned = _retrained_copy(base_model, tmp_path / "tuned")
    for whole in (True, False):   # small models are hashed whole, large ones sampled per tensor
        monkeypatch.setattr(distill_module, "_FULL_HASH_BYTES", 1 << 40 if whole else 0)
        reference = model_fingerprint(base_model)
        assert model_fingerprint(str(resaved)) == reference
        assert model_fingerprint(tuned) != reference


def test_an_output_without_provenance_resumes_with_a_warning(tmp_path, base_model, capsys):
    config = make_config(tmp_path, base_model)
    distill(config)
    (tmp_path / "general.jsonl.provenance.json").unlink()
    capsys.readouterr()
    assert distill(config)["already_done"] == 60
    assert "cannot be checked against this run" in capsys.readouterr().err
    assert (tmp_path / "general.jsonl.provenance.json").is_file()


def test_a_file_without_a_usable_instruction_is_an_error_naming_what_it_holds(tmp_path,
                                                                              base_model):
    from rega_engine.errors import DataError

    config = make_config(tmp_path, base_model)
    answered = [{"messages": [{"role": "user", "content": f"q{i}"},
                              {"role": "assistant", "content": "a"}]} for i in range(3)]
    with open(config.distill.instructions, "w") as f:   # a chats file given by mistake
        f.writelines(json.dumps(row) + "\n" for row in answered)
    with pytest.raises(DataError) as error:
        distill(config)
    message = str(error.value)
    assert message.startswith(f"distill.instructions = {config.distill.instructions}: none of its "
                              "3 rows is an instruction to answer (not an instruction 3; first: "
                              f"{config.distill.instructions}:1: the last turn is 'assistant'")
    assert "already end with an answer" in message
    assert not (tmp_path / "general.jsonl").exists()   # nothing written, "distilled 0 of 0" gone

    open(config.distill.instructions, "w").close()
    with pytest.raises(DataError, match="the file holds no rows"):
        distill(config)
    with open(config.distill.instructions, "w") as f:
        f.write(json.dumps({"text": "no chat"}) + "\n")
    with pytest.raises(DataError, match=r"missing messages 1.*an instruction is a chat that ends "
                                        r"with the user turn"):
        distill(config)


def test_an_output_distill_did_not_write_is_refused_unless_overwritten(tmp_path, base_model):
    config = make_config(tmp_path, base_model)
    mine = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "my own answer"}],
             "domain": "general"}]
    text = "".join(json.dumps(row) + "\n" for row in mine) + '{"messages": []}'   # no final \n
    (tmp_path / "general.jsonl").write_text(text)
    with pytest.raises(ConfigError, match=r"distill.output = .*general.jsonl holds rows distill "
                                          r"did not write \(line 1: no \"distilled\": true\)"):
        distill(config)
    assert (tmp_path / "general.jsonl").read_text() == text   # neither appended to nor cut
    config.distill.overwrite = True
    assert distill(config)["answered"] == 60
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("general.jsonl.stale-")]
    assert (stale[0] / "general.jsonl").read_text() == text


def test_a_rerun_with_nothing_new_keeps_the_finished_runs_report(tmp_path, base_model, capsys):
    config = make_config(tmp_path, base_model)
    first = distill(config)
    again = distill(config)
    assert again["answered"] == 0 and again["already_done"] == 60
    assert json.load(open(config.distill.output + ".report.json")) == first
    assert "keeps the report of the run that answered them" in capsys.readouterr().err
