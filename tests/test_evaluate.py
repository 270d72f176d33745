"""Evaluation under the central prompt: exact match and perplexity on a bigram model whose greedy
answer and answer likelihoods are known in advance."""
import inspect
import json
import math

import pytest
import torch
from bigram_model import make_bigram_checkpoint
from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir

from rega_engine.cli import main as cli_main
from rega_engine.data.render import ChatRenderer
from rega_engine.evaluate import evaluate_model, normalize
from rega_engine.generation import generate, load_model

CENTRAL = "You are a helpful assistant."
ROLES = {"law": "You are an expert in the law of Arden."}


def chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    """A model that, after the prompt, says "law fine" greedily; the probabilities it gives each
    answer token are in `probs`."""
    tok = tiny_tokenizer()
    renderer = ChatRenderer(tok)
    prompt_end = renderer.render_prompt(chat("q", "x")[:-1], CENTRAL)[-1]
    ids, mask = renderer.render(chat("q", "law fine"), CENTRAL)
    law, fine, eos = [t for t, m in zip(ids, mask) if m]
    assert eos == tok.eos_token_id
    probs = {prompt_end: {law: 0.6, fine: 0.3, eos: 0.1},
             law: {fine: 0.7, eos: 0.2, law: 0.1},
             fine: {eos: 0.8, law: 0.1, fine: 0.1}}
    path = make_bigram_checkpoint(tmp_path_factory.mktemp("bigram"), len(tok), probs, {eos: 1.0},
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return {"path": path, "probs": probs, "ids": (prompt_end, law, fine, eos)}


def test_exact_match_and_perplexity_are_what_the_model_implies(bigram):
    p, law, fine, eos = bigram["ids"]
    P = bigram["probs"]
    sets = {"law": [chat("What is the fine?", "law fine"),          # the greedy answer
                    chat("And then?", "law"),
                    chat("Or?", "fine law")],
            "spaced": [chat("Which one?", "  law\n fine ")]}         # the same, other whitespace
    result = evaluate_model(bigram["path"], sets, central_prompt=CENTRAL,
                            tokenizer_dir=tiny_tokenizer_dir(),
                            max_new_tokens=6, batch_size=2, keep_predictions=True)
    m = result["central"]["law"]
    assert [x["prediction"] for x in m["predictions"]] == ["law fine"] * 3
    assert [x["correct"] for x in m["predictions"]] == [True, False, False]
    assert m["exact_match"] == pytest.approx(1 / 3) and m["correct"] == 1 and m["cut_off"] == 0
    assert result["central"]["spaced"]["exact_match"] == 1.0
    nll = [P[p][law], P[law][fine], P[fine][eos]] + [P[p][law], P[law][eos]] \
        + [P[p][fine], P[fine][law], P[law][eos]]
    expected = -sum(math.log(x) for x in nll) / len(nll)
    assert m["answer_tokens"] == len(nll)
    assert m["loss"] == pytest.approx(expected, rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert result["role"] == {}


def test_only_the_final_answer_is_scored_in_a_multi_turn_chat(bigram):
    p, law, fine, eos = bigram["ids"]
    P = bigram["probs"]
    two_turns = [*chat("first", "fine fine fine"), *chat("second", "law fine")]
    m = evaluate_model(bigram["path"], {"general": [two_turns]}, central_prompt=CENTRAL,
                       tokenizer_dir=tiny_tokenizer_dir(), max_new_tokens=6)["central"]["general"]
    assert m["exact_match"] == 1.0
    assert m["loss"] == pytest.approx(-(math.log(P[p][law]) + math.log(P[law][fine])
                                        + math.log(P[fine][eos])) / 3, rel=1e-4)


def test_central_prompt_only_unless_role_prompts_are_asked_for(bigram, monkeypatch):
    seen = []
    real_prompt, real_render = ChatRenderer.render_prompt, ChatRenderer.render

    def spy_prompt(self, messages, system):
        seen.append(system)
        return real_prompt(self, messages, system)

    def spy_render(self, messages, system):
        seen.append(system)
        return real_render(self, messages, system)

    monkeypatch.setattr(ChatRenderer, "render_prompt", spy_prompt)
    monkeypatch.setattr(ChatRenderer, "render", spy_render)
    sets = {"general": [chat("a", "law")], "law": [chat("b", "fine")]}
    evaluate_model(bigram["path"], sets, central_prompt=CENTRAL, tokenizer_dir=tiny_tokenizer_dir(),
                   max_new_tokens=4)
    assert seen and set(seen) == {CENTRAL}
    seen.clear()
    result = evaluate_model(bigram["path"], sets, central_prompt=CENTRAL, role_prompts=ROLES,
                            tokenizer_dir=tiny_tokenizer_dir(), max_new_tokens=4)
    assert set(seen) == {CENTRAL, ROLES["law"]}
    # the general set has no role prompt but the central one
    assert set(result["role"]) == {"law"}


def test_eval_command_writes_json_and_prints_the_table(bigram, tmp_path, capsys):
    general = tmp_path / "general.jsonl"
    law = tmp_path / "law.jsonl"
    general.write_text(json.dumps({"messages": chat("hi", "law fine")}) + "\n")
    law.write_text(json.dumps({"messages": chat("fine?", "law"), "domain": "law"}) + "\n"
                   + "not json\n")
    out = tmp_path / "eval.json"
    code = cli_main(["eval", f"--eval.checkpoint={bigram['path']}", f"--eval.general={general}",
                     f"--eval.domains={{law = '{law}'}}", f"--eval.output={out}",
                     f"--roles.central_prompt={CENTRAL!r}",
                     f"--roles.prompts={{law = '{ROLES['law']}'}}",
                     f"--data.tokenizer={tiny_tokenizer_dir()}", "--eval.role_prompts=true"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["central"]["general"]["exact_match"] == 1.0
    assert result["central"]["law"]["exact_match"] == 0.0
    assert result["central"]["law"]["samples"] == 1
    assert "law" in result["role"]
    printed = capsys.readouterr().out
    assert "under the central prompt" in printed and "100.0%" in printed


def test_eval_keeps_every_prediction_and_breaks_exact_match_down_by_tag(bigram, tmp_path, capsys):
    general = tmp_path / "general.jsonl"
    law = tmp_path / "law.jsonl"
    rows = [({"messages": chat("one", "law fine"), "tag": "add"}),        # right
            ({"messages": chat("two", "law"), "tag": "add"}),             # wrong
            ({"messages": chat("three", "law fine"), "tag": "sort"}),     # right
            ({"messages": [*chat("four", "fine"), *chat("five", "fine")]})]   # wrong, untagged
    general.write_text("".join(json.dumps(r) + "\n" for r in rows))
    law.write_text(json.dumps({"messages": chat("fine?", "law fine"), "domain": "law",
                               "tag": "fines"}) + "\n")
    out = tmp_path / "results" / "eval.json"
    code = cli_main(["eval", f"--eval.checkpoint={bigram['path']}", f"--eval.general={general}",
                     f"--eval.domains={{law = '{law}'}}", f"--eval.output={out}",
                     f"--roles.central_prompt={CENTRAL!r}",
                     f"--roles.prompts={{law = '{ROLES['law']}'}}",
                     f"--data.tokenizer={tiny_tokenizer_dir()}", "--eval.role_prompts=true"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["central"]["general"]["by_tag"] == {
        "(no tag)": {"samples": 1, "correct": 0, "exact_match": 0.0},
        "add": {"samples": 2, "correct": 1, "exact_match": 0.5},
        "sort": {"samples": 1, "correct": 1, "exact_match": 1.0}}
    assert result["role"]["law"]["by_tag"] == {"fines": {"samples": 1, "correct": 1,
                                                         "exact_match": 1.0}}
    assert "predictions" not in result["central"]["general"]   # eval.json: aggregates only

    predictions_file = tmp_path / "results" / "eval.predictions.jsonl"
    assert result["predictions"] == str(predictions_file)
    written = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert [(p["set"], p["under"]) for p in written] == [("general", "central")] * 4 + [
        ("law", "central"), ("law", "role")]
    first, fourth = written[0], written[3]
    assert first == {"set": "general", "under": "central", "system": CENTRAL, "prompt": "one",
                     "reference": "law fine", "prediction": "law fine", "correct": True,
                     "cut_off": False, "loss": first["loss"], "origin": f"{general}:1",
                     "tag": "add"}
    assert first["loss"] > 0
    assert [p["correct"] for p in written[:4]] == [True, False, True, False]
    assert fourth["prompt"] == "five" and fourth["history"] == chat("four",
                                                                    "fine") and "tag" not in fourth
    assert written[5]["system"] == ROLES["law"] and written[5]["tag"] == "fines"

    printed = capsys.readouterr().out
    table = printed[printed.index("exact match by tag"):].splitlines()
    assert [line.split()[:2] for line in table[3:]] == [["general", "(no"], ["general", "add"],
                                                        ["general", "sort"], ["law", "fines"]]
    assert "50.0%" in table[4] and table[6].split()[-2:] == ["100.0%", "100.0%"]   # central, role


def test_a_tag_that_is_not_a_string_is_named_with_its_line(bigram, tmp_path, capsys):
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"messages": chat("one", "law")}) + "\n"
                       + json.dumps({"messages": chat("two", "law"), "tag": 7}) + "\n")
    code = cli_main(["eval", f"--eval.checkpoint={bigram['path']}", f"--eval.general={general}",
                     f"--eval.output={tmp_path / 'eval.json'}",
                     f"--roles.central_prompt={CENTRAL!r}",
                     f"--data.tokenizer={tiny_tokenizer_dir()}"])
    assert code == 2
    assert f"{general}:2: 'tag' must be a non-empty string" in capsys.readouterr().err


def test_missing_eval_file_is_named(tmp_path, bigram):
    code = cli_main(["eval", f"--eval.checkpoint={bigram['path']}",
                     f"--eval.general={tmp_path / 'nope.jsonl'}"])
    assert code == 2


def test_normalize_collapses_whitespace():
    assert normalize("  a\n\tb  c ") == "a b c"


def test_generation_builds_no_autograd_graph_and_passes_the_cache_by_its_current_name(bigram):
    model, tokenizer = load_model(bigram["path"], device="cpu"), tiny_tokenizer()
    calls = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: calls.append((torch.is_grad_enabled(),
                                                                            set(kwargs))),
                                    with_kwargs=True)
    prompt = ChatRenderer(tokenizer).render_prompt(chat("q", "x")[:-1], CENTRAL)
    generate(model, tokenizer, [prompt], max_new_tokens=3)
    declared = inspect.signature(type(model).forward).parameters
    cache_name = "cache" if "cache" in declared else "past_key_values"
    assert len(calls) == 3     # the prompt, then one call per further token: "law fine" + end
    assert all(not grad and cache_name in names for grad, names in calls)
