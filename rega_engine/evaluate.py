"""`rega-engine eval`: a checkpoint evaluated the way REGA serves it, under the central prompt only.

For the general set (`eval.general`) and each domain's set (`eval.domains`), where the reference
answer is each row's final assistant turn:
- exact match: the greedy answer equals the reference, whitespace normalised (runs of whitespace
  are one space, ends stripped);
- loss and perplexity: the mean token negative log-likelihood of the reference answer (its closing
  end token included, as training counts it), teacher-forced, and exp of it.
With `eval.role_prompts`, each domain's set is evaluated again under its role prompt, for
comparison only: serving never switches prompts by domain.

`evaluate_model` does the same for a model directory and in-memory sets, and returns the dict
(the demo uses it).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping, Sequence

import torch

from .batch import GENERAL_DOMAIN
from .config import ConfigError, RunConfig


def normalize(text: str) -> str:
    return " ".join(text.split())


def _messages(item) -> tuple:
    messages = tuple(getattr(item, "messages", item))
    if not messages or messages[-1]["role"] != "assistant":
        origin = getattr(item, "origin", "an eval row")
        raise ValueError(f"{origin}: the last turn must be the reference assistant answer")
    return messages


def _final_answer_mask(mask: list[int]) -> list[int]:
    """Only the last run of assistant tokens: earlier assistant turns of a chat are context."""
    out = [0] * len(mask)
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    out[start:end] = [1] * (end - start)
    return out


@torch.no_grad()
def answer_losses(model, renderings: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                  batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each rendering's masked tokens, teacher-forced."""
    device = next(model.parameters()).device
    out: list[tuple[float, int] | None] = [None] * len(renderings)
    order = sorted(range(len(renderings)), key=lambda i: len(renderings[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(renderings[i][0]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            tokens, mask = renderings[i]
            ids[r, :len(tokens)] = torch.tensor(tokens)
            attention[r, :len(tokens)] = 1
            targets[r, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
        ids, attention, targets = ids.to(device), attention.to(device), targets.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
        # Position t predicts token t + 1.
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        weight = targets[:, 1:].float()
        sums = (nll * weight).sum(dim=1).tolist()
        counts = weight.sum(dim=1).long().tolist()
        for r, i in enumerate(rows):
            out[i] = (sums[r], counts[r])
    return out


def _evaluate_set(model, tokenizer, renderer, items: Sequence, system: str, *, max_new_tokens: int,
                  batch_size: int, keep_predictions: bool, progress) -> dict:
    from .generation import generate

    conversations = [_messages(item) for item in items]
    if not conversations:
        return {"samples": 0, "exact_match": None, "correct": 0, "cut_off": 0, "loss": None,
                "perplexity": None, "answer_tokens": 0}
    prompts = [renderer.render_prompt(c[:-1], system) for c in conversations]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=True,
                       batch_size=batch_size, progress=progress)
    references = [c[-1]["content"] for c in conversations]
    correct = [normalize(a.text) == normalize(r) for a, r in zip(answers, references)]
    renderings = []
    for c in conversations:
        ids, mask = renderer.render(c, system)
        renderings.append((ids, _final_answer_mask(mask)))
    pad_id = next((int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    losses = answer_losses(model, renderings, pad_id=pad_id, batch_size=batch_size)
    total_nll = sum(s for s, _ in losses)
    total_tokens = sum(n for _, n in losses)
    loss = total_nll / total_tokens if total_tokens else None
    result = {
        "samples": len(conversations),
        "exact_match": sum(correct) / len(correct),
        "correct": sum(correct),
        "cut_off": sum(not a.ended for a in answers),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)) if loss is not None else None,
        "answer_tokens": total_tokens,
    }
    if keep_predictions:
        result["predictions"] = [{"prediction": a.text.strip(), "reference": r, "correct": ok}
                                 for a, r, ok in zip(answers, references, correct)]
    return result


def evaluate_model(model_dir: str | os.PathLike, sets: Mapping[str, Sequence], *, central_prompt: str,
                   role_prompts: Mapping[str, str] | None = None, tokenizer_dir: str = "",
                   chat_template: str = "auto", max_new_tokens: int = 64, batch_size: int = 16,
                   device: str = "auto", dtype: str = "auto", keep_predictions: bool = False,
                   model=None, progress: bool = False) -> dict:
    """Evaluates a model directory on `sets` (name -> conversations or Records, each ending with
    the reference answer) under `central_prompt`; with `role_prompts` (domain -> prompt), also the
    sets named after a domain under its role prompt. `model` reuses an already loaded model.

    Returns {"checkpoint", "central": {name: metrics}, "role": {name: metrics}} where metrics has
    samples, exact_match, correct, cut_off, loss, perplexity, answer_tokens (and predictions).
    """
    from .data.prepare import load_tokenizer
    from .data.render import ChatRenderer
    from .generation import load_model, tokenizer_dir_for

    if not central_prompt or not central_prompt.strip():
        raise ConfigError("the central prompt is empty: REGA serves under roles.central_prompt; set it")
    model_dir = os.fspath(model_dir)
    tokenizer_path = tokenizer_dir or tokenizer_dir_for(model_dir)
    tokenizer = load_tokenizer(tokenizer_path, "data.tokenizer")
    renderer = ChatRenderer(tokenizer, chat_template)
    if model is None:
        model = load_model(model_dir, device=device, dtype=dtype)
    bar = None
    if progress:
        from tqdm import tqdm
        total = sum(len(v) for v in sets.values())
        total += sum(len(v) for k, v in sets.items() if role_prompts and k in role_prompts)
        bar = tqdm(total=total, desc="eval", unit="sample", file=sys.stderr)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, keep_predictions=keep_predictions,
                  progress=bar)
    result = {"checkpoint": model_dir, "central_prompt": central_prompt, "central": {}, "role": {}}
    try:
        for name, items in sets.items():
            result["central"][name] = _evaluate_set(model, tokenizer, renderer, items, central_prompt, **kwargs)
        for name, items in sets.items():
            if role_prompts and name in role_prompts:
                result["role"][name] = _evaluate_set(model, tokenizer, renderer, items, role_prompts[name],
                                                     **kwargs)
    finally:
        if bar is not None:
            bar.close()
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    central, role = result["central"], result["role"]
    header = f"{'set':<16} {'n':>5} {'exact match':>11} {'loss':>7} {'ppl':>8}"
    if role:
        header += f"   {'role: exact':>11} {'loss':>7}"
    lines = [f"{result['checkpoint']} under the central prompt", header, "-" * len(header)]
    for name, m in central.items():
        line = (f"{name:<16} {m['samples']:>5} {_fmt(m['exact_match'], '11.1%')} {_fmt(m['loss'], '7.3f')} "
                f"{_fmt(m['perplexity'], '8.2f')}")
        if role:
            r = role.get(name)
            line += ("   " + (f"{_fmt(r['exact_match'], '11.1%')} {_fmt(r['loss'], '7.3f')}" if r
                                else f"{'-':>11} {'-':>7}"))
        lines.append(line)
    return "\n".join(lines)


def load_eval_sets(config: RunConfig) -> dict:
    """{"general": Records, domain: Records} from eval.general and eval.domains."""
    from .data.records import RowStats, read_samples

    e = config.eval
    if not isinstance(e.domains, dict):
        raise ConfigError("eval.domains must be a table of domain = \"path.jsonl\"")
    sources = ([(GENERAL_DOMAIN, e.general, "eval.general")] if e.general else [])
    sources += [(d, p, f"eval.domains.{d}") for d, p in e.domains.items()]
    if not sources:
        raise ConfigError("nothing to evaluate: set eval.general and/or eval.domains")
    sets, stats = {}, RowStats()
    for name, path, key in sources:
        if name == GENERAL_DOMAIN and key != "eval.general":
            raise ConfigError("eval.domains.general: the general set is eval.general")
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")
        sets[name] = list(read_samples(path, source=name, bad_rows=config.data.bad_rows, stats=stats,
                                       source_key=key))
        if not sets[name]:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
    if stats.rejected:
        print("eval: rows rejected: " + ", ".join(f"{r} {n}" for r, n in sorted(stats.rejected.items())),
              file=sys.stderr)
    return sets


def evaluate(config: RunConfig) -> dict:
    """Evaluate `eval.checkpoint` (default <train.out_dir>/hf); prints the table, writes eval.output."""
    from .data.roles import RoleTable

    started = time.time()
    e = config.eval
    if e.max_new_tokens < 1 or e.batch_size < 1:
        raise ConfigError(f"eval.max_new_tokens = {e.max_new_tokens}, eval.batch_size = {e.batch_size}: "
                          "both must be >= 1")
    checkpoint = e.checkpoint or os.path.join(config.train.out_dir, "hf")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        key = "eval.checkpoint" if e.checkpoint else "train.out_dir"
        raise ConfigError(f"{key}: {checkpoint} is not a model directory (no config.json); train first or "
                          "set eval.checkpoint")
    roles = RoleTable.from_config(config.roles)
    sets = load_eval_sets(config)
    if e.role_prompts:
        missing = [d for d in sets if d != GENERAL_DOMAIN and d not in roles.role_prompts]
        if missing:
            raise ConfigError(f"eval.role_prompts = true but {', '.join(missing)} has no role prompt: add "
                              f"roles.prompts.{missing[0]} or set eval.role_prompts = false")
    from .generation import tokenizer_dir_for
    result = evaluate_model(checkpoint, sets, central_prompt=roles.central_prompt,
                            role_prompts=roles.role_prompts if e.role_prompts else None,
                            tokenizer_dir=tokenizer_dir_for(checkpoint, config.data.tokenizer),
                            chat_template=config.data.chat_template, max_new_tokens=e.max_new_tokens,
                            batch_size=e.batch_size, dtype=config.model.dtype,
                            progress=sys.stderr.isatty())
    result["seconds"] = round(time.time() - started, 3)
    output = e.output or os.path.join(config.train.out_dir, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    print(f"eval: wrote {output} ({result['seconds']:.1f} s)")
    return result
