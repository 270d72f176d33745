"""The demo's synthetic world: deterministic for a seed, domains told apart by their content,
answers right by construction, eval prompts held out of training."""
import json
import os

import pytest

from rega_engine.demo.world import (
    DOMAIN_SKILLS,
    DOMAINS,
    GENERAL,
    GENERAL_SKILLS,
    World,
    is_correct,
    write_jsonl,
)


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = World(3), World(3), World(4)
    for source in (GENERAL, *DOMAINS):
        assert a.examples(source, 50, "train") == b.examples(source, 50, "train")
    assert a.facts == b.facts
    assert a.examples(GENERAL, 50, "train") != c.examples(GENERAL, 50, "train")
    assert a.facts != c.facts
    assert a.corpus() == b.corpus()


def test_every_answer_is_right_by_construction():
    world = World(0)
    for source in (GENERAL, *DOMAINS):
        for split in ("train", "eval"):
            for example in world.examples(source, 300, split):
                assert is_correct(example, world.facts), example


def test_domains_are_told_apart_by_their_first_word_and_disagree_on_the_same_question():
    world = World(0)
    first_words = {source: {e.prompt.split()[0] for e in world.examples(source, 200, "train")}
                   for source in (GENERAL, *DOMAINS)}
    for domain in DOMAINS:
        assert first_words[domain] == {domain}
    assert not first_words[GENERAL] & set(DOMAINS)
    # The same question: three different answers (the confusion REGA fights).
    import random
    for skill in DOMAIN_SKILLS:
        answers = set()
        for source in (GENERAL, *DOMAINS):
            rng = random.Random(7)
            e = (world.general_example(skill, rng) if source == GENERAL
                 else world.domain_example(source, skill, rng))
            answers.add(e.answer)
        assert len(answers) == 1 + len(DOMAINS), (skill, answers)


def test_skills_are_balanced_and_eval_prompts_stay_out_of_training():
    world = World(1)
    train = world.examples(GENERAL, 500, "train")
    counts = {s: sum(e.skill == s for e in train) for s in GENERAL_SKILLS}
    assert set(counts.values()) == {100}
    procedural = ("sort", "max", "min")     # sums and facts are knowledge: eval asks them again
    eval_prompts = {e.prompt for e in world.examples(GENERAL, 200, "eval") if e.skill in procedural}
    assert eval_prompts and not eval_prompts & {e.prompt for e in train}
    for domain in DOMAINS:
        held = {e.prompt for e in world.examples(domain, 100, "eval") if e.skill in procedural}
        assert held and not held & {e.prompt for e in world.examples(domain, 600, "train")}


def test_domains_train_on_their_regulars_but_are_evaluated_on_everyone():
    world = World(2)
    assert set(world.regulars) | set(world.newcomers) == set(world.facts)
    assert not set(world.regulars) & set(world.newcomers) and len(world.regulars) == 12

    def asked(examples):
        return {w for e in examples if e.skill == "lookup" for w in e.prompt.split()
                if w in world.facts}

    for domain in DOMAINS:
        assert asked(world.examples(domain, 800, "train")) == set(world.regulars)
        assert asked(world.examples(domain, 800, "eval")) == set(world.facts)
    assert asked(world.examples(GENERAL, 800, "train")) == set(world.facts)


def test_jsonl_rows_are_chat_samples_or_instructions(tmp_path):
    world = World(0)
    examples = world.examples("lab", 3, "train")
    path = write_jsonl(tmp_path / "lab.jsonl", examples)
    rows = [json.loads(line) for line in open(path)]
    assert rows[0] == {"domain": "lab", "messages": [{"role": "user",
                                                      "content": examples[0].prompt},
                                                     {"role": "assistant",
                                                      "content": examples[0].answer}]}
    path = write_jsonl(tmp_path / "instr.jsonl", examples, with_answer=False)
    assert [m["role"] for m in json.loads(open(path).readline())["messages"]] == ["user"]


def test_unknown_skill_or_domain_is_refused():
    import random
    world = World(0)
    with pytest.raises(ValueError, match="known: add"):
        world.general_example("divide", random.Random(0))
    with pytest.raises(ValueError, match="known: lab"):
        world.domain_example("bank", "add", random.Random(0))


