"""Issue 27, part 2: domain exact match of the demo's standard fine-tuning against its steps.

For each seed, with the demo's own functions (rega_engine/demo/run.py) at its FULL sizes: the
synthetic world, its tokenizer, the base model (pretrained once per seed), self-distillation (the
standard variant does not use it, but its prepared data names the file), then the *standard FT*
variant fine-tuned at several settings (passes over its mixture, rows per optimizer step, peak
lr) and evaluated the demo's way (under the central prompt, `evaluate_one`). Also: a look at the
data the fine-tune gets (the first packed rows of the prepared mixture, decoded, with which
tokens carry loss), so that a masked or missing sign-off would show.

    .venv/bin/python benchmarks/demo_domain_curve.py --seeds 0 1 2 --threads 2
    .venv/bin/python benchmarks/demo_domain_curve.py --seeds 1 2 --settings default epochs8
    .venv/bin/python benchmarks/demo_domain_curve.py --summarise     # the table from the JSON

The base model of each seed is pretrained once and reused from --out on later runs; results are
merged into the JSON by seed and setting. `sign_off_probe`: teacher-forced probability of the own
and the other domain's sign-off word where it comes; `trained_skills`: exact match on the
domain questions of the skills the domain data trains (add, max, min, lookups of regulars).

Writes benchmarks/results/demo_domain_curve_cpu-2core.json (one process at a time; every
training runs in a child process with --threads torch threads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rega_engine.demo import run as demo  # noqa: E402
from rega_engine.demo.world import DOMAINS, GENERAL, make_world  # noqa: E402

# (name, passes over the mixture, rows per optimizer step, peak lr, min_lr_ratio, warmup share)
SETTINGS = {
    "default": (2, 4, 1e-3, 0.1, 0.05),          # the demo's FULL sizes
    "rows1": (2, 1, 1e-3, 0.1, 0.05),            # same tokens, 4x the optimizer steps
    "epochs8": (8, 4, 1e-3, 0.1, 0.05),          # 4x the tokens and steps
    "lr3e-3": (2, 4, 3e-3, 0.1, 0.05),           # same steps, 3x the lr
    "lr1e-2": (2, 4, 1e-2, 0.1, 0.05),
    "epochs4": (4, 4, 1e-3, 0.1, 0.05),
    "epochs6": (6, 4, 1e-3, 0.1, 0.05),
    "epochs4_lr2e-3": (4, 4, 2e-3, 0.1, 0.05),
    "epochs4_lr3e-3": (4, 4, 3e-3, 0.1, 0.05),
    "epochs3_lr3e-3": (3, 4, 3e-3, 0.1, 0.05),
    "epochs2_constlr": (2, 4, 1e-3, 1.0, 0.05),    # no decay: same steps, more late lr
}


def inspect_rows(prepared: str, tokenizer_dir: str, seq_len: int, rows: int, seed: int) -> dict:
    """The first packed batch of the prepared mixture: samples per row, label tokens per row, and
    the first few samples decoded with the loss-carrying tokens in [brackets]."""
    import torch
    from transformers import AutoTokenizer

    from rega_engine.data.loader import PackedLoader

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    loader = PackedLoader(prepared, seq_len=seq_len, batch_size=rows, seed=seed)
    batch = next(iter(loader))
    ids, labels, pos = batch.input_ids[0], batch.labels[0], batch.position_ids[0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
    samples = []
    for a, b in zip(starts[:6], starts[1:7]):
        pieces = []
        for i in range(a, b):
            # label at i is the token i+1 predicted from position i; show it on the target token
            piece = tok.convert_ids_to_tokens(int(ids[i]))
            loss_on = int(labels[i]) == int(ids[i])       # labels are unshifted (HF style)
            pieces.append(f"[{piece}]" if loss_on else piece)
        samples.append(" ".join(pieces))
    n_labels = int((batch.labels != -100).sum())
    sign_off_ids = {d: tok.convert_tokens_to_ids(tok.tokenize(" " + w))
                    for d, w in (("lab", "noted"), ("shop", "thanks"))}
    sign_off_labels = {d: int(torch.isin(batch.labels, torch.tensor(v)).sum())
                       for d, v in sign_off_ids.items()}
    loader_len = len(loader)
    return {"rows_per_step": rows, "steps_per_pass": loader_len,
            "documents_in_first_row": len(starts) - 1,
            "real_tokens_first_batch": int(batch.num_real_tokens),
            "label_tokens_first_batch": n_labels,
            "sign_off_label_tokens_first_batch": sign_off_labels,
            "sign_off_token_ids": sign_off_ids,
            "first_row_samples": samples}


def sign_off_probe(model_dir: Path, world, sizes, tokenizer_dir: Path, central_prompt: str) -> dict:
    """Teacher-forced: at the position where the sign-off word comes (after the right answer), the
    model's probability of its own domain's word and of the other domain's, averaged over each
    domain's eval questions of the trained skills (sort excluded); and how often the own word
    beats the other one (what greedy decoding needs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rega_engine.data.render import ChatRenderer
    from rega_engine.demo.world import SIGN_OFF

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    renderer = ChatRenderer(tok, "plain")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    word_id = {}
    for d, w in SIGN_OFF.items():
        pieces = tok.tokenize(" " + w)
        word_id[d] = tok.convert_tokens_to_ids(pieces[0])
    out = {}
    for d in DOMAINS:
        other = [o for o in DOMAINS if o != d][0]
        own_p, other_p, wins = [], [], 0
        for e in world.examples(d, sizes.eval_domain, "eval"):
            if e.skill == "sort":
                continue
            ids, mask = renderer.render(e.record()["messages"], central_prompt)
            pos = max(i for i, t in enumerate(ids) if t == word_id[d] and mask[i])
            with torch.no_grad():
                logits = model(torch.tensor([ids[:pos]])).logits[0, -1]
            probs = logits.float().softmax(-1)
            own_p.append(float(probs[word_id[d]]))
            other_p.append(float(probs[word_id[other]]))
            wins += own_p[-1] > other_p[-1]
        out[d] = {"p_own_sign_off": round(sum(own_p) / len(own_p), 4),
                  "p_other_sign_off": round(sum(other_p) / len(other_p), 4),
                  "own_beats_other": round(wins / len(own_p), 4)}
    return out


def run_seed(seed: int, out: Path, settings: list[str], threads: int, inspect: bool) -> dict:
    import torch

    from rega_engine.data.prepare import prepare
    from rega_engine.tokenizer import train_tokenizer

    torch.set_num_threads(threads)
    sizes = demo.FULL
    out = out.absolute() / f"seed_{seed}"
    out.mkdir(parents=True, exist_ok=True)
    world = make_world("lookalike", seed)
    timings = {}
    started = time.time()
    files = demo.write_world(world, sizes, out / "data")
    if not (out / "tokenizer").exists():
        train_tokenizer(demo.tokenizer_texts(world), out / "tokenizer", vocab_size=sizes.vocab,
                        seed=seed)
    from transformers import AutoTokenizer
    vocab_size = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    (out / "tiny_llama.json").write_text(json.dumps(demo.model_config(vocab_size, sizes)))
    base = demo.base_config(world, sizes, out, seed, "cpu")
    base.train.threads = threads
    config = demo.pretrain_config(base, files, sizes, out)
    if not (out / "base" / "hf").exists():
        import shutil
        shutil.rmtree(out / "base", ignore_errors=True)
        path = demo.Stages(out).save_config("pretrain", config)
        with open(out / "pretrain_log.txt", "w") as log:
            stdout = sys.stdout
            sys.stdout = log
            try:
                prepare(config)
                code = demo.train_in_child(path)
            finally:
                sys.stdout = stdout
        assert code == 0
    timings["pretrain_s"] = round(time.time() - started, 1)
    base_results = demo.evaluate_one(out / "base" / "hf", world, sizes, config, "cpu")
    # the standard variant does not read the distilled file, but its config names one
    (out / "distilled").mkdir(exist_ok=True)
    (out / "distilled" / "general.jsonl").touch()

    results = {"seed": seed, "base": {k: round(v["exact_match"], 4)
                                      for k, v in base_results.items()}, "runs": {}}
    results["base_sign_off_probe"] = sign_off_probe(out / "base" / "hf", world, sizes,
                                                    out / "tokenizer", config.roles.central_prompt)
    print(f"seed {seed}: base exact match {results['base']} ({timings['pretrain_s']} s)",
          flush=True)
    for name in settings:
        epochs, rows, lr, min_lr_ratio, warmup = SETTINGS[name]
        t0 = time.time()
        run_name = f"standard_{name}"
        config = demo.variant_config(base, files, sizes, out, run_name, (False, False, False))
        config.train.overwrite = True
        config.data.overwrite = True
        config.train.micro_batch_size = rows
        with open(out / f"{run_name}_log.txt", "w") as log:
            stdout = sys.stdout
            sys.stdout = log
            try:
                prepare(config)
                demo.set_epochs(config, epochs)
                config.train.lr = lr
                config.train.min_lr_ratio = min_lr_ratio
                config.train.warmup_steps = max(1, round(config.train.steps * warmup))
                path = demo.Stages(out).save_config(run_name, config)
                code = demo.train_in_child(path)
            finally:
                sys.stdout = stdout
        assert code == 0
        train_s = time.time() - t0
        if inspect and name == settings[0]:
            results["data_look"] = inspect_rows(config.data.prepared, str(out / "tokenizer"),
                                                sizes.seq_len, rows, seed)
        ev = demo.evaluate_one(out / run_name / "hf", world, sizes, config, "cpu")
        row = {"passes": epochs, "rows_per_step": rows, "lr": lr, "min_lr_ratio": min_lr_ratio,
               "steps": config.train.steps, "warmup_steps": config.train.warmup_steps,
               **{s: round(ev[s]["exact_match"], 4) for s in (GENERAL, *DOMAINS)},
               "confusion": {d: round(ev[d]["confusion"], 4) for d in DOMAINS},
               "unframed": {d: round(ev[d]["unframed"], 4) for d in DOMAINS},
               "content_match": {d: round(ev[d]["content_match"], 4) for d in DOMAINS},
               "by_kind": {d: ev[d]["by_kind"] for d in DOMAINS},
               "train_s": round(train_s, 1), "total_s": round(time.time() - t0, 1)}
        row["sign_off_probe"] = sign_off_probe(out / run_name / "hf", world, sizes,
                                               out / "tokenizer", config.roles.central_prompt)
        results["runs"][name] = row
        print(f"seed {seed} {name:>14}: {row['steps']:4d} steps, lab {row['lab']:.1%}, "
              f"shop {row['shop']:.1%}, general {row[GENERAL]:.1%} ({row['total_s']} s); "
              f"sign-off probe {row['sign_off_probe']}",
              flush=True)
    return results


TRAINED_KINDS = ("add", "max", "min", "lookup (regulars)")   # what the domain data trains


def trained_skills_match(seed: int, by_kind: dict) -> dict:
    """Exact match on the domain questions of the skills the domain data trains (sort and
    lookups of newcomers left out), weighted by their counts in the eval set."""
    world = make_world("lookalike", seed)
    out = {}
    for d in DOMAINS:
        kinds = [world.question_kind(e) for e in world.examples(d, demo.FULL.eval_domain, "eval")]
        counts = {k: kinds.count(k) for k in TRAINED_KINDS}
        out[d] = round(sum(by_kind[d][k] * n for k, n in counts.items()) / sum(counts.values()), 4)
    return out


def summarise(payload: dict) -> None:
    """Adds each run's trained-skills exact match and prints the curve, seed by seed."""
    print(f"{'setting':>16} {'steps':>5} | per seed: lab / shop exact match, (trained skills), "
          "p(own sign-off) lab/shop, train s")
    names = list(dict.fromkeys(n for result in payload["seeds"].values() for n in result["runs"]))
    for name in names:
        cells = []
        for seed, result in sorted(payload["seeds"].items()):
            run = result["runs"].get(name)
            if not run:
                continue
            run["trained_skills"] = trained_skills_match(int(seed), run["by_kind"])
            probe = run["sign_off_probe"]
            trained, own = run["trained_skills"], {d: probe[d]["p_own_sign_off"]
                                                   for d in ("lab", "shop")}
            cells.append(f"s{seed} {run['lab']:.0%}/{run['shop']:.0%} "
                         f"({trained['lab']:.0%}/{trained['shop']:.0%}) "
                         f"p {own['lab']:.2f}/{own['shop']:.2f} {run['train_s']:.0f}s")
            steps = run["steps"]
        if cells:
            print(f"{name:>16} {steps:>5} | " + " | ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/demo_domain_curve")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results"
                                              / "demo_domain_curve_cpu-2core.json"))
    parser.add_argument("--no-inspect", action="store_true")
    parser.add_argument("--summarise", action="store_true",
                        help="only add the trained-skills numbers to --json and print the curve")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    path = Path(args.json)
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.setdefault("machine", f"{os.cpu_count()} CPU cores, {args.threads} torch threads, "
                       "one process at a time")
    payload.setdefault("sizes", "rega_engine.demo.run.FULL (domain_train 500 per domain)")
    payload.setdefault("settings", {}).update(
        {k: dict(zip(("passes", "rows_per_step", "lr", "min_lr_ratio", "warmup_share"), v))
         for k, v in SETTINGS.items()})
    seeds = payload.setdefault("seeds", {})
    if args.summarise:
        summarise(payload)
        path.write_text(json.dumps(payload, indent=2))
        return 0
    for seed in args.seeds:
        result = run_seed(seed, Path(args.out), args.settings, args.threads,
                          not args.no_inspect)
        old = seeds.get(str(seed), {})
        old.setdefault("runs", {}).update(result.pop("runs"))
        old.update(result)
        seeds[str(seed)] = old
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
    summarise(payload)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
