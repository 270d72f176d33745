"""Tokenizer trainer, chat rendering with assistant-only masks, and `prepare` end to end."""
import json
import shutil

import numpy as np
import pytest
from tiny_tokenizer import CHATML, SAMPLE_DIR, tiny_tokenizer, tiny_tokenizer_dir

from rega_engine.batch import KIND_ID
from rega_engine.cli import main as cli_main
from rega_engine.config import ConfigError, RunConfig
from rega_engine.data.dataset import TokenDataset
from rega_engine.data.mixture import build_mixture
from rega_engine.data.prepare import prepare
from rega_engine.data.records import DataError
from rega_engine.data.render import ChatRenderer, RenderError, render, render_prompt
from rega_engine.tokenizer import train_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And the capital of Arden?"},
    {"role": "assistant", "content": "The capital of Arden is Lowmere.\nIt lies on a river."},
]
ROLE = "You are an expert in the law of Arden."


def target_runs(tokenizer, ids, mask):
    """The decoded text of each maximal run of loss tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# -- tokenizer -----------------------------------------------------------------------------------
def test_trained_tokenizer_is_deterministic_round_trips_and_splits_digits(tmp_path):
    text = (SAMPLE_DIR / "corpus.txt").read_text(encoding="utf-8")
    train_tokenizer([text], tmp_path / "again", vocab_size=1000, special_tokens=("<|im_start|>",
                                                                                 "<|im_end|>"))
    cached = open(tiny_tokenizer_dir() + "/tokenizer.json", "rb").read()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == cached
    tok = tiny_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert 300 < len(tok) <= 1000
    for s in ["What is 123 + 45?\nThe fine is 40 crowns.", "  two  spaces ",
              "héllo wörld 🙂\n\n\tx", "<0x41> x<s>"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    pieces = tok.convert_ids_to_tokens(tok.encode("fine 2024", add_special_tokens=False))
    assert pieces[-4:] == ["2", "0", "2", "4"]
    assert tok("fine").input_ids[0] == tok.bos_token_id
    assert tiny_tokenizer(CHATML).chat_template == CHATML


def test_tokenizer_command_line_and_too_small_vocabulary(tmp_path, capsys):
    from rega_engine.tokenizer import main

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    assert main([str(SAMPLE_DIR / "corpus.txt"), "--out", str(tmp_path / "tok"), "--vocab-size",
                 "600",
                 "--chat-template", str(template), "--special-token", "<|im_start|>",
                 "--special-token", "<|im_end|>"]) == 0
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 600 and tok.chat_template == CHATML
    assert tok.convert_tokens_to_ids("<|im_end|>") == 5
    with pytest.raises(ValueError, match=r"vocabulary size 100 is too small for this text: it "
                                         r"needs at least 269 "):
        train_tokenizer(["hello world"], tmp_path / "small", vocab_size=100)


# -- rendering -----------------------------------------------------------------------------------
def test_plain_template_masks_exactly_the_answers_and_their_eos():
    tok = tiny_tokenizer()
    ids, mask = render(tok, CHAT, ROLE)
    text = (f"<s>System: {ROLE}\n\nBe brief.\nUser: What is 12 + 30?\nAssistant: 12 + 30 = 42.</s>"
            "User: And the capital of Arden?\nAssistant: The capital of Arden is Lowmere.\nIt lies "
            "on a river.</s>")
    assert tok.decode(ids) == text
    # the same tokens as the tokenizer's own call
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert target_runs(tok, ids, mask) == [" 12 + 30 = 42.</s>",
                                           " The capital of Arden is Lowmere.\nIt lies on a "
                                           "river.</s>"]


def test_chat_template_masks_exactly_the_answers_and_the_end_of_turn_token():
    tok = tiny_tokenizer(CHATML)
    ids, mask = render(tok, CHAT, ROLE)
    assert tok.decode(ids).startswith(f"<|im_start|>system\n{ROLE}\n\nBe "
                                      "brief.<|im_end|>\n<|im_start|>user\n")
    assert target_runs(tok, ids, mask) == ["12 + 30 = 42.<|im_end|>",
                                           "The capital of Arden is Lowmere.\nIt lies on a "
                                           "river.<|im_end|>"]
    # "plain" overrides the tokenizer's template
    ids, mask = render(tok, CHAT, ROLE, template="plain")
    assert tok.decode(ids).startswith("<s>System: ")


@pytest.mark.parametrize("template", [None, CHATML], ids=["plain", "chatml"])
def test_prompt_rendering_is_the_training_prefix_up_to_each_answer(template):
    tok = tiny_tokenizer(template)
    renderer = ChatRenderer(tok)
    ids, mask = renderer.render(CHAT, ROLE)
    starts = [t for t in range(len(mask)) if mask[t] and not mask[t - 1]]
    assert len(starts) == 2
    for start, upto in zip(starts, (2, 4)):
        prompt = render_prompt(tok, CHAT[:upto], ROLE)
        assert ids[:start] == prompt
    # without a system prompt too
    ids, mask = renderer.render(CHAT[1:3], None)
    assert render_prompt(tok, CHAT[1:2], None) == ids[:mask.index(1)]


def test_tokenizers_without_offsets_are_rendered_piece_by_piece(monkeypatch):
    tok = tiny_tokenizer(CHATML)
    renderer = ChatRenderer(tok)
    monkeypatch.setattr(renderer, "_backend", None)
    monkeypatch.setattr(renderer, "_offsets", lambda text: None)   # as for a Python tokenizer
    ids, mask = renderer.render(CHAT, ROLE)
    assert target_runs(tok, ids, mask) == ["12 + 30 = 42.<|im_end|>",
                                           "The capital of Arden is Lowmere.\nIt lies on a "
                                           "river.<|im_end|>"]
    assert ids == render(tok, CHAT, ROLE)[0]   # cuts at "\n" and special tokens change nothing here


def test_unrenderable_conversations_raise_render_errors():
    tok = tiny_tokenizer()
    with pytest.raises(RenderError, match=r"a user turn contains the special token '</s>'") as info:
        render(tok, [{"role": "user", "content": "end</s>"}, {"role": "assistant",
                                                              "content": "ok"}], ROLE)
    assert info.value.reason == "special token in text"
    unstable = CHATML.replace("{{ m['content'] }}",
                              "{{ m['content'] }}{% if loop.last %}!{% endif %}")
    tok.chat_template = unstable
    with pytest.raises(RenderError, match=r"assistant turn 1 differently"):
        render(tok, CHAT, ROLE)
    with pytest.raises(ConfigError, match=r"data.chat_template = 'chatml'"):
        ChatRenderer(tok, "chatml")


# -- prepare -------------------------------------------------------------------------------------
def sample_config(tmp_path, **data) -> RunConfig:
    c = RunConfig()
    c.roles.central_prompt = "You are a helpful assistant."
    c.roles.prompts = {"law": ROLE,
                       "medicine": "You are a physician who knows the pharmacopoeia of Arden."}
    c.data.tokenizer = tiny_tokenizer_dir()
    c.data.general = str(SAMPLE_DIR / "general.jsonl")
    c.data.domains = {"law": str(SAMPLE_DIR / "law.jsonl"), "medicine": str(SAMPLE_DIR
                                                                            / "medicine.jsonl")}
    c.data.seq_len = 256
    c.data.workers = 2
    c.data.prepared = str(tmp_path / "prepared")
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


@pytest.mark.parametrize("template", [None, CHATML], ids=["plain", "chatml"])
def test_prepare_two_workers_writes_the_rendered_mixture(tmp_path, capsys, template):
    config = sample_config(tmp_path, tokenizer=tiny_tokenizer_dir(template))
    report = prepare(config)
    assert "samples per kind:" in capsys.readouterr().out
    data = TokenDataset(config.data.prepared)
    mixture = build_mixture(config)
    tok = tiny_tokenizer(template)
    renderer = ChatRenderer(tok)
    assert len(data) == len(mixture.samples) == report["samples"]["total"]
    for i, sample in enumerate(mixture.samples):
        ids, mask = data.sample(i)
        want_ids, want_mask = renderer.render(sample.messages, sample.system)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert data.kinds.tolist() == [s.kind for s in mixture.samples]
    assert data.domains.tolist() == [s.domain for s in mixture.samples]
    first = tok.decode(data.sample(0)[0])
    assert mixture.samples[0].messages[-1]["content"] in first
    assert mixture.samples[0].system in first
    assert (data.domain_names, data.pad_id, data.vocab_size, data.seq_len) == (
        ["general", "law", "medicine"], tok.pad_token_id, len(tok), 256)

    assert report["rows"][config.data.domains["law"]] == {"read": 82, "blank": 0, "kept": 82,
                                                          "rejected": 0}
    assert report["samples"]["kind"] == {"distilled": 138, "role": 160, "integration": 16,
                                         "pretrain": 0}
    assert report["samples"]["domain"] == {"general": 138, "law": 90, "medicine": 86}
    assert report["tokens"] == data.num_tokens
    assert report["loss_tokens"] == sum(int(s.loss_mask.sum()) for s in data.shards)
    assert report["truncated"] == report["dropped_too_long"] == report["dropped_no_loss"] == 0
    assert data.meta["report"]["tokens"] == report["tokens"]


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, capsys):
    one = sample_config(tmp_path, workers=1, prepared=str(tmp_path / "one"))
    two = sample_config(tmp_path, workers=2, prepared=str(tmp_path / "two"))
    prepare(one), prepare(two)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def tree_bytes(root) -> dict:
    """{relative path: contents} of every file under `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_too_long_truncate_drop_and_error(tmp_path, capsys):
    renderer = ChatRenderer(tiny_tokenizer())
    lengths = [len(renderer.render(s.messages,
        s.system)[0]) for s in build_mixture(sample_config(tmp_path)).samples]
    seq_len = int(np.percentile(lengths, 60))
    longer = sum(n > seq_len for n in lengths)
    assert 0 < longer < len(lengths)

    report = prepare(sample_config(tmp_path, seq_len=seq_len, too_long="truncate"))
    data = TokenDataset(tmp_path / "prepared")
    assert report["truncated"] == longer and len(data) == len(lengths) - report["dropped_no_loss"]
    assert data.lengths.max() == seq_len

    # the same output, another config: replacing a finished dataset takes data.overwrite
    report = prepare(sample_config(tmp_path, seq_len=seq_len, too_long="drop", overwrite=True))
    assert report["dropped_too_long"] == longer and report["truncated"] == 0
    assert len(TokenDataset(tmp_path / "prepared")) == len(lengths) - longer

    with pytest.raises(DataError,
        match=r"\.jsonl:\d+: the rendered sample has \d+ tokens, more than data.seq_len"):
        prepare(sample_config(tmp_path, seq_len=seq_len, too_long="error", prepared=str(tmp_path
                                                                                        / "err")))
    assert not (tmp_path / "err").exists()   # nothing half-written is left behind


def test_samples_without_loss_tokens_after_truncation_are_dropped_and_counted(tmp_path, capsys):
    # 24 tokens hold the system and user lines of most samples, not their answers.
    report = prepare(sample_config(tmp_path, seq_len=24))
    data = TokenDataset(tmp_path / "prepared")
    assert report["dropped_no_loss"] > 0
    assert report["samples"]["total"] == len(data) == 314 - report["dropped_no_loss"]
    assert all(data.sample(i)[1].any() for i in range(len(data)))
    assert f"without loss tokens {report['dropped_no_loss']}" in capsys.readouterr().out


def test_bad_rows_and_unrenderable_samples_are_reported(tmp_path, capsys):
    law = tmp_path / "law.jsonl"
    shutil.copy(SAMPLE_DIR / "law.jsonl", law)
    with open(law, "a") as f:
        f.write("not json\n\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                            "content": "a</s>"}],
                            "domain": "law"}) + "\n")
    config = sample_config(tmp_path, domains={"law": str(law)}, integration_fraction=0.0)
    config.roles.prompts.pop("medicine")
    report = prepare(config)
    assert report["rows"][str(law)] == {"read": 84, "blank": 1, "kept": 83, "rejected": 1}
    assert report["rows_rejected"] == {"bad JSON": 1}
    assert report["samples_unrenderable"] == {"special token in text": 1}
    assert report["samples"]["kind"]["role"] == 82
    config.data.bad_rows, config.data.overwrite = "error", True
    with pytest.raises(DataError, match=r"law.jsonl:83: invalid JSON"):
        prepare(config)


def test_tokenizer_errors_name_the_key(tmp_path):
    config = sample_config(tmp_path, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"data.tokenizer = '.*missing': no such directory"):
        prepare(config)
    config.data.tokenizer = ""
    config.model.path = str(tmp_path)
    with pytest.raises(ConfigError, match=r"model.path = .*: cannot load a tokenizer"):
        prepare(config)
    config.model.path = ""
    with pytest.raises(ConfigError, match=r"set data.tokenizer \(or model.path\)"):
        prepare(config)
    with pytest.raises(ConfigError, match=r"data.too_long = 'cut'"):
        prepare(sample_config(tmp_path, too_long="cut"))


def test_cli_prepare_with_overrides(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[roles.prompts]
law = "{ROLE}"
[data]
tokenizer = "{tiny_tokenizer_dir()}"
self_distillation = false
prepared = "{tmp_path / 'out'}"
[data.domains]
law = "{SAMPLE_DIR / 'law.jsonl'}"
""")
    assert cli_main(["prepare", "--config", str(toml), "--data.workers=1",
                     "--data.role_integration=false"]) == 0
    data = TokenDataset(tmp_path / "out")
    assert len(data) == 82 and set(data.kinds.tolist()) == {KIND_ID["role"]}
    assert "prepared" in capsys.readouterr().out


@pytest.mark.parametrize("template", [None, CHATML], ids=["plain", "chatml"])
def test_masks_from_span_edges_equal_masks_from_every_offset(tmp_path, template):
    """The fast path (char_to_token at each span's edges) marks exactly the tokens the offsets
    do."""
    tok = tiny_tokenizer(template)
    fast, slow = ChatRenderer(tok), ChatRenderer(tok)
    slow._fast_masks = False
    assert fast._fast_masks
    for sample in build_mixture(sample_config(tmp_path)).samples[::3]:
        for (a, b) in zip(fast.render_arrays(sample.messages, sample.system),
                          slow.render_arrays(sample.messages, sample.system)):
            np.testing.assert_array_equal(a, b)
