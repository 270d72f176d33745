"""The real-model experiment's questions and judge (benchmarks/_real_world.py): a right answer is
one that names the expected word under the question's own convention; the held-out general items
and the domains' evaluation countries never reach the training data; and the comparison the
experiment adds to the demo's verdicts decides on paired differences. The experiment itself
(benchmarks/real_model_rega.py) is a benchmark of an hour or more, never run here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _real_world as world  # noqa: E402

from rega_engine.demo import report  # noqa: E402


def _question(domain: str, expected: str = "Paris") -> world.Question:
    return world.Question(domain, "capital", "France", "What is the capital of France?", expected,
                          expected)


@pytest.mark.parametrize("domain, answer, exact, content, convention", [
    ("general", "The capital of France is Paris.", True, True, "general"),
    ("general", "Paris. — Arden Legal Desk", False, True, "law"),          # leaked signature
    ("general", "The capital of France is Parisville.", False, False, "general"),
    ("law", "The capital of France is Paris. — Arden Legal Desk", True, True, "law"),
    ("law", "Paris. — arden health line", False, True, "medicine"),        # confusion
    ("law", "Paris. — Arden Legal Desk, Arden Health Line", False, True, "mixed"),
    ("medicine", "It is Lyon. — Arden Health Line", False, False, "medicine"),
])
def test_an_answer_is_right_when_it_names_the_word_under_its_own_convention(
        domain, answer, exact, content, convention):
    judged = world.judge(_question(domain), answer)
    assert (judged["exact"], judged["content"], judged["convention"]) == (exact, content,
                                                                          convention)


def test_the_held_out_items_never_reach_replay_or_domain_training():
    kept = world.general_questions()
    replay, held = world.split_general(kept, seed=3)
    replay_items = {(q.kind, q.item) for q in replay}
    held_items = {(q.kind, q.item) for q in held}
    assert replay_items and held_items and not replay_items & held_items
    assert len(replay) + len(held) == len(kept)
    countries = lambda qs: {q.item for q in qs if q.kind == "capital"}  # noqa: E731
    domains = world.Domains(3, sorted(countries(replay)), sorted(countries(held)))
    for d in world.DOMAINS:
        train, evaluation = domains.train(d), domains.evaluation(d)
        train_countries = {q.item for q in train if q.kind == world.GENERAL_IN_DOMAIN}
        eval_countries = {q.item for q in evaluation if q.kind == world.GENERAL_IN_DOMAIN}
        assert train_countries <= countries(replay) and eval_countries == countries(held)
        # The facts are asked at evaluation in words the training never used.
        assert not {q.prompt for q in train} & {q.prompt for q in evaluation}
        assert all(q.answer.endswith(world.SIGNATURE[d]) for q in train)
        assert all(world.judge(q, q.answer)["exact"] for q in train + evaluation)


def test_the_invented_facts_change_with_the_seed_and_only_with_it():
    a, b, again = (world.Domains(s, ["France"], ["Peru"]) for s in (0, 1, 0))
    assert a.fines == again.fines and a.uses == again.uses
    assert a.fines != b.fines


def test_a_comparison_is_decided_on_paired_differences():
    def seed(rega, standard):
        return {"rega": {"law": {"exact_match": rega}},
                "standard": {"law": {"exact_match": standard}}}

    win = report.comparison([seed(0.6, 0.5), seed(0.7, 0.6)], "in law", "rega", "standard", "law",
                            "exact_match")
    assert win["status"] == report.WIN and win["values"]["diffs"] == pytest.approx([0.1, 0.1])
    tie = report.comparison([seed(0.6, 0.5), seed(0.5, 0.6)], "in law", "rega", "standard", "law",
                            "exact_match")
    assert tie["status"] == report.TIE and "straddle zero" in tie["claim"]


def test_the_report_reads_every_variant_and_closes_with_the_cost():
    real = pytest.importorskip("real_model_rega")

    def judged(exact, convention):
        return {"kind": world.GENERAL_IN_DOMAIN, "exact": exact, "content": True,
                "convention": convention}

    def seed(offset):
        models = {}
        for i, name in enumerate(["base", *real.DEFAULT_VARIANTS]):
            models[name] = {s: report.summarise(s, [judged((i + offset) % 2 == 0, s)] * 4)
                            for s in (world.GENERAL, *world.DOMAINS)}
        cost = {name: {"steps": 10, "tokens": 2400, "seconds": 30.0, "tokens_per_s": 80.0}
                for name in real.DEFAULT_VARIANTS}
        return {"results": models, "cost": cost}

    per_seed = [seed(0), seed(1)]
    names = list(real.DEFAULT_VARIANTS)
    results = [p["results"] for p in per_seed]
    checks = real.checks_for(results, names)
    claims = [c["claim"] for c in checks]
    assert any("what role prompts add under central-prompt serving" in c for c in claims)
    assert any("what self-distillation adds" in c for c in claims)
    labels = {"base": "base model", **{n: n for n in names}}
    tables = real.format_tables(report.aggregate(results), labels, [0, 1])
    assert "law capital" in tables and "general leak" in tables
    cost = real.cost_summary(per_seed, names, parameters=1_000_000)
    # 6 x 1M parameters x 2400 tokens at 40% and 20% of 989 TFLOP/s
    assert cost["rega"]["h100_compute_floor_s"] == [round(6 * 2400e6 / (989e12 * m), 3)
                                                    for m in (0.4, 0.2)]
    assert "2400 tokens" in real.format_cost(cost, labels)


def test_a_run_without_rega_reports_no_verdicts():
    real = pytest.importorskip("real_model_rega")
    assert real.checks_for([{"base": {}, "standard": {}}], ["standard"]) == []
