"""The demo's verdicts are decided on spreads over seeds: checked here on synthetic per-seed
results (a clear win, a tie, a loss), without training anything."""
import random

import pytest

from rega_engine.demo import report
from rega_engine.demo.world import ConfusionWorld, World, content, convention

DOMAINS = ("lab", "shop")
MODELS = ("base", "standard", "rega", "no_distill", "no_roles", "no_integration")


def _metrics(name, exact, confusion=0.0, sort=None):
    m = {"samples": 100, "exact_match": exact, "content_match": exact, "loss": 0.1,
         "perplexity": 1.1,
         "by_kind": {"add": exact, "sort": exact if sort is None else sort},
         "content_by_kind": {"add": exact, "sort": exact if sort is None else sort}}
    if name == "general":
        m["convention_leak"] = 0.0
    else:
        m["confusion"], m["unframed"] = confusion, 0.0
    return m


def _seed(general, lab, shop, confusion=None, sort=None):
    """One seed's results; each argument maps a model to its number (missing models: 0.5)."""
    confusion, sort = confusion or {}, sort or {}
    return {model: {"general": _metrics("general", general.get(model, 0.5)),
                    "lab": _metrics("lab", lab.get(model, 0.5), confusion.get(model, 0.0),
                                    sort.get(model)),
                    "shop": _metrics("shop", shop.get(model, 0.5), confusion.get(model, 0.0),
                                     sort.get(model))}
            for model in MODELS}


def _by_claim(checks, words):
    found = [c for c in checks if all(w in c["claim"] for w in words)]
    assert len(found) == 1, (words, [c["claim"] for c in checks])
    return found[0]


def test_paired_rule_win_tie_loss_and_one_seed():
    assert report.paired([0.9, 0.8, 0.95], [0.85, 0.7, 0.9])[0] == report.WIN
    assert report.paired([0.9, 0.8, 0.95], [0.92, 0.7, 0.9])[0] == report.TIE      # straddles zero
    assert report.paired([0.9, 0.8, 0.9], [0.9, 0.7, 0.8])[0] == report.TIE        # one seed equal
    assert report.paired([0.5, 0.6, 0.7], [0.6, 0.7, 0.8])[0] == report.LOSS
    assert report.paired([0.2, 0.3], [0.1, 0.4], higher_is_better=False)[0] == report.TIE
    assert report.paired([0.1, 0.2], [0.3, 0.4], higher_is_better=False)[0] == report.WIN
    assert report.paired([0.9], [0.1])[0] == report.ONE_SEED


def test_verdicts_on_synthetic_seeds_a_clear_win_a_tie_and_a_loss():
    seeds = [
        _seed({"base": 0.95, "rega": 0.92, "standard": 0.0}, {"rega": 0.97, "standard": 0.90},
              {"rega": 0.95, "standard": 0.96}, sort={"rega": 0.8, "standard": 0.9}),
        _seed({"base": 0.93, "rega": 0.90, "standard": 0.1}, {"rega": 0.99, "standard": 0.95},
              {"rega": 0.97, "standard": 0.94}, sort={"rega": 0.7, "standard": 0.8}),
        _seed({"base": 0.97, "rega": 0.95, "standard": 0.0}, {"rega": 0.96, "standard": 0.93},
              {"rega": 0.95, "standard": 0.95}, sort={"rega": 0.6, "standard": 0.9}),
    ]
    checks = report.verdicts(seeds, DOMAINS)
    assert _by_claim(checks, ["keeps the general skills"])["status"] == report.OK
    assert _by_claim(checks, ["standard fine-tuning loses them"])["status"] == report.OK
    win = _by_claim(checks, ["in lab"])
    assert win["status"] == report.WIN and win["claim"].startswith("REGA beats standard FT in lab")
    tie = _by_claim(checks, ["in shop"])
    assert tie["status"] == report.TIE and "straddle zero" in tie["claim"]
    loss = _by_claim(checks, ["general computation"])
    assert loss["status"] == report.LOSS and loss["claim"].startswith("standard FT beats REGA")
    assert [round(d, 2) for d in loss["values"]["diffs"]] == [-0.1, -0.1, -0.3]


def test_one_bad_seed_is_enough_to_refuse_keeping_the_general_skills():
    good = _seed({"base": 0.95, "rega": 0.93, "standard": 0.0}, {}, {})
    bad = _seed({"base": 0.95, "rega": 0.80, "standard": 0.0}, {}, {})   # 84% of its base
    assert _by_claim(report.verdicts([good, good], DOMAINS),
                     ["keeps the general skills"])["status"] == report.OK
    assert _by_claim(report.verdicts([good, bad, good], DOMAINS),
                     ["keeps the general skills"])["status"] == report.NOT_MET
    # One standard-FT seed that keeps 90% of its base: "loses them" is not met.
    kept = _seed({"base": 0.95, "rega": 0.93, "standard": 0.86}, {}, {})
    assert _by_claim(report.verdicts([good, kept], DOMAINS),
                     ["loses them"])["status"] == report.NOT_MET


