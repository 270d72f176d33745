"""The demo's numbers over seeds: per-answer analysis, spreads, verdicts decided on them, the table
and the plot. Pure Python (matplotlib only for the plot), so the verdict logic is tested on
synthetic per-seed results without training anything.

A seed's results are {model: {set: metrics}}, metrics as `analyse_set` returns them. Over seeds,
every number becomes a spread: mean, min, max, standard deviation and the per-seed values.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .world import GENERAL, GENERAL_ONLY_SKILL, GENERAL_SKILLS, content, convention

# Verdict statuses. A claim is met or not; a comparison of two models is a win, a tie or a loss,
# decided on the paired per-seed differences.
OK, NOT_MET, WIN, TIE, LOSS, ONE_SEED = "ok", "NOT MET", "win", "tie", "loss", "one seed"
KEEP_SHARE = 0.9       # "keeps the general skills": every seed at least 90% of its base model's
FORGET_SHARE = 0.8     # "forgets them": every seed below 80% of its base model's


# -- one seed ------------------------------------------------------------------------------------
def analyse_set(world, name: str, examples, predictions, loss=None, perplexity=None) -> dict:
    """Exact match, content match (the answer with every domain's framing stripped, against the
    reference's content) and which convention the answers carry, overall and per kind of
    question (`world.question_kind`).

    For the general set, `convention_leak` is the share of answers that carry a domain's
    convention; for a domain, `confusion` is the share in another domain's convention and
    `unframed` the share in none (the general one)."""
    rows = []
    for example, p in zip(examples, predictions):
        text = p["prediction"]
        rows.append({"kind": world.question_kind(example),
                     "exact": bool(p["correct"]),
                     "content": content(text) == content(example.answer),
                     "convention": convention(text)})
    return summarise(name, rows, loss, perplexity)


def summarise(name: str, rows: list[dict], loss=None, perplexity=None) -> dict:
    """A set's metrics from its judged answers, each {"kind", "exact", "content", "convention"}
    (`convention`: the domain whose convention the answer carries, "general" for none)."""
    n = len(rows)

    def share(flag, subset=None):
        subset = rows if subset is None else subset
        return sum(flag(r) for r in subset) / len(subset) if subset else 0.0

    metrics = {"samples": n, "exact_match": share(lambda r: r["exact"]),
               "content_match": share(lambda r: r["content"]), "loss": loss,
               "perplexity": perplexity}
    if name == GENERAL:
        metrics["convention_leak"] = share(lambda r: r["convention"] != GENERAL)
    else:
        metrics["confusion"] = share(lambda r: r["convention"] not in (GENERAL, name))
        metrics["unframed"] = share(lambda r: r["convention"] == GENERAL)
    kinds = sorted({r["kind"] for r in rows})
    metrics["by_kind"] = {k: share(lambda r: r["exact"], [r for r in rows if r["kind"] == k])
                          for k in kinds}
    metrics["content_by_kind"] = {k: share(lambda r: r["content"], [r for r in rows if r["kind"]
                                                                    == k])
                                  for k in kinds}
    return metrics


# -- over seeds ----------------------------------------------------------------------------------
def spread(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def metric(per_seed: list[dict], model: str, set_name: str, key: str,
           kind: str | None = None) -> list[float]:
    """The per-seed values of one number; `kind` reads `key` ("by_kind" or "content_by_kind")
    at that kind of question, averaged over the sets when `set_name` is "domains"."""
    out = []
    for results in per_seed:
        sets = [s for s in results[model] if s != GENERAL] if set_name == "domains" else [set_name]
        values = [results[model][s][key][kind] if kind else results[model][s][key] for s in sets
                  if not kind or kind in results[model][s][key]]
        out.append(statistics.fmean(values) if values else float("nan"))
    return out


SUMMARY_KEYS = ("exact_match", "content_match", "perplexity", "convention_leak", "confusion",
                "unframed")


def aggregate(per_seed: list[dict]) -> dict:
    """{model: {set: {key: spread}, ...}} over the seeds, plus each set's per-kind exact and
    content match as spreads."""
    summary = {}
    for model, sets in per_seed[0].items():
        summary[model] = {}
        for set_name, m in sets.items():
            entry = {k: spread(metric(per_seed, model, set_name, k)) for k in SUMMARY_KEYS
                     if m.get(k) is not None}
            for key in ("by_kind", "content_by_kind"):
                entry[key] = {kind: spread(metric(per_seed, model, set_name, key,
                                                  kind)) for kind in m[key]}
            summary[model][set_name] = entry
    return summary


def paired(a: list[float], b: list[float], higher_is_better: bool = True) -> tuple[str,
                                                                                   list[float]]:
    """Win when a beats b in every seed, loss when b beats a in every seed, tie otherwise (the
    differences straddle zero, or one of them is zero); one seed decides nothing."""
    diffs = [x - y if higher_is_better else y - x for x, y in zip(a, b)]
    if len(diffs) < 2:
        return ONE_SEED, diffs
    if all(d > 0 for d in diffs):
        return WIN, diffs
    if all(d < 0 for d in diffs):
        return LOSS, diffs
    return TIE, diffs


def _pct(values) -> str:
    s = spread(values)
    if len(values) == 1:
        return f"{100 * s['mean']:.1f}%"
    return f"{100 * s['mean']:.1f}% ({100 * s['min']:.1f}-{100 * s['max']:.1f})"


def _pts(diffs) -> str:
    return ", ".join(f"{100 * d:+.1f}" for d in diffs) + " pts"


def comparison(per_seed: list[dict], label: str, a_name: str, b_name: str, set_name: str,
               key: str, kind: str | None = None, higher_is_better: bool = True,
               what: str = "exact match") -> dict | None:
    """Model a against model b on one number, decided on the paired per-seed differences
    (`paired`): {"status", "claim", "values"}, or None where a seed lacks a model or the number."""
    if any(a_name not in r or b_name not in r for r in per_seed):
        return None
    a = metric(per_seed, a_name, set_name, key, kind)
    b = metric(per_seed, b_name, set_name, key, kind)
    if any(math.isnan(v) for v in a + b):
        return None
    status, diffs = paired(a, b, higher_is_better)
    a_label, b_label = NAMES.get(a_name, a_name), NAMES.get(b_name, b_name)
    head = {WIN: f"{a_label} beats {b_label} {label}",
            LOSS: f"{b_label} beats {a_label} {label}",
            TIE: f"{a_label} and {b_label} tie {label}",
            ONE_SEED: f"{a_label} vs {b_label} {label}: one seed, no spread to decide on",
            }[status]
    rule = {WIN: "better in every seed", LOSS: "worse in every seed",
            TIE: "the per-seed differences straddle zero or are zero",
            ONE_SEED: "rerun with --seeds 3"}[status]
    return {"status": status,
            "claim": f"{head}: {what} {_pct(a)} vs {_pct(b)}, paired differences {_pts(diffs)} "
                     f"({rule})",
            "values": {"diffs": diffs}}


def verdicts(per_seed: list[dict], domains, general_only_kind: str = GENERAL_ONLY_SKILL,
             general_only_what: str = "a general computation") -> list[dict]:
    """The claims, each decided on all seeds: {"status", "claim", "values"}.
    `general_only_kind`: the kind of domain question that needs `general_only_what`, a skill
    only the general data teaches."""
    n = len(per_seed)
    base = metric(per_seed, "base", GENERAL, "exact_match")
    out = []

    def add(status, claim, **values):
        out.append({"status": status, "claim": claim, "values": values})

    rega = metric(per_seed, "rega", GENERAL, "exact_match")
    ratios = [r / b if b else 0.0 for r, b in zip(rega, base)]
    add(OK if min(ratios) >= KEEP_SHARE else NOT_MET,
        f"REGA keeps the general skills: its worst seed keeps {min(ratios):.0%} of its base "
        f"model's general exact match (REGA {_pct(rega)}, base {_pct(base)}; needed "
        f"{KEEP_SHARE:.0%} in every seed)",
        ratios=ratios)
    std = metric(per_seed, "standard", GENERAL, "exact_match")
    ratios = [s / b if b else 1.0 for s, b in zip(std, base)]
    add(OK if max(ratios) < FORGET_SHARE else NOT_MET,
        f"standard fine-tuning loses them: its best seed keeps {max(ratios):.0%} of the base "
        "model's "
        f"general exact match ({_pct(std)}; below {FORGET_SHARE:.0%} in every seed)", ratios=ratios)

    def compare(*args, **kwargs):
        check = comparison(per_seed, *args, **kwargs)
        if check is not None:
            out.append(check)

    for d in domains:
        compare(f"in {d}", "rega", "standard", d, "exact_match")
    compare(f"on the domain questions that need {general_only_what} ({general_only_kind}, never "
            "in the domain data)", "rega", "standard", "domains", "by_kind", general_only_kind)
    compare("on inter-domain confusion (domain answers in the other domain's convention)",
            "rega", "standard", "domains", "confusion", higher_is_better=False, what="confusion")
    compare("on inter-domain confusion: what role prompts add", "rega", "no_roles", "domains",
            "confusion", higher_is_better=False, what="confusion")
    if n < 2:
        add(ONE_SEED,
            "one seed: every comparison above is undecided; the default (--seeds 3) decides them")
    return out


NAMES = {"base": "base model", "standard": "standard FT", "rega": "REGA",
         "no_distill": "REGA - self-distillation", "no_roles": "REGA - role prompts",
         "no_integration": "REGA - role integration"}


# -- the table -----------------------------------------------------------------------------------
def _cell(s: dict, width: int = 18) -> str:
    if len(s["values"]) == 1:
        return f"{100 * s['mean']:>{width}.1f}"
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.0f}-{100 * s['max']:.0f})".rjust(width)


def _rows(summary, labels, width, columns, cell: int = 18) -> list[str]:
    """One line per model; columns are (header, getter(model summary) -> spread or None)."""
    lines = [f"{'':<{width}}" + "".join(h.rjust(cell) for h, _ in columns)]
    for name, sets in summary.items():
        cells = []
        for _, get in columns:
            s = get(sets)
            cells.append(_cell(s, cell) if s is not None else "-".rjust(cell))
        lines.append(f"{labels[name]:<{width}}" + "".join(cells))
    return lines


def format_results(summary: dict, labels: dict, domains, seeds) -> str:
    width = max(len(label) for label in labels.values()) + 2
    sets = [GENERAL, *domains]
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else (
        f"mean (min-max) over seeds {', '.join(map(str, seeds))}")
    lines = [f"exact match (%) under the central prompt, {seeds_text}"]
    lines += _rows(summary, labels, width, [(s, lambda m, s=s: m[s]["exact_match"]) for s in sets])
    lines += ["",
        "forgetting or contamination? content match (%): the answer with any domain's sign-off "
              "stripped; leak: general answers carrying a domain's sign-off"]
    lines += _rows(summary, labels, width,
                   [(f"{s} content", lambda m, s=s: m[s]["content_match"]) for s in sets]
                   + [("general leak", lambda m: m[GENERAL].get("convention_leak"))])
    lines += ["",
              "inter-domain confusion (%): a domain's answers in the other domain's convention; "
              "unframed: in none"]
    lines += _rows(summary, labels, width,
                   [(f"{d} confusion", lambda m, d=d: m[d].get("confusion")) for d in domains]
                   + [(f"{d} unframed", lambda m, d=d: m[d].get("unframed")) for d in domains])
    lines += ["", "general skills, content match (%):"]
    lines += _rows(summary, labels, width,
                   [(k, lambda m, k=k: m[GENERAL]["content_by_kind"].get(k))
                    for k in GENERAL_SKILLS])
    kinds = sorted({k for sets in summary.values() for d in domains for k in sets[d]["by_kind"]})
    lines += ["", "domain questions by kind, exact match (%), averaged over the domains "
              f"({GENERAL_ONLY_SKILL} and newcomers are never in the domain data: they need the "
              "general skills):"]

    def by_kind(m, k):
        values = [m[d]["by_kind"][k]["values"] for d in domains if k in m[d]["by_kind"]]
        return spread([statistics.fmean(v) for v in zip(*values)]) if values else None
    lines += _rows(summary, labels, width, [(k, lambda m, k=k: by_kind(m, k)) for k in kinds],
                   cell=20)
    lines += ["", "perplexity of the reference answers (mean over seeds):",
              f"{'':<{width}}" + "".join(f"{s:>14}" for s in sets)]
    for name, m in summary.items():
        lines.append(f"{labels[name]:<{width}}" + "".join(
            f"{_ppl(m[s]['perplexity']['mean']):>14}" if "perplexity" in m[s] else f"{'-':>14}"
            for s in sets))
    return "\n".join(lines)


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.1e}"


def format_verdicts(checks: list[dict]) -> str:
    return "\n".join(f"  [{c['status']}] {c['claim']}" for c in checks)


# -- the plot ------------------------------------------------------------------------------------
def plot(summary: dict, labels: dict, domains, seeds, path: Path, title: str) -> None:
    """Exact match per model and set (bars: mean, whiskers: min-max over seeds), and next to it
    the content match and the confusion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [GENERAL, *domains]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})

    def bars(ax, series):
        width = 0.8 / len(series)
        for i, (label, get) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
            spreads = [get(summary[n]) for n in names]
            means = [100 * s["mean"] if s else 0.0 for s in spreads]
            low = [max(0.0, 100 * (s["mean"] - s["min"])) if s else 0.0 for s in spreads]
            high = [max(0.0, 100 * (s["max"] - s["mean"])) if s else 0.0 for s in spreads]
            b = ax.bar(xs, means, width, yerr=[low, high], capsize=2, label=label)
            ax.bar_label(b, fmt="%.0f", fontsize=6, padding=2)
        ax.set_xticks(range(len(names)), [labels[n].replace(" - ", "\n- ") for n in names],
                      fontsize=7)
        ax.set_ylim(0, 118)
        ax.legend(loc="upper center", ncol=len(series), fontsize=7)

    bars(axes[0], [(s, lambda m, s=s: m[s]["exact_match"]) for s in sets])
    axes[0].set_ylabel("exact match (%), central prompt")
    axes[0].set_title(title, fontsize=9)
    bars(axes[1], [("general content", lambda m: m[GENERAL]["content_match"]),
                   ("general leak", lambda m: m[GENERAL].get("convention_leak")),
                   ("domain confusion", lambda m: _mean_over(m, domains, "confusion"))])
    axes[1].set_ylabel("%")
    axes[1].set_title("forgetting (content) vs contamination (leak); confusion", fontsize=9)
    seeds_text = (f"seed {seeds[0]}" if len(seeds) == 1
                  else f"bars: mean, whiskers: min-max over {len(seeds)} seeds")
    fig.text(0.01, 0.01, seeds_text, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_over(m: dict, domains, key: str):
    values = [m[d][key]["values"] for d in domains if key in m[d]]
    return spread([statistics.fmean(v) for v in zip(*values)]) if values else None
