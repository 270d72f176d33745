"""`rega-engine distill`: REGA's self-distillation. The base model answers general instructions
under the central prompt; its answers become the `distilled` exemplars replayed during domain
training (data.general).

Input (`distill.instructions`): JSONL chats that end with the user turn to answer. Output
(`distill.output`, default `data.general`): the same rows with the model's answer appended as the
final assistant turn, plus `"domain": "general", "distilled": true`, in instruction-file order.

Answers are filtered, and every filtered answer is counted by reason:
- empty: nothing but whitespace;
- no_eos: cut off at `distill.max_new_tokens` before the model ended its answer;
- repetitive: more than `distill.max_repeat_fraction` of the answer's token n-grams
  (n = `distill.repeat_ngram`) repeat an earlier one (degenerate loops).
Filtered answers go to `<output>.rejected.jsonl` for inspection. The report is printed, returned
and written to `<output>.report.json`.

Resuming: an instruction is identified by a hash of its messages. Instructions whose hash is in
the output (answered) or in the rejected file (filtered: the same seed would give the same answer
again; delete that file to retry them) are skipped, so an interrupted run is simply run again.

Several processes (torchrun): the pending instructions are dealt round-robin (rank r answers
pending[r::world_size]); each rank appends its answers to `<output>.part-<rank>` as it goes, and
after a barrier rank 0 merges every part file into the output (in instruction order) and removes
them. Part files left by an interrupted run are picked up by the next one, whatever its number
of processes. Because each instruction's sampling stream is seeded by (distill.seed, its hash),
the answers do not depend on the number of processes, the batch size or resuming.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

from .batch import GENERAL_DOMAIN
from .config import ConfigError, RunConfig
from .data.records import RowStats, read_instructions

FILTER_REASONS = ("empty", "no_eos", "repetitive")


def instruction_key(messages) -> str:
    """The hash that identifies an instruction (its messages, roles and contents) across runs."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def repeat_fraction(tokens, n: int) -> float:
    """Share of the n-grams of `tokens` that repeat an earlier n-gram (0 when there are none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def filter_reason(text: str, token_ids, ended: bool, *, max_repeat_fraction: float, ngram: int) -> str | None:
    """Why an answer is unusable as a distilled exemplar, or None when it is kept."""
    if not text.strip():
        return "empty"
    if not ended:
        return "no_eos"
    if repeat_fraction(list(token_ids), ngram) > max_repeat_fraction:
        return "repetitive"
    return None


# -- paths and files -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillPaths:
    instructions: str
    output: str
    model: str
    tokenizer: str

    @property
    def rejected(self) -> str:
        return self.output + ".rejected.jsonl"

    @property
    def report(self) -> str:
        return self.output + ".report.json"

    def part(self, rank: int) -> str:
        return f"{self.output}.part-{rank}"

    def parts(self) -> list[str]:
        return sorted(glob.glob(glob.escape(self.output) + ".part-*"))


def resolve_paths(config: RunConfig) -> DistillPaths:
    d = config.distill
    if not d.instructions:
        raise ConfigError("distill.instructions is empty: set it to the general instructions (JSONL chats "
                          "ending with the user turn to answer)")
    if not os.path.isfile(d.instructions):
        raise ConfigError(f"distill.instructions = {d.instructions!r}: file not found")
    output = d.output or config.data.general
    if not output:
        raise ConfigError("neither distill.output nor data.general is set: say where the distilled "
                          "exemplars go")
    model = d.model or config.model.path
    if not model:
        raise ConfigError("neither distill.model nor model.path is set: give the base model's directory")
    if not os.path.isfile(os.path.join(model, "config.json")):
        key = "distill.model" if d.model else "model.path"
        raise ConfigError(f"{key} = {model!r}: not a model directory (no config.json)")
    from .generation import tokenizer_dir_for
    tokenizer = tokenizer_dir_for(model, config.data.tokenizer)
    return DistillPaths(d.instructions, output, model, tokenizer)


def _check(config: RunConfig) -> None:
    d = config.distill
    if d.max_new_tokens < 1:
        raise ConfigError(f"distill.max_new_tokens = {d.max_new_tokens}; expected >= 1")
    if d.batch_size < 1:
        raise ConfigError(f"distill.batch_size = {d.batch_size}; expected >= 1")
    if d.repeat_ngram < 1:
        raise ConfigError(f"distill.repeat_ngram = {d.repeat_ngram}; expected >= 1")
    if not 0.0 <= d.max_repeat_fraction <= 1.0:
        raise ConfigError(f"distill.max_repeat_fraction = {d.max_repeat_fraction}; expected 0..1 "
                          "(1 keeps every answer)")
    if not d.greedy and not (d.temperature > 0 and 0 < d.top_p <= 1):
        raise ConfigError(f"distill.temperature = {d.temperature}, distill.top_p = {d.top_p}: sampling needs "
                          "temperature > 0 and 0 < top_p <= 1 (or distill.greedy = true)")


def _read_jsonl_keys(path: str, key_of) -> set[str]:
    """Keys of the rows of a JSONL file we wrote. An unfinished last line (a run killed while
    writing) is cut off; any other unreadable line is an error naming it."""
    keys: set[str] = set()
    if not os.path.isfile(path):
        return keys
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"distill: {path}: dropping an unfinished last line (an interrupted run); its "
              "instruction will be answered again", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            keys.add(key_of(json.loads(raw)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{line_no}: not a row this tool wrote ({type(e).__name__}: {e}); "
                              "fix or remove the line, or choose another distill.output") from None
    return keys


def _answered_key(row: dict) -> str:
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise KeyError("the last turn is not an assistant answer")
    return instruction_key(messages[:-1])


# -- distributed helpers -------------------------------------------------------------------------
def _world() -> tuple[int, int, bool]:
    """(rank, world_size, initialised_here): joins the torchrun group when there is one."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        # gloo: only barriers and a few small objects travel between ranks, whatever the device.
        dist.init_process_group("gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


# -- the job -------------------------------------------------------------------------------------
def distill(config: RunConfig) -> dict:
    """Self-distil general exemplars; returns the report (also printed and written as JSON)."""
    started = time.time()
    _check(config)
    paths = resolve_paths(config)
    rank, world, created_group = _world()
    try:
        return _distill(config, paths, rank, world, started)
    finally:
        if created_group:
            import torch.distributed as dist
            # Every rank leaves together: one tearing the group down while another is still in
            # the last collective can abort it.
            dist.barrier()
            dist.destroy_process_group()


def _distill(config: RunConfig, paths: DistillPaths, rank: int, world: int, started: float) -> dict:
    from .data.prepare import load_tokenizer
    from .data.render import ChatRenderer, RenderError
    from .data.roles import RoleTable
    from .generation import generate, load_model

    d = config.distill
    roles = RoleTable.from_config(config.roles)
    stats = RowStats()
    records = list(read_instructions(paths.instructions, bad_rows=config.data.bad_rows, stats=stats))
    keyed, duplicates = [], 0
    seen: set[str] = set()
    for index, record in enumerate(records):
        key = instruction_key(record.messages)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        keyed.append((index, key, record))

    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(paths.output)), exist_ok=True)
    _barrier(world)
    # Every rank reads the same files before anyone writes, so all agree on what is pending.
    answered = _read_jsonl_keys(paths.output, _answered_key) if rank == 0 else None
    rejected = _read_jsonl_keys(paths.rejected, lambda row: row["key"]) if rank == 0 else None
    leftovers = {}
    if rank == 0:
        for part in paths.parts():
            leftovers[part] = _read_jsonl_keys(part, lambda row: row["key"])
    if world > 1:
        import torch.distributed as dist
        box = [(answered, rejected, leftovers)]
        dist.broadcast_object_list(box, src=0)
        answered, rejected, leftovers = box[0]
    in_parts = set().union(*leftovers.values()) if leftovers else set()
    done = answered | rejected | in_parts
    pending = [item for item in keyed if item[1] not in done]
    mine = pending[rank::world]

    tokenizer = load_tokenizer(paths.tokenizer, "data.tokenizer" if paths.tokenizer != paths.model else "distill.model")
    renderer = ChatRenderer(tokenizer, config.data.chat_template)
    prompts, kept_items, unrenderable = [], [], Counter()
    for index, key, record in mine:
        try:
            prompts.append(renderer.render_prompt(record.messages, roles.central_prompt))
        except RenderError as e:
            unrenderable[e.reason] += 1
            print(f"distill: {record.origin}: {e}; instruction skipped", file=sys.stderr)
            continue
        kept_items.append((index, key, record))

    if rank == 0:
        print(f"distill: {len(keyed)} instructions from {paths.instructions} ({len(keyed) - len(pending)} "
              f"already done, {len(pending)} to answer on {world} process(es)); model {paths.model}",
              file=sys.stderr)
    part_path = paths.part(rank)
    if kept_items:
        from tqdm import tqdm

        model = load_model(paths.model, device="auto", dtype=config.model.dtype)
        bar = tqdm(total=len(prompts), desc="distill", unit="instr", disable=rank != 0 or not sys.stderr.isatty(),
                   file=sys.stderr)
        chunk = max(d.batch_size * 8, 1)
        with open(part_path, "a", encoding="utf-8") as part, bar:
            # Written chunk by chunk and flushed: an interruption loses at most one chunk.
            for start in range(0, len(prompts), chunk):
                items = kept_items[start:start + chunk]
                answers = generate(model, tokenizer, prompts[start:start + chunk],
                                   max_new_tokens=d.max_new_tokens, greedy=d.greedy,
                                   temperature=d.temperature, top_p=d.top_p, seed=d.seed,
                                   keys=[key for _, key, _ in items], batch_size=d.batch_size, progress=bar)
                for (index, key, record), answer in zip(items, answers):
                    part.write(json.dumps(_part_row(index, key, record, answer, d), ensure_ascii=False) + "\n")
                part.flush()
    _barrier(world)

    counts = Counter()
    if rank == 0:
        counts = _merge(paths)
    _barrier(world)
    unrenderable_all = _sum_counters(unrenderable, world)
    report = None
    if rank == 0:
        total_out = len(_read_jsonl_keys(paths.output, _answered_key))
        report = {
            "instructions": paths.instructions,
            "output": paths.output,
            "model": paths.model,
            "seed": d.seed,
            "sampling": ("greedy" if d.greedy else {"temperature": d.temperature, "top_p": d.top_p}),
            "max_new_tokens": d.max_new_tokens,
            "processes": world,
            "rows": stats.as_dict()["files"],
            "rows_rejected": dict(stats.rejected),
            "duplicates": duplicates,
            "already_done": len(keyed) - len(pending),
            "unrenderable": dict(unrenderable_all),
            "answered": counts["answered"],
            "kept": counts["kept"],
            "filtered": {reason: counts[reason] for reason in FILTER_REASONS},
            "exemplars_in_output": total_out,
            "seconds": round(time.time() - started, 3),
        }
        with open(paths.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(format_report(report))
    if world > 1:
        import torch.distributed as dist
        box = [report]
        dist.broadcast_object_list(box, src=0)
        report = box[0]
    return report


def _part_row(index: int, key: str, record, answer, d) -> dict:
    reason = filter_reason(answer.text, answer.token_ids, answer.ended,
                           max_repeat_fraction=d.max_repeat_fraction, ngram=d.repeat_ngram)
    row = {"index": index, "key": key, "origin": record.origin}
    if reason is None:
        messages = [*record.messages, {"role": "assistant", "content": answer.text.strip()}]
        row["row"] = {"messages": messages, "domain": GENERAL_DOMAIN, "distilled": True}
    else:
        row["rejected"] = reason
        row["messages"] = list(record.messages)
        row["answer"] = answer.text
    return row


def _merge(paths: DistillPaths) -> Counter:
    """Appends every part file's answers to the output (and the filtered ones to the rejected
    file), in instruction order, then removes the parts. Returns the counts of what it merged."""
    rows = {}
    for part in paths.parts():
        with open(part, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(row["key"], row)   # a key twice (two crashed runs): once
    counts = Counter()
    ordered = sorted(rows.values(), key=lambda r: r["index"])
    with open(paths.output, "a", encoding="utf-8") as out, open(paths.rejected, "a", encoding="utf-8") as rej:
        for row in ordered:
            counts["answered"] += 1
            if "row" in row:
                counts["kept"] += 1
                out.write(json.dumps(row["row"], ensure_ascii=False) + "\n")
            else:
                counts[row["rejected"]] += 1
                rej.write(json.dumps({"key": row["key"], "reason": row["rejected"], "origin": row["origin"],
                                      "messages": row["messages"], "answer": row["answer"]},
                                     ensure_ascii=False) + "\n")
    # Only now, with output and rejected file complete on disk, are the parts redundant.
    for part in paths.parts():
        os.remove(part)
    return counts


def _sum_counters(counter: Counter, world: int) -> Counter:
    if world <= 1:
        return counter
    import torch.distributed as dist
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(counter))
    total = Counter()
    for c in gathered:
        total.update(c)
    return total


def format_report(report: dict) -> str:
    filtered = report["filtered"]
    lines = [
        f"distilled {report['kept']} of {report['answered']} answers into {report['output']} "
        f"({report['exemplars_in_output']} exemplars in it now; {report['seconds']:.1f} s)",
        "filtered: " + ", ".join(f"{reason} {filtered[reason]}" for reason in FILTER_REASONS),
        f"skipped: already done {report['already_done']}, duplicates {report['duplicates']}, "
        f"bad rows {sum(report['rows_rejected'].values())}, unrenderable {sum(report['unrenderable'].values())}",
    ]
    return "\n".join(lines)
