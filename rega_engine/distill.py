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
again; delete that file to retry them) are skipped, so an interrupted run is simply run again, and
instructions added to the file later are answered on the next run.

Provenance: `<output>.provenance.json` records what produced the answers: a fingerprint of the
model (weights, config.json, generation_config.json), the tokenizer, the chat template setting,
the central prompt, the sampling settings, the filters and the instruction file's sha256. A run
that finds earlier answers made otherwise refuses to add to them, naming every setting that
changed (old -> new); `distill.overwrite = true` (for one run: --distill.overwrite=true; its
former name distill.restart means the same) moves the earlier files into `<output>.stale-<time>/`
and answers every instruction again. A changed instruction file is no reason to refuse (answers
are keyed by instruction); answers to instructions no longer in it are counted and stay.

Nothing finished is replaced without that word: a rerun adds answers (or, with none to add, leaves
the earlier run's report as it was); an output file holding rows distill did not write (a chats
file given as distill.output or data.general, say) is refused rather than appended to or cut.
A distill.instructions file without a single usable instruction (a chats file whose rows already
end with an answer, say) is an error naming the file and what its rows are.

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
import struct
import time
from collections import Counter
from dataclasses import dataclass

from . import distributed
from .batch import GENERAL_DOMAIN
from .config import ConfigError, RunConfig, validate_config
from .data.records import RowStats, read_instructions
from .errors import DataError, RegaError
from .log import get_logger
from .tokenizer import load_tokenizer

log = get_logger(__name__)

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


def filter_reason(text: str, token_ids, ended: bool, *, max_repeat_fraction: float,
                  ngram: int) -> str | None:
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

    @property
    def provenance(self) -> str:
        return self.output + ".provenance.json"

    def part(self, rank: int) -> str:
        return f"{self.output}.part-{rank}"

    def parts(self) -> list[str]:
        return sorted(glob.glob(glob.escape(self.output) + ".part-*"))

    def results(self) -> list[str]:
        """The files holding an earlier run's answers (what a resume would reuse)."""
        return [p for p in (self.output, self.rejected, *self.parts())
                if os.path.isfile(p) and os.path.getsize(p) > 0]