def test_confusion_verdict_lower_is_better():
    seeds = [_seed({"base": 0.9, "rega": 0.9}, {}, {}, confusion={"rega": 0.05, "standard": 0.2,
                                                                  "no_roles": 0.1}),
             _seed({"base": 0.9, "rega": 0.9}, {}, {}, confusion={"rega": 0.02, "standard": 0.3,
                                                                  "no_roles": 0.01})]
    checks = report.verdicts(seeds, DOMAINS)
    assert _by_claim(checks, ["confusion (domain answers"])["status"] == report.WIN
    assert _by_claim(checks, ["what role prompts add"])["status"] == report.TIE


def test_one_seed_decides_no_comparison():
    checks = report.verdicts([_seed({"base": 0.9, "rega": 0.9}, {"rega": 1.0, "standard": 0.0},
                                    {})], DOMAINS)
    assert _by_claim(checks, ["in lab"])["status"] == report.ONE_SEED


def test_spreads_table_and_aggregate():
    seeds = [_seed({"base": b}, {}, {}) for b in (0.9, 0.8, 1.0)]
    summary = report.aggregate(seeds)
    s = summary["base"]["general"]["exact_match"]
    assert (s["min"], s["max"], s["values"]) == (0.8, 1.0, [0.9, 0.8, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    labels = {m: m for m in MODELS}
    table = report.format_results(summary, labels, DOMAINS, [0, 1, 2])
    assert "90.0 (80-100)" in table and "mean (min-max) over seeds 0, 1, 2" in table


def test_analyse_set_tells_forgetting_from_contamination_and_confusion():
    world = World(0)
    general = world.examples("general", 4, "eval")
    # right content with a domain's sign-off; wrong content; right; right with a sign-off
    predictions = [f"{general[0].answer} noted", "zzz", general[2].answer,
                   f"{general[3].answer} thanks"]
    m = report.analyse_set(world, "general", general,
                           [{"prediction": p, "correct": p == e.answer} for p, e in zip(predictions,
                                                                                        general)])
    assert m["exact_match"] == 0.25 and m["content_match"] == 0.75 and m["convention_leak"] == 0.5
    lab = world.examples("lab", 4, "eval")
    answers = [lab[0].answer, lab[1].answer.replace("noted", "thanks"), content(lab[2].answer),
               lab[3].answer]
    m = report.analyse_set(world, "lab", lab,
                           [{"prediction": p, "correct": p == e.answer} for p, e in zip(answers,
                                                                                        lab)])
    assert m["exact_match"] == 0.5 and m["content_match"] == 1.0
    assert m["confusion"] == 0.25 and m["unframed"] == 0.25
    assert convention("7 thanks") == "shop" and convention("7") == "general"
    assert content("7 noted") == "7"


def test_confusion_world_tells_domains_apart_only_by_the_asker():
    world = ConfusionWorld(0)
    assert not set(world.askers["lab"]) & set(world.askers["shop"])
    for domain in DOMAINS:
        for e in world.examples(domain, 200, "train"):
            asker, rest = e.prompt.split(" asks : ")
            assert asker in world.askers[domain] and domain not in e.prompt.split()
            assert e.answer.endswith({"lab": " noted", "shop": " thanks"}[domain])
    # The same question in both domains, only the asker differs.
    rng = random.Random(3)
    lab = world.domain_example("lab", "add", random.Random(3))
    shop = world.domain_example("shop", "add", random.Random(3))
    assert lab.prompt.split(" asks : ")[1] == shop.prompt.split(" asks : ")[1]
    assert content(lab.answer) == content(shop.answer) and lab.answer != shop.answer
    del rng


def test_sweep_table_and_plot_from_synthetic_seeds(tmp_path):
    from rega_engine.demo.run import FULL, format_sweep, plot_sweep, sweep_points

    points = sweep_points(FULL)
    assert [(f, s) for f, s, _ in points] == [(0.0, 1.0), (0.05, 1.0), (0.1, 1.0), (0.25, 1.0),
                                              (0.5, 1.0),
                                              (0.5, 0.25), (0.5, 0.5)]
    # The points the main models already are reuse them.
    assert points[0][2] == "no_integration" and points[4][2] == "rega"
    per_seed = []
    for seed in range(2):
        results = {}
        for i, (_, _, name) in enumerate(points):
            value = 0.5 + 0.05 * i + 0.01 * seed
            results[name] = {s: _metrics(s, value) for s in ("general", *DOMAINS)}
        per_seed.append(results)
    table = format_sweep(per_seed, FULL)
    assert "0.05" in table and "50.5 (50-51)" in table
    assert len(table.splitlines()) == 2 + len(points)
    plot_sweep(per_seed, FULL, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