def test_smoke_demo_runs_every_stage_and_writes_rerunnable_configs(tmp_path, capsys):
    from rega_engine.config import load_config
    from rega_engine.demo.run import VARIANTS, main

    assert main(["--smoke", "--seeds", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    models = ["base", *(name for name, _, _ in VARIANTS)]
    assert results["seeds"] == [0] and list(results["per_seed"]["0"]) == models
    for name in models:
        for s in (GENERAL, *DOMAINS):
            metrics = results["per_seed"]["0"][name][s]
            assert 0.0 <= metrics["exact_match"] <= metrics["content_match"] <= 1.0
            assert metrics["perplexity"] >= 1.0
            spread = results["summary"][name][s]["exact_match"]
            assert spread["values"] == [metrics["exact_match"]] == [spread["min"]]
        assert 0.0 <= results["summary"][name][GENERAL]["convention_leak"]["mean"] <= 1.0
        assert 0.0 <= results["summary"][name]["lab"]["confusion"]["mean"] <= 1.0
    statuses = {c["status"] for c in results["checks"]}
    assert "one seed" in statuses and statuses <= {"ok", "NOT MET", "one seed"}
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    # Each printed command names a config that loads and points at what the demo made.
    commands = [line.split() for line in printed.splitlines()
                if line.strip().startswith("rega-engine ")]
    assert {c[1] for c in commands} == {"prepare", "train", "distill", "eval"}
    for command in commands:
        config = load_config(command[3])
        if command[1] == "train":
            assert os.path.isdir(os.path.join(config.train.out_dir, "hf"))
    seed_dir = tmp_path / "seed_0"
    rega = load_config(seed_dir / "configs" / "rega.toml")
    standard = load_config(seed_dir / "configs" / "standard.toml")
    assert (rega.data.self_distillation, rega.data.role_prompts,
            rega.data.role_integration) == (True,) * 3
    assert (standard.data.self_distillation, standard.data.role_prompts,
            standard.data.role_integration) == (False,) * 3
    assert "REGA" in printed and "per-seed time" in printed


FAKE_WORKER = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
seed, out = int(args[args.index("--seed") + 1]), Path(args[args.index("--out") + 1])
models = ["base", "standard", "rega", "no_distill", "no_roles", "no_integration"]
exact = {"base": 0.9, "standard": 0.1, "rega": 0.85 + 0.01 * seed}
def metrics(model, name):
    m = {"samples": 10, "exact_match": exact.get(model, 0.5), "content_match": 0.9, "loss": 0.1,
         "perplexity": 1.1, "by_kind": {"add": 0.5}, "content_by_kind": {"add": 0.5}}
    m.update({"convention_leak": 0.0} if name == "general" else {"confusion": 0.1, "unframed": 0.0})
    return m
results = {m: {s: metrics(m, s) for s in ("general", "lab", "shop")} for m in models}
print("[data] done in 0.0 s", flush=True)
out.mkdir(parents=True, exist_ok=True)
(out / "seed_results.json").write_text(json.dumps({"seed": seed, "results": results, "commands": [],
                                                    "timings_s": {"total": 0.1, "cpu": 0.1}}))
"""


def test_seeds_run_as_parallel_processes_and_are_reported_with_spreads(tmp_path, capsys,
                                                                       monkeypatch):
    """The orchestration of --seeds on a stand-in worker (no training): every seed's process
    runs, its stage lines are echoed, and the table and verdicts cover all seeds."""
    import sys

    from rega_engine.demo import run

    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    monkeypatch.setattr(run, "_worker_argv", lambda args, seed, out, threads:
                        [sys.executable, str(worker), "--seed", str(seed), "--out", str(out)])
    out = tmp_path / "demo"
    assert run.main(["--seeds", "3", "--seed", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"[seed {s}] [data] done" in printed for s in (4, 5, 6))
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [4, 5, 6]
    spread = results["summary"]["rega"]["general"]["exact_match"]
    assert [round(v, 2) for v in spread["values"]] == [0.89, 0.9, 0.91]
    checks = {c["claim"].split(":")[0]: c["status"] for c in results["checks"]}
    assert checks["REGA keeps the general skills"] == "ok"
    assert "mean (min-max) over seeds 4, 5, 6" in printed and "89.0 (89-91)" not in printed
    assert "90.0 (89-91)" in printed


def test_a_failing_seed_stops_the_demo_with_its_log(tmp_path, monkeypatch, capsys):
    import sys

    from rega_engine.demo import run

    monkeypatch.setattr(run, "_worker_argv", lambda args, seed, out, threads:
                        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(SystemExit) as stopped:
        run.main(["--seeds", "2", "--out", str(tmp_path)])
    assert stopped.value.code == 3
    assert "demo_log.txt" in capsys.readouterr().err