def resolve_paths(config: RunConfig) -> DistillPaths:
    d = config.distill
    if not d.instructions:
        raise ConfigError("distill.instructions is empty: set it to the general instructions "
                          "(JSONL chats ending with the user turn to answer)")
    if not os.path.isfile(d.instructions):
        raise ConfigError(f"distill.instructions = {d.instructions!r}: file not found")
    output = d.output or config.data.general
    if not output:
        raise ConfigError("neither distill.output nor data.general is set: say where the distilled "
                          "exemplars go")
    model = d.model or config.model.path
    if not model:
        raise ConfigError("neither distill.model nor model.path is set: give the base model's "
                          "directory")
    if not os.path.isfile(os.path.join(model, "config.json")):
        key = "distill.model" if d.model else "model.path"
        raise ConfigError(f"{key} = {model!r}: not a model directory (no config.json)")
    from .generation import tokenizer_dir_for
    tokenizer = tokenizer_dir_for(model, config.data.tokenizer)
    return DistillPaths(d.instructions, output, model, tokenizer)


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
        log.warning(f"distill: {path}: dropping an unfinished last line (an interrupted run); "
                    "its instruction will be answered again")
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            keys.add(key_of(json.loads(raw)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{line_no}: not a row this tool wrote ({type(e).__name__}: "
                              f"{e}); "
                              "fix or remove the line, or choose another distill.output") from None
    return keys


def _answered_key(row: dict) -> str:
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise KeyError("the last turn is not an assistant answer")
    return instruction_key(messages[:-1])


# -- provenance ----------------------------------------------------------------------------------
# Models up to this many bytes of weights are hashed whole. Above it, hashing tens of GB would
# cost minutes at every start, so each tensor contributes its name, dtype, shape and _SAMPLES
# evenly spaced blocks of _SAMPLE_BYTES of its data: any retraining (full fine-tune, a merged
# LoRA, one layer or the LM head alone) changes those blocks with near certainty, but an edit of a
# few isolated weights between the blocks would pass unseen.
_FULL_HASH_BYTES = 1 << 30
_SAMPLES = 8
_SAMPLE_BYTES = 4096
# Text whose encoding shows the tokenizer's normalisation and pre-tokenisation at work.
_PROBE_TEXT = "Hello, World!  It's 12.5%\n\tof 1000 ünïcödé 中文 <tag> ```code```  end "


def _canonical_sha256(value) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_tensors(file: str) -> tuple[int, dict]:
    """(byte offset of the data, {tensor name: header entry}) of a safetensors file."""
    from .files import open_safetensors

    with open_safetensors(file):   # a truncated or foreign file: an error naming it
        pass
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header


def model_fingerprint(model_dir: str) -> str:
    """sha256 over what decides the model's answers: config.json and generation_config.json
    (parsed, without the transformers_version a re-save rewrites) and every tensor's name, dtype,
    shape and data (whole up to _FULL_HASH_BYTES of weights, sampled above; see there). Taken
    tensor by tensor in name order, so re-sharding or re-saving the same weights keeps it."""
    digest = hashlib.sha256()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    content = json.load(f)
                except ValueError:
                    content = None
            if isinstance(content, dict):
                content.pop("transformers_version", None)
            digest.update(f"{name}:{_canonical_sha256(content)}\n".encode())
    files = sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.safetensors")))
    if not files:   # not ours to load (safetensors only), but answers came from something
        for path in sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.bin"))):
            digest.update(f"{os.path.basename(path)}:{file_sha256(path)}\n".encode())
        return digest.hexdigest()
    tensors = []
    for file in files:
        start, header = _safetensors_tensors(file)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            tensors.append((name, entry["dtype"], entry["shape"], file, start + begin, end - begin))
    whole = sum(t[5] for t in tensors) <= _FULL_HASH_BYTES
    handles = {}
    try:
        for name, dtype, shape, file, offset, size in sorted(tensors):
            digest.update(f"{name}:{dtype}:{shape}\n".encode())
            f = handles.get(file) or handles.setdefault(file, open(file, "rb"))
            if whole or size <= _SAMPLES * _SAMPLE_BYTES:
                f.seek(offset)
                digest.update(f.read(size))
                continue
            step = (size - _SAMPLE_BYTES) / (_SAMPLES - 1)
            for k in range(_SAMPLES):
                f.seek(offset + int(k * step))
                digest.update(f.read(_SAMPLE_BYTES))
    finally:
        for f in handles.values():
            f.close()
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer does rather than of its files (which a re-save rewrites):
    the vocabulary, the special token ids, its chat template and the encoding of a probe text."""
    return _canonical_sha256({
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special": [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad",
                                                                              "unk")],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=True)),
    })


def provenance_of(config: RunConfig, paths: DistillPaths, tokenizer, central_prompt: str) -> dict:
    """What produces this run's answers. "produced_by" is compared on resume, setting by setting
    (its keys are how the message names them); the rest is a record for the reader."""
    d = config.distill
    sampled = not d.greedy   # greedy decoding never reads temperature or top_p
    return {
        "format": 1,
        "produced_by": {
            "model weights": model_fingerprint(paths.model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "data.chat_template": config.data.chat_template,
            "roles.central_prompt": central_prompt,
            "model.dtype": config.model.dtype,
            "distill.greedy": d.greedy,
            "distill.temperature": d.temperature if sampled else None,
            "distill.top_p": d.top_p if sampled else None,
            "distill.max_new_tokens": d.max_new_tokens,
            "distill.seed": d.seed,
            "distill.max_repeat_fraction": d.max_repeat_fraction,
            "distill.repeat_ngram": d.repeat_ngram,
        },
        "model": paths.model,
        "tokenizer": paths.tokenizer,
        "instructions": paths.instructions,
        "instructions_sha256": file_sha256(paths.instructions),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _shown(key: str, value, record: dict) -> str:
    if key == "model weights":
        return f"{str(value)[:12]} ({record.get('model')})"
    if key == "tokenizer":
        return f"{str(value)[:12]} ({record.get('tokenizer')})"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + '..."'


def provenance_changes(old: dict, new: dict) -> list[str]:
    """"setting: old -> new" for every setting of "produced_by" that differs."""
    before, now = old.get("produced_by", {}), new["produced_by"]
    return [f"{key}: {_shown(key, before.get(key), old)} -> {_shown(key, now[key], new)}"
            for key in now if before.get(key) != now[key]]


def _overwrite(config: RunConfig) -> bool:
    """distill.overwrite, or distill.restart, its former name."""
    return config.distill.overwrite or config.distill.restart


def _move_aside(paths: DistillPaths) -> None:
    """distill.overwrite: the earlier run's files go into <output>.stale-<time>/, none is
    deleted."""
    files = [p for p in (paths.output, paths.rejected, paths.report, paths.provenance,
                         *paths.parts()) if os.path.exists(p)]
    if not files:
        log.info("distill.overwrite = true: no earlier output to move aside")
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{paths.output}.stale-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{paths.output}.stale-{stamp}-{n}"
    os.makedirs(target)
    for path in files:
        os.replace(path, os.path.join(target, os.path.basename(path)))
    log.warning(f"distill.overwrite = true: moved the earlier run's "
                f"{', '.join(os.path.basename(p) for p in files)} to {target}/; every instruction "
                "is answered again (set distill.overwrite back to false, or the next run starts "
                "over too)")


def _foreign_row(path: str) -> str | None:
    """"line N: why" for the first row of `path` that distill did not write (every row it writes
    is a chat ending with the answer, marked "distilled": true); None when all are such rows."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                if not raw.endswith(b"\n"):   # an unfinished last line of an interrupted run
                    return None
                return f"line {number}: not JSON"
            if not isinstance(row, dict) or row.get("distilled") is not True:
                return f"line {number}: no \"distilled\": true"
    return None


def _check_provenance(config: RunConfig, paths: DistillPaths, tokenizer,
                      central_prompt: str) -> str | None:
    """On rank 0: moves earlier files aside when asked to, compares what produced any earlier
    answers with this run, and writes this run's record. Returns the refusal, or None."""
    if _overwrite(config):
        _move_aside(paths)
    current = provenance_of(config, paths, tokenizer, central_prompt)
    earlier = paths.results()
    if earlier:
        foreign = (_foreign_row(paths.output) if not os.path.isfile(paths.provenance)
                   and os.path.isfile(paths.output) else None)
        if foreign:
            key = "distill.output" if config.distill.output else "data.general"
            return (f"{key} = {paths.output} holds rows distill did not write ({foreign}), "
                    "so they are not an earlier run's answers to resume; adding to them would mix "
                    f"the two. Set {key} to a new file, or distill.overwrite = true "
                    "(--distill.overwrite=true) to move it aside and answer every instruction")
        if not os.path.isfile(paths.provenance):
            log.warning(f"distill: {paths.output} holds earlier answers but there is no "
                        f"{paths.provenance} saying what produced them (an older rega-engine or "
                        "another tool wrote them), so they cannot be checked against this run; "
                        "resuming, and recording the current settings from now on. Set "
                        "distill.overwrite = true to answer everything again")
        else:
            from .files import read_json_object
            recorded = read_json_object(paths.provenance, error=ConfigError,
                                        fix="remove it with the output, or set distill.restart = "
                                            "true")
            changes = provenance_changes(recorded, current)
            if changes:
                return (f"the answers in {', '.join(earlier)} were made with other "
                        f"settings than this run's (recorded in {paths.provenance}): "
                        f"{'; '.join(changes)}. "
                        "Adding to them would mix the two. Set distill.overwrite = true "
                        "(--distill.overwrite=true) to move them aside and answer every "
                        "instruction again, set distill.output to a new file, or restore the "
                        "earlier settings")
            if recorded.get("instructions_sha256") != current["instructions_sha256"]:
                log.info(f"distill: distill.instructions = {paths.instructions} changed since the "
                         "earlier run; only instructions without an answer are answered")
    tmp = paths.provenance + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(current, f, indent=2, ensure_ascii=False)
    os.replace(tmp, paths.provenance)
    return None


# -- the job -------------------------------------------------------------------------------------
def distill(config: RunConfig) -> dict:
    """Self-distil general exemplars; returns the report (also printed and written as JSON)."""
    started = time.time()
    validate_config(config)
    paths = resolve_paths(config)
    # gloo: only barriers and a few small objects travel between ranks, whatever the device.
    created_group = distributed.join_torchrun_group("gloo")
    try:
        return _distill(config, paths, distributed.rank(), distributed.world_size(), started)
    finally:
        if created_group:
            distributed.leave_group()


def _distill(config: RunConfig, paths: DistillPaths, rank: int, world: int, started: float) -> dict:
    from .data.render import ChatRenderer, RenderError
    from .data.roles import RoleTable
    from .generation import generate, load_model

    d = config.distill
    roles = RoleTable.from_config(config.roles)
    stats = RowStats()
    records = list(read_instructions(paths.instructions, bad_rows=config.data.bad_rows,
                                     stats=stats))
    if not records:   # every rank reads the same file and stops here, before any collective
        raise DataError(_no_instruction(paths.instructions, stats), "no instruction",
                        paths.instructions)
    keyed, duplicates = [], 0
    seen: set[str] = set()
    for index, record in enumerate(records):
        key = instruction_key(record.messages)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        keyed.append((index, key, record))

    tokenizer = load_tokenizer(paths.tokenizer, "data.tokenizer" if paths.tokenizer != paths.model
                               else "distill.model")
    decision = None
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(paths.output)), exist_ok=True)
        try:
            decision = _check_provenance(config, paths, tokenizer, roles.central_prompt)
        except RegaError as e:   # every rank raises it, none waits for rank 0 forever
            decision = e
    decision = distributed.broadcast_from_rank0(decision)
    if isinstance(decision, RegaError):
        raise decision
    if decision:
        raise ConfigError(decision)
    distributed.barrier()
    # Every rank reads the same files before anyone writes, so all agree on what is pending.
    answered = _read_jsonl_keys(paths.output, _answered_key) if rank == 0 else None
    rejected = _read_jsonl_keys(paths.rejected, lambda row: row["key"]) if rank == 0 else None
    leftovers = {}
    if rank == 0:
        for part in paths.parts():
            leftovers[part] = _read_jsonl_keys(part, lambda row: row["key"])
    answered, rejected, leftovers = distributed.broadcast_from_rank0((answered, rejected,
                                                                      leftovers))
    in_parts = set().union(*leftovers.values()) if leftovers else set()
    done = answered | rejected | in_parts
    pending = [item for item in keyed if item[1] not in done]
    mine = pending[rank::world]
    orphans = len(answered - seen)
    if orphans and rank == 0:
        log.warning(f"distill: {orphans} answers in {paths.output} are to instructions no longer "
                    f"in distill.instructions = {paths.instructions}; they stay in the output "
                    "(and so in training). Set distill.overwrite = true to answer the current "
                    "instructions afresh without them")

    renderer = ChatRenderer(tokenizer, config.data.chat_template)
    prompts, kept_items, unrenderable = [], [], Counter()
    for index, key, record in mine:
        try:
            prompts.append(renderer.render_prompt(record.messages, roles.central_prompt))
        except RenderError as e:
            unrenderable[e.reason] += 1
            log.warning(f"distill: {record.origin}: {e}; instruction skipped")
            continue
        kept_items.append((index, key, record))

    log.info(f"distill: {len(keyed)} instructions from {paths.instructions} "
             f"({len(keyed) - len(pending)} already done, {len(pending)} to answer on {world} "
             f"process(es)); model {paths.model}")
    part_path = paths.part(rank)
    if kept_items:
        from .progress import progress

        model = load_model(paths.model, device="auto", dtype=config.model.dtype)
        # A bar on a terminal, a plain line every train.progress_every_s elsewhere; rank 0's.
        bar = progress(len(prompts), desc="distill", unit="instruction",
                       enabled=rank == 0 and config.train.progress,
                       every_s=config.train.progress_every_s)
        chunk = max(d.batch_size * 8, 1)
        with open(part_path, "a", encoding="utf-8") as part, bar:
            # Written chunk by chunk and flushed: an interruption loses at most one chunk.
            for start in range(0, len(prompts), chunk):
                items = kept_items[start:start + chunk]
                answers = generate(model, tokenizer, prompts[start:start + chunk],
                                   max_new_tokens=d.max_new_tokens, greedy=d.greedy,
                                   temperature=d.temperature, top_p=d.top_p, seed=d.seed,
                                   keys=[key for _, key, _ in items], batch_size=d.batch_size,
                                   progress=bar)
                for (index, key, record), answer in zip(items, answers):
                    part.write(json.dumps(_part_row(index, key, record, answer, d),
                                          ensure_ascii=False) + "\n")
                part.flush()
    distributed.barrier()

    counts = Counter()
    if rank == 0:
        counts = _merge(paths)
    distributed.barrier()
    unrenderable_all = _sum_counters(unrenderable)
    report = None
    if rank == 0:
        total_out = len(_read_jsonl_keys(paths.output, _answered_key))
        report = {
            "instructions": paths.instructions,
            "output": paths.output,
            "model": paths.model,
            "seed": d.seed,
            "sampling": ("greedy" if d.greedy else {"temperature": d.temperature,
                                                    "top_p": d.top_p}),
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
            "provenance": paths.provenance,
            "seconds": round(time.time() - started, 3),
        }
        if counts["answered"] or not os.path.isfile(paths.report):
            with open(paths.report, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        else:   # nothing new: the finished run's report (what it answered, filtered) stays
            log.info(f"distill: nothing new to answer; {paths.report} keeps the report of the run "
                     "that answered them")
        print(format_report(report))
    return distributed.broadcast_from_rank0(report)


def _no_instruction(path: str, stats: RowStats) -> str:
    """Why a distill.instructions file gave no instruction, and what an instruction is."""
    shape = ("an instruction is a chat that ends with the user turn to answer, "
             "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]}")
    read = stats.files.get(path, {}).get("read", 0)
    if not read:
        return (f"distill.instructions = {path}: the file holds no rows; give the general "
                f"instructions: {shape}")
    reasons = ", ".join(f"{reason} {n}" for reason, n in stats.rejected.most_common())
    top = stats.rejected.most_common(1)[0][0]
    origin, detail = stats.first[top]
    if top == "not an instruction" and "'assistant'" in detail:
        hint = ("its rows are chats that already end with an answer (training data, or distill's "
                f"own output?), not instructions: {shape}; point distill.instructions at the "
                "general instructions, or drop the final assistant turns")
    else:
        hint = shape
    return (f"distill.instructions = {path}: none of its {read} rows is an instruction to answer "
            f"({reasons}; first: {origin}: {detail}); {hint}")


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
    with open(paths.output, "a", encoding="utf-8") as out, open(paths.rejected, "a",
                                                                encoding="utf-8") as rej:
        for row in ordered:
            counts["answered"] += 1
            if "row" in row:
                counts["kept"] += 1
                out.write(json.dumps(row["row"], ensure_ascii=False) + "\n")
            else:
                counts[row["rejected"]] += 1
                rej.write(json.dumps({"key": row["key"], "reason": row["rejected"],
                                      "origin": row["origin"],
                                      "messages": row["messages"], "answer": row["answer"]},
                                     ensure_ascii=False) + "\n")
    # Only now, with output and rejected file complete on disk, are the parts redundant.
    for part in paths.parts():
        os.remove(part)
    return counts


def _sum_counters(counter: Counter) -> Counter:
    total = Counter()
    for c in distributed.gather_objects(dict(counter)):
        total.update(c)
    return total


def format_report(report: dict) -> str:
    filtered = report["filtered"]
    lines = [
        f"distilled {report['kept']} of {report['answered']} answers into {report['output']} "
        f"({report['exemplars_in_output']} exemplars in it now; {report['seconds']:.1f} s)",
        "filtered: " + ", ".join(f"{reason} {filtered[reason]}" for reason in FILTER_REASONS),
        f"skipped: already done {report['already_done']}, duplicates {report['duplicates']}, "
        f"bad rows {sum(report['rows_rejected'].values())}, unrenderable "
        f"{sum(report['unrenderable'].values())}",
    ]
    return "\n".join(lines)
