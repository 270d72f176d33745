"""`rega-engine eval`: a checkpoint evaluated the way REGA serves it, under the central prompt only.

For the general set (`eval.general`) and each domain's set (`eval.domains`), where the reference
answer is each row's final assistant turn:
- exact match: the greedy answer equals the reference, whitespace normalised (runs of whitespace
  are one space, ends stripped);
- loss and perplexity: the mean token negative log-likelihood of the reference answer (its closing
  end token included, as training counts it), teacher-forced, and exp of it.
With `eval.role_prompts`, each domain's set is evaluated again under its role prompt, for
comparison only: serving never switches prompts by domain.

An eval row may carry a `"tag"` (a string: the skill or kind of question it tests); exact match
is then also broken down by tag (`by_tag` in each set's metrics, and a second table). Every
question's prompt, reference, prediction and verdict go to `<eval.output stem>.predictions.jsonl`
beside eval.json (eval.json keeps the aggregates only).

`evaluate_model` does the same for a model directory and in-memory sets, and returns the dict
(the demo uses it).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .batch import GENERAL_DOMAIN
from .config import ConfigError, RunConfig, validate_config
from .errors import DataError
from .log import get_logger
from .tokenizer import load_tokenizer

log = get_logger(__name__)

UNTAGGED = "(no tag)"   # the by_tag group of a set's rows without a tag, where others have one


@dataclass(frozen=True)
class EvalItem:
    """One eval row: its conversation (ending with the reference answer), where it came from and
    its optional tag."""
    messages: tuple
    origin: str = ""
    tag: str | None = None


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
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                reduction="none")
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
    tags = [getattr(item, "tag", None) for item in items]
    renderings = []
    for c in conversations:
        ids, mask = renderer.render(c, system)
        renderings.append((ids, _final_answer_mask(mask)))
    pad_id = next((int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if i is not None), 0)
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
    if any(tag is not None for tag in tags):
        result["by_tag"] = _by_tag(tags, correct)
    if keep_predictions:
        result["predictions"] = [
            _prediction_row(item, c, system, a, ok, nll, tag)
            for item, c, a, ok, nll, tag in zip(items, conversations, answers, correct, losses,
                                                tags)]
    return result


def _by_tag(tags: Sequence[str | None], correct: Sequence[bool]) -> dict:
    groups: dict[str, list[bool]] = {}
    for tag, ok in zip(tags, correct):
        groups.setdefault(UNTAGGED if tag is None else tag, []).append(ok)
    return {tag: {"samples": len(v), "correct": sum(v), "exact_match": sum(v) / len(v)}
            for tag, v in sorted(groups.items())}


def _prediction_row(item, conversation: tuple, system: str, answer, correct: bool,
                    nll: tuple[float, int], tag: str | None) -> dict:
    """One question as predictions.jsonl holds it: what was asked, under which system prompt,
    what was expected, what came and the verdict."""
    context = list(conversation[:-1])
    last_user = max((i for i, m in enumerate(context) if m["role"] == "user"), default=None)
    row = {"system": system,
           "prompt": context[last_user]["content"] if last_user is not None else "",
           "reference": conversation[-1]["content"], "prediction": answer.text.strip(),
           "correct": correct, "cut_off": not answer.ended,
           "loss": nll[0] / nll[1] if nll[1] else None}
    if last_user:   # earlier turns of a multi-turn chat: the context the prompt came in
        row["history"] = context[:last_user]
    origin = getattr(item, "origin", "")
    if origin:
        row["origin"] = origin
    if tag is not None:
        row["tag"] = tag
    return row


def evaluate_model(model_dir: str | os.PathLike, sets: Mapping[str, Sequence], *,
                   central_prompt: str,
                   role_prompts: Mapping[str, str] | None = None, tokenizer_dir: str = "",
                   chat_template: str = "auto", max_new_tokens: int = 64, batch_size: int = 16,
                   device: str = "auto", dtype: str = "auto", keep_predictions: bool = False,
                   model=None, progress: bool = False,
                   progress_every_s: float | None = None) -> dict:
    """Evaluates a model directory on `sets` (name -> conversations, Records or EvalItems, each
    ending with the reference answer) under `central_prompt`; with `role_prompts` (domain ->
    prompt), also the sets named after a domain under its role prompt. `model` reuses an already
    loaded model.

    Returns {"checkpoint", "central": {name: metrics}, "role": {name: metrics}} where metrics has
    samples, exact_match, correct, cut_off, loss, perplexity, answer_tokens, by_tag (when an item
    has a `tag`: tag -> samples, correct, exact_match) and, with keep_predictions, predictions:
    per item in order, set, under ("central" or "role"), system, prompt, reference, prediction,
    correct, cut_off, loss (and history, origin, tag where there are).
    """
    from .data.render import ChatRenderer
    from .generation import load_model, tokenizer_dir_for

    if not central_prompt or not central_prompt.strip():
        raise ConfigError("the central prompt is empty: REGA serves under roles.central_prompt; "
                          "set it")
    model_dir = os.fspath(model_dir)
    tokenizer_path = tokenizer_dir or tokenizer_dir_for(model_dir)
    tokenizer = load_tokenizer(tokenizer_path, "data.tokenizer")
    renderer = ChatRenderer(tokenizer, chat_template)
    if model is None:
        model = load_model(model_dir, device=device, dtype=dtype)
    bar = None
    if progress:   # a bar on a terminal, a plain line every progress_every_s elsewhere
        from .progress import progress as progress_bar
        total = sum(len(v) for v in sets.values())
        total += sum(len(v) for k, v in sets.items() if role_prompts and k in role_prompts)
        bar = progress_bar(total, desc="eval", unit="sample", every_s=progress_every_s)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size,
                  keep_predictions=keep_predictions,
                  progress=bar)
    result = {"checkpoint": model_dir, "central_prompt": central_prompt, "central": {}, "role": {}}
    try:
        for name, items in sets.items():
            result["central"][name] = _evaluate_set(model, tokenizer, renderer, items,
                                                    central_prompt, **kwargs)
        for name, items in sets.items():
            if role_prompts and name in role_prompts:
                result["role"][name] = _evaluate_set(model, tokenizer, renderer, items,
                                                     role_prompts[name],
                                                     **kwargs)
        for under in ("central", "role"):
            for name, metrics in result[under].items():
                if "predictions" in metrics:
                    metrics["predictions"] = [{"set": name, "under": under, **row}
                                              for row in metrics["predictions"]]
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
        line = (f"{name:<16} {m['samples']:>5} {_fmt(m['exact_match'], '11.1%')} "
                f"{_fmt(m['loss'], '7.3f')} {_fmt(m['perplexity'], '8.2f')}")
        if role:
            r = role.get(name)
            line += ("   " + (f"{_fmt(r['exact_match'], '11.1%')} {_fmt(r['loss'], '7.3f')}" if r
                                else f"{'-':>11} {'-':>7}"))
        lines.append(line)
    lines += _format_by_tag(result)
    return "\n".join(lines)


def _format_by_tag(result: dict) -> list[str]:
    """The breakdown by tag, for the sets whose rows carry one."""
    central, role = result["central"], result["role"]
    tagged = [name for name, m in central.items() if m.get("by_tag")]
    if not tagged:
        return []
    width = max(16, *(len(t) for name in tagged for t in central[name]["by_tag"]))
    header = f"{'set':<16} {'tag':<{width}} {'n':>5} {'exact match':>11}"
    with_role = any(role.get(name, {}).get("by_tag") for name in tagged)
    if with_role:
        header += f"   {'role: exact':>11}"
    lines = ["", "exact match by tag", header, "-" * len(header)]
    for name in tagged:
        role_tags = role.get(name, {}).get("by_tag") or {}
        for tag, m in central[name]["by_tag"].items():
            line = f"{name:<16} {tag:<{width}} {m['samples']:>5} {_fmt(m['exact_match'], '11.1%')}"
            if with_role:
                value = role_tags.get(tag, {}).get("exact_match")
                line += "   " + (f"{'-':>11}" if value is None else format(value, "11.1%"))
            lines.append(line)
    return lines


def load_eval_sets(config: RunConfig) -> dict:
    """{"general": Records, domain: Records} from eval.general, eval.domains and eval.files (each
    row of those names its own set in its "domain" field; the file is read once).

    A row is accepted as prepare accepts it: a domain it names must have a role prompt (or be a
    set of eval.domains); others are rejected, counted and, where the rejected rows name a domain
    close to one of roles.prompts that has no rows, refused as the misspelling it is."""
    from .data.records import RowStats, read_samples, read_tagged_samples
    from .data.roles import RoleTable, check_declared_domains

    e = config.eval
    if not isinstance(e.domains, dict):
        raise ConfigError("eval.domains must be a table of domain = \"path.jsonl\"")
    roles = RoleTable.from_config(config.roles)
    known = [*roles.domains, *(d for d in e.domains if d not in roles.domains)]
    sources = ([(GENERAL_DOMAIN, e.general, "eval.general")] if e.general else [])
    sources += [(d, p, f"eval.domains.{d}") for d, p in e.domains.items()]
    if not sources and not e.files:
        raise ConfigError("nothing to evaluate: set eval.general, eval.domains and/or eval.files")
    sets, stats = {}, RowStats()
    for name, path, key in sources:
        if name == GENERAL_DOMAIN and key != "eval.general":
            raise ConfigError("eval.domains.general: the general set is eval.general")
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")
        records = list(read_samples(path, source=name, known_domains=known,
                                    bad_rows=config.data.bad_rows, stats=stats, source_key=key))
        tags = _read_tags(path, {r.line for r in records}, key)
        sets[name] = [EvalItem(r.messages, r.origin, tags.get(r.line)) for r in records]
        if not sets[name]:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
    for i, path in enumerate(e.files):
        key = f"eval.files[{i}]"
        if not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")
        records = list(read_tagged_samples(path, source_key=key, known_domains=known,
                                           bad_rows=config.data.bad_rows, stats=stats))
        if not records:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
        tags = _read_tags(path, {r.line for r in records}, key)
        for r in records:
            sets.setdefault(r.domain, []).append(EvalItem(r.messages, r.origin, tags.get(r.line)))
    sets = {name: sets[name] for name in sorted(sets, key=lambda name: name != GENERAL_DOMAIN)}
    check_declared_domains({d: f"roles.prompts.{d}" for d in roles.role_prompts}, set(sets), stats,
                           misspelt_only=True)
    if stats.rejected:
        log.warning("eval: rows rejected: "
                    + ", ".join(f"{r} {n}" for r, n in sorted(stats.rejected.items())))
    return sets


def _read_tags(path: str, lines: set[int], key: str) -> dict[int, str]:
    """line -> the row's "tag", for the accepted rows (`lines`) of an eval file that have one."""
    tags = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no not in lines:
                continue
            tag = json.loads(raw).get("tag")
            if tag is None:
                continue
            if not isinstance(tag, str) or not tag.strip():
                raise DataError(f"{path}:{line_no}: 'tag' must be a non-empty string (the skill or "
                                f"kind of question the row tests), got {tag!r}; fix the row in "
                                f"{key} or drop its tag", "wrong type", path, line_no)
            tags[line_no] = tag.strip()
    return tags


def predictions_path(output: str) -> str:
    """Where the per-question predictions go beside eval.output: <stem>.predictions.jsonl."""
    return os.path.splitext(output)[0] + ".predictions.jsonl"


def evaluate(config: RunConfig) -> dict:
    """Evaluate `eval.checkpoint` (default <train.out_dir>/hf); prints the table, writes
    eval.output."""
    from .data.roles import RoleTable

    started = time.time()
    validate_config(config)
    e = config.eval
    checkpoint = e.checkpoint or os.path.join(config.train.out_dir, "hf")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        key = "eval.checkpoint" if e.checkpoint else "train.out_dir"
        raise ConfigError(f"{key}: {checkpoint} is not a model directory (no config.json); train "
                          "first or set eval.checkpoint")
    roles = RoleTable.from_config(config.roles)
    sets = load_eval_sets(config)
    if e.role_prompts:
        missing = [d for d in sets if d != GENERAL_DOMAIN and d not in roles.role_prompts]
        if missing:
            raise ConfigError(f"eval.role_prompts = true but {', '.join(missing)} has no role "
                              "prompt: add "
                              f"roles.prompts.{missing[0]} or set eval.role_prompts = false")
    from .generation import tokenizer_dir_for
    result = evaluate_model(checkpoint, sets, central_prompt=roles.central_prompt,
                            role_prompts=roles.role_prompts if e.role_prompts else None,
                            tokenizer_dir=tokenizer_dir_for(checkpoint, config.data.tokenizer),
                            chat_template=config.data.chat_template,
                            max_new_tokens=e.max_new_tokens,
                            batch_size=e.batch_size, dtype=config.model.dtype,
                            keep_predictions=True, progress=config.train.progress,
                            progress_every_s=config.train.progress_every_s)
    result["seconds"] = round(time.time() - started, 3)
    output = e.output or os.path.join(config.train.out_dir, "eval.json")
    predictions = predictions_path(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    rows = 0
    with open(predictions, "w", encoding="utf-8") as f:
        for under in ("central", "role"):
            for metrics in result[under].values():
                for row in metrics.pop("predictions", []):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    rows += 1
    result["predictions"] = predictions
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    log.info(f"eval: wrote {output} and {rows} predictions to {predictions} "
             f"({result['seconds']:.1f} s)")
    return result
