"""`rega-engine prepare`: the REGA mixture, rendered and tokenized into a sharded, memory-mapped
dataset.

Reads the sources, builds the mixture (rega_engine.data.mixture), renders each sample under its
system prompt with an assistant-only loss mask (rega_engine.data.render) and writes
`data.prepared` as shards of `data.shard_samples` consecutive samples of the mixture plus one
index (rega_engine.data.dataset, format 2).

Shards are the unit of work and of resumption:
- which samples a shard holds depends on the config alone, never on how many processes prepare
  it, so any number of processes writes the same bytes;
- several processes share the work: under torchrun each process takes the shards k with
  k % WORLD_SIZE == RANK; with `--shard i/n` (a job array, no process group) process i of n does
  the same. Each process tokenizes in `data.workers` worker processes of its own;
- a shard is written under a temporary name and renamed when complete, with the fingerprint of
  the config that made it; a prepare run that finds a complete shard of the same fingerprint
  keeps it once its files match the sha256 sums of its shard.json (a damaged one is written
  again), so an interrupted prepare resumes from its complete shards; the temporaries a process
  that died left of its shards are removed first;
- a finished dataset (meta.json) of another config is refused as an output unless
  data.overwrite: a rerun must not replace a dataset another run may train on;
- a write that fails (a full disk) ends in one line naming the disk and the folder, and keeps
  the complete shards;
- the index (meta.json) is written once every shard is complete, by whichever process finds the
  last shard complete (two that finish together may both write it: the contents are equal).
  Processes never talk to each other, torchrun's included (no process group: it would import
  torch and cost every process seconds); the shared output directory is all they share.

Samples longer than `data.seq_len` follow `data.too_long`, except plain-text documents, which are
split into pieces of seq_len tokens (`data.split_documents`); samples left without a loss token
are dropped. Nothing is dropped silently: every shard counts what did not make it, the index sums
the counts over all shards (so over all processes), and the report printed at the end shows them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from .. import __version__
from ..config import ConfigError, RunConfig, validate_config
from ..files import describe_disk, disk_full, first_line
from ..kinds import KINDS
from ..log import get_logger
from ..tokenizer import load_tokenizer
from .dataset import (
    DATA_FILES,
    META_FILE,
    dataset_file,
    read_shard_record,
    shard_damage,
    write_index,
)
from .mixture import Mixture, build_mixture
from .render import ChatRenderer
from .shard_render import CHUNK, Renderers, Warnings, write_shard

log = get_logger(__name__)

# Files of a tokenizer directory that are not the tokenizer (weights of a model directory).
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")


def tokenizer_path(config: RunConfig) -> tuple[str, str]:
    """The tokenizer directory and the config key it came from."""
    if config.data.tokenizer:
        return config.data.tokenizer, "data.tokenizer"
    if config.model.path:
        return config.model.path, "model.path"
    raise ConfigError("no tokenizer: set data.tokenizer (or model.path) to a directory with the "
                      "tokenizer files")


AUTO_SHARDS = 64        # data.shard_samples = 0: this many shards, within the bounds below
AUTO_SHARD_SAMPLES = (1024, 16384)


def shard_size(shard_samples: int, total: int) -> int:
    """Samples per shard: data.shard_samples, or for 0 enough shards that up to AUTO_SHARDS
    processes get an even share (a process's share is whole shards), each within
    AUTO_SHARD_SAMPLES. A function of the config alone, like everything about the layout."""
    if shard_samples:
        return shard_samples
    low, high = AUTO_SHARD_SAMPLES
    return min(high, max(low, -(-total // AUTO_SHARDS)))


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard i/n` -> (i, n), 0 <= i < n."""
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. --shard 0/4 for the first of 4 "
                          "processes") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: expected 0 <= i < n")
    return index, count


# -- the fingerprint: what a shard's bytes depend on ---------------------------------------------
def _tokenizer_digest(path: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file) and not name.endswith(_NOT_TOKENIZER):
            digest.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _source_files(data) -> list[str]:
    paths = [data.general, *data.domains.values(), *data.files, *data.pretrain]
    for value in data.corpora.values():
        paths += value if isinstance(value, list) else [value]
    return [p for p in paths if p]


def run_fingerprint(config: RunConfig, tokenizer_dir: str) -> tuple[str, dict]:
    """(sha256, the settings it covers): the config keys that shape the dataset, the tokenizer's
    files, each source file's size and modification time, and this rega-engine's version."""
    data = dataclass_dict(config.data)
    for key in ("workers", "prepared", "memory_gb", "overwrite", "verify"):   # how, not what
        data.pop(key, None)
    sources = {}
    for p in _source_files(config.data):
        try:
            st = os.stat(p)
            sources[p] = [st.st_size, st.st_mtime_ns]
        except OSError:
            sources[p] = None
    settings = {"rega_engine": __version__, "data": data, "roles": dataclass_dict(config.roles),
                "tokenizer": _tokenizer_digest(tokenizer_dir), "sources": sources}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), settings


def dataclass_dict(value) -> dict:
    import dataclasses
    return json.loads(json.dumps(dataclasses.asdict(value), default=str))


# -- the job -------------------------------------------------------------------------------------
def _this_process(shard: tuple[int, int] | str | None) -> tuple[int, int, bool]:
    """(index, count, under torchrun) of this process among those sharing the prepare."""
    if shard is not None:
        index, count = parse_shard(shard) if isinstance(shard, str) else shard
        return index, count, False
    # as distributed.launched_by_torchrun(), which would import torch for a single process
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), True
    return 0, 1, False


def _clear_stale(out: Path, fingerprint: str, settings: dict, overwrite: bool) -> None:
    """Makes `out` a place to build this config's dataset: refuses a directory holding anything
    else, and a finished dataset of another config unless data.overwrite; then drops that index
    and the files of a format-1 dataset. A finished dataset of this very config stays (a rerun
    verifies it), and so do the shards of an unfinished one (a rerun resumes from them)."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"data.prepared = {out} exists and is not a directory; choose "
                                  "another")
        foreign = sorted(p.name for p in out.iterdir() if not dataset_file(p.name))
        if foreign:
            raise FileExistsError(f"data.prepared = {out} holds files that are not a prepared "
                                  f"dataset ({', '.join(foreign[:3])}); choose another output "
                                  "directory or remove it")
    out.mkdir(parents=True, exist_ok=True)
    meta = out / META_FILE
    try:
        old = json.loads(meta.read_text())
        stale = old.get("fingerprint") != fingerprint
    except (OSError, ValueError, AttributeError):
        # no index (an unfinished prepare), or one too damaged to be anybody's finished dataset
        old, stale = None, meta.exists()
    if stale and isinstance(old, dict) and not overwrite:
        raise FileExistsError(
            f"data.prepared = {out} holds a finished prepared dataset made from another config "
            f"({_what_differs(old, settings)}); pass --data.overwrite=true to replace it, or "
            "choose another data.prepared")
    if stale:
        meta.unlink(missing_ok=True)
    for name in DATA_FILES:   # a format-1 dataset written here before
        (out / name).unlink(missing_ok=True)


def _what_differs(old: dict, settings: dict) -> str:
    """The settings of `old` (a meta.json) that differ from `settings`, as 'key old -> new'."""
    if old.get("format") != 2 or not isinstance(old.get("config"), dict):
        return f"a dataset of format {old.get('format')!r}, written by another version"

    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items()
                    for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    before, after = flat(old["config"]), flat(settings)
    changed = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) == after.get(key):
            continue
        if key.startswith("sources."):
            changed.append(f"{key[len('sources.'):]} changed (size or modification time)")
        elif key == "tokenizer":
            changed.append("the tokenizer's files changed")
        else:
            changed.append(f"{key} {_short(before.get(key))} -> {_short(after.get(key))}")
    if not changed:
        return "its fingerprint differs"
    return ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def _short(value, width: int = 48) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else f"{text[:width // 2 - 2]}...{text[-(width // 2 - 1):]}"


def _remove_stale_temporaries(out: Path, prefixes: list[str]) -> int:
    """Removes the temporary files and directories under `out` whose names start with one of
    `prefixes`: what a prepare that died (killed, or a full disk) left behind. Only names this
    process alone may own are passed in, so a live process's work is never removed."""
    removed = 0
    for path in out.iterdir():
        if path.name.startswith(tuple(prefixes)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def prepare(config: RunConfig, *, shard: tuple[int, int] | str | None = None) -> dict:
    """Tokenize the REGA mixture of `config` into `config.data.prepared`; prints and returns the
    report. `shard` = (i, n) or "i/n": this is process i of n sharing the work (default: torchrun's
    RANK and WORLD_SIZE, or the only process)."""
    started = time.time()
    validate_config(config)
    index, count, torchrun = _this_process(shard)
    return _prepare(config, index, count, torchrun, started)


def _prepare(config: RunConfig, index: int, count: int, torchrun: bool, started: float) -> dict:
    data = config.data
    path, key = tokenizer_path(config)
    tokenizer = load_tokenizer(path, key)
    # fails on a bad setting before reading data
    renderer_kind = ChatRenderer(tokenizer, data.chat_template).kind
    fingerprint, settings = run_fingerprint(config, path)
    out = Path(data.prepared)
    created = not out.exists()
    _clear_stale(out, fingerprint, settings, data.overwrite)
    if count == 1:
        # The planning scratch (.plan-*) and index temporaries of a process that died; with
        # several processes another one's may be alive, and the shard temporaries below (each
        # process's own shards) are what matter for the disk.
        removed = _remove_stale_temporaries(out, [".plan-", f".{META_FILE}.tmp-"])
        if removed:
            log.info("prepare: removed %d temporary file(s) left in %s by an earlier prepare "
                     "that stopped", removed, out)
    try:
        try:
            # tables past data.memory_gb are mapped from files in the output directory
            mixture = build_mixture(config, tokenizer=tokenizer, template=data.chat_template,
                                    scratch=out)
            return _prepare_shards(config, mixture, tokenizer, path, renderer_kind, fingerprint,
                                   settings, out, index, count, torchrun, started)
        except WriteFailed:
            raise
        except OSError as e:
            # The planning files (data.memory_gb) and the index are written to `out` too.
            if e.errno not in _DISK_ERRNOS or (e.filename is not None
                                               and not _inside(e.filename, out)):
                raise
            raise _write_failed(e, "", out, None) from None
    except BaseException:
        # Complete shards stay for the next run to resume from; an empty directory is not left
        # behind.
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _prepare_shards(config, mixture, tokenizer, path, renderer_kind, fingerprint, settings,
                    out: Path,
                    index: int, count: int, torchrun: bool, started: float) -> dict:
    data = config.data
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    samples = mixture.samples
    per_shard = shard_size(data.shard_samples, len(samples))
    num_shards = max(1, math.ceil(len(samples) / per_shard))
    names = [f"shard_{k:05d}" for k in range(num_shards)]
    mine = list(range(index, num_shards, count))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if torchrun else 1
    workers = data.workers or max(1, (os.cpu_count() or 1) // local)
    # no more workers than one shard has chunks for
    workers = min(workers, max(1, -(-min(per_shard, len(samples)) // CHUNK)))
    # Each shard belongs to one process: the temporaries of this process's shards were left by
    # an earlier run that died (killed, or a full disk) and are removed before anything is written.
    prefixes = ([".shard_"] if count == 1 else
                [f".{names[k]}.{kind}-" for k in mine for kind in ("tmp", "replaced")])
    removed = _remove_stale_temporaries(out, prefixes)
    if removed:
        log.info("prepare: removed %d temporary shard(s) left in %s by an earlier prepare that "
                 "stopped", removed, out)
    todo = [k for k in mine if not _reusable(out / names[k], fingerprint)]
    where = f" (process {index} of {count})" if count > 1 else ""
    log.info("prepare%s: %d samples in %d shard(s) of %d, %d of them this process's, %d already "
             "complete; %s chat template, tokenizer %s, %d worker process(es)", where, len(samples),
             num_shards, per_shard,
             len(mine), len(mine) - len(todo), renderer_kind, path, workers)

    if todo:
        renderers = Renderers(tokenizer, path, data.chat_template, workers)
        warn = Warnings()
        try:
            for done, k in enumerate(todo):
                first = k * per_shard
                try:
                    write_shard(out / names[k], samples[first:first + per_shard], renderers, data,
                                fingerprint, first, warn)
                except OSError as e:
                    if e.errno not in _DISK_ERRNOS or (e.filename is not None
                                                       and not _inside(e.filename, out)):
                        raise   # a source file the user named: the CLI says which, as ever
                    raise _write_failed(e, names[k], out, done) from None
        finally:
            renderers.close()

    # The sample tables are done with: freed before the index and the one-pass report (which
    # plans the loader over the whole dataset), so the two never hold memory at once.
    mixture.samples = samples = None
    records = [read_shard_record(out / name) for name in names]
    complete = all(r is not None and r.get("fingerprint") == fingerprint for r in records)
    report = None
    if complete:
        with _IndexLock(out):
            if _index_written_since(out, fingerprint, started):
                print(f"prepare{where}: wrote {len(todo)} shard(s) to {out}; another process "
                      "completed the last shard at the same time and wrote the index")
                return {"output": str(out), "shards_written": len(todo),
                        "shards_complete": num_shards, "shards": num_shards}
            meta = _index(config, mixture, records, names, pad_id, len(tokenizer), path,
                          renderer_kind, fingerprint, settings)
            for stale in out.iterdir():   # shards of an earlier, larger mixture
                if stale.name.startswith("shard_") and stale.name not in names:
                    shutil.rmtree(stale, ignore_errors=True)
            write_index(out, meta)
        report = {"output": str(out), **meta["report"], "seconds": round(time.time() - started, 3)}
    if report is None:
        done = sum(r is not None and r.get("fingerprint") == fingerprint for r in records)
        print(f"prepare{where}: wrote {len(todo)} shard(s) to {out}; {done} of {num_shards} "
              "complete, the index is written by the process that completes the last one")
        return {"output": str(out), "shards_written": len(todo), "shards_complete": done,
                "shards": num_shards}
    print(format_report(report))
    from .dataset import TokenDataset
    if report["samples"]["total"]:
        report["one_pass"] = one_pass(config, TokenDataset(out))
        print(report["one_pass"]["text"])
    else:
        log.warning("prepare: no sample was written to %s; see the counts above", data.prepared)
    return report


def _reusable(shard: Path, fingerprint: str) -> bool:
    """Whether a shard left by an earlier run is this config's and whole: its shard.json has this
    fingerprint, its files their sizes and their sha256 sums. A damaged one is said and written
    again. Hashing costs one read of the shard, only on a rerun."""
    record = read_shard_record(shard)
    if (record or {}).get("fingerprint") != fingerprint:
        return False
    damage = shard_damage(shard, record)
    if damage:
        log.warning("prepare: %s: the shard is damaged; writing it again", damage)
        return False
    return True


def _inside(file, directory: Path) -> bool:
    return Path(os.path.abspath(file)).is_relative_to(os.path.abspath(directory))


class WriteFailed(OSError):
    """A write to data.prepared failed (a full disk): an OSError naming the folder, so the CLI
    prints it as one line, `<folder>: <what, which disk, what to do>`, exit 1."""


# The errors of a write that no path of the user's explains: the disk or a quota is full, the
# file-size limit is reached, the device fails or is read-only.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


def _write_failed(error: OSError, shard: str, out: Path, done: int | None) -> WriteFailed:
    """A failed write (a full disk, a quota, a failing device) as one line for the CLI: which
    disk, which folder, what is kept and what to do."""
    full = disk_full(error, out)
    reason = "no space left on device" if full else (error.strerror or first_line(error))
    fix = "free space" if full else "fix what stopped the write"
    kept = ("the complete shards are kept" if done is None else
            f"the {done} shard(s) this run completed before are kept")
    return WriteFailed(error.errno, f"writing {shard or 'to it'} failed: {reason} "
                       f"({describe_disk(out)}); {kept} and its temporary files removed: {fix} "
                       "and run `rega-engine prepare` again, it resumes from the complete shards",
                       str(out))


class _IndexLock:
    """An exclusive lock on <out>/.index.lock around "index already written? write it": two
    processes that complete their last shards at the same moment would otherwise both see the
    dataset complete and both print its report. Where the filesystem has no locks, the race is
    only that: the index both write is the same bytes."""

    def __init__(self, out: Path):
        self.path, self.fd = out / ".index.lock", None

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        # Removed while still held: a process that opens the name afterwards makes a new file,
        # and by then the index it will find is already written. No dot file stays behind.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)   # releases the lock


def _index_written_since(out: Path, fingerprint: str, started: float) -> bool:
    """Whether another process of this prepare wrote the index of `fingerprint` after this one
    started (an older index is an earlier run's: this process writes it again and reports)."""
    try:
        if os.path.getmtime(out / META_FILE) < started:
            return False
        with open(out / META_FILE, encoding="utf-8") as f:
            return json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _index(config, mixture: Mixture, records: list, names: list, pad_id: int, vocab_size: int,
           path: str,
           renderer_kind: str, fingerprint: str, settings: dict) -> dict:
    totals, unrenderable = Counter(), Counter()
    by_kind, by_domain, by_pair, tokens_kind, tokens_domain = (Counter() for _ in range(5))
    tokens_pair = Counter()
    for r in records:
        totals.update(r["counts"])
        unrenderable.update(r["unrenderable"])
        by_kind.update({int(k): v for k, v in r["samples_by_kind"].items()})
        by_domain.update({int(k): v for k, v in r["samples_by_domain"].items()})
        by_pair.update(r["samples_by_pair"])
        tokens_kind.update({int(k): v for k, v in r["tokens_by_kind"].items()})
        tokens_domain.update({int(k): v for k, v in r["tokens_by_domain"].items()})
        tokens_pair.update({tuple(map(int,
                                      k.split("/"))): v for k, v in r["tokens_by_pair"].items()})
    domains = mixture.domains
    pairs = {}
    for pair, n in sorted(by_pair.items(), key=lambda item: tuple(map(int, item[0].split("/")))):
        k, d = map(int, pair.split("/"))
        pairs[f"{KINDS[k]}/{domains[d]}"] = n
    num_tokens = sum(r["num_tokens"] for r in records)
    report = {   # the stored report: what the config decides, so every run writes the same bytes
        "tokenizer": path,
        "chat_template": renderer_kind,
        "seq_len": config.data.seq_len,
        "rows": mixture.rows.as_dict()["files"],
        "rows_rejected": dict(mixture.rows.rejected),
        "mixture": mixture.counts,
        "samples": {"total": sum(by_kind.values()),
                    "kind": {name: by_kind.get(i, 0) for i, name in enumerate(KINDS)},
                    "domain": {name: by_domain.get(i, 0) for i, name in enumerate(domains)},
                    "kind_domain": pairs},
        "rows_written": sum(r["num_samples"] for r in records),
        "tokens_by_kind": {name: tokens_kind.get(i, 0) for i, name in enumerate(KINDS)},
        "tokens_by_domain": {name: tokens_domain.get(i, 0) for i, name in enumerate(domains)},
        "token_shares": mixture.shares,
        "samples_unrenderable": dict(sorted(unrenderable.items())),
        "truncated": totals["truncated"],
        "dropped_too_long": totals["dropped_too_long"],
        "dropped_no_loss": totals["dropped_no_loss"],
        "split_documents": totals["split_documents"],
        "document_pieces": totals["document_pieces"],
        "dropped_piece_no_loss": totals["dropped_piece_no_loss"],
        "tokens": totals["tokens"],
        "loss_tokens": totals["loss_tokens"],
        "shards": len(records),
    }
    if report["token_shares"]:
        report["token_shares"] = {**mixture.shares, "achieved": _achieved_shares(mixture,
                                                                                 tokens_pair)}
    return {
        "num_samples": sum(r["num_samples"] for r in records),
        "num_tokens": num_tokens,
        "domains": list(domains),
        "kinds": list(KINDS),
        "kind_weights": mixture.kind_weights,
        "pad_id": int(pad_id),
        "vocab_size": int(vocab_size),
        "seq_len": int(config.data.seq_len),
        "shards": [{"name": name, "num_samples": r["num_samples"], "num_tokens": r["num_tokens"],
                    "sha256": r["sha256"]} for name, r in zip(names, records)],
        "fingerprint": fingerprint,
        "config": settings,
        "report": report,
    }


def _achieved_shares(mixture: Mixture, tokens_by_pair: Counter) -> dict:
    """Share of the written tokens per source of data.sizes: general (distilled), each domain (role
    and integration samples), pretrain (data.pretrain and data.corpora)."""
    total = sum(tokens_by_pair.values()) or 1
    per_source = Counter()
    for (kind, domain), n in tokens_by_pair.items():
        name = KINDS[kind]
        source = "pretrain" if name == "pretrain" else mixture.domains[domain]
        per_source[source] += n
    return {source: round(per_source[source] / total, 4) for source in mixture.shares.get("target",
                                                                                          {})}


def one_pass(config: RunConfig, dataset) -> dict:
    """Micro-batches and optimizer steps in one pass over `dataset` for the run's train settings
    and the number of processes torchrun would start (WORLD_SIZE; 1 without it), as train plans
    them."""
    from ..train.schedule import one_pass_text
    from .loader import PackedLoader

    t = config.train
    world_size = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    loader = PackedLoader(dataset, seq_len=config.data.seq_len, batch_size=t.micro_batch_size,
                          world_size=world_size, seed=t.seed, prefetch=0, pin_memory=False)
    micro_batches = len(loader)
    text = one_pass_text(micro_batches, micro_batch_size=t.micro_batch_size,
                         grad_accum=t.grad_accum,
                         world_size=world_size)
    return {"micro_batches_per_rank": micro_batches, "world_size": world_size,
            "optimizer_steps": -(-micro_batches // t.grad_accum),
            "text": f"{text}; for N processes: WORLD_SIZE=N rega-engine prepare ..."}


def format_report(report: dict) -> str:
    lines = [f"prepared {report['output']}: {report['samples']['total']} samples, "
             f"{report['tokens']} tokens, {report['loss_tokens']} loss tokens in "
             f"{report.get('shards', 1)} shard(s) ({report.get('seconds', 0):.1f} s)"]
    lines.append("rows read (kept / rejected / blank lines):")
    for file, c in report["rows"].items():
        lines.append(f"  {file}: {c['read']} ({c['kept']} / {c['rejected']} / {c['blank']})")
    if report["rows_rejected"]:
        lines.append("rows rejected: " + ", ".join(f"{r} {n}"
            for r, n in sorted(report["rows_rejected"].items())))
    samples = report["samples"]
    lines.append("samples per kind:   " + ", ".join(f"{k} {samples['kind'].get(k, 0)}"
                                                    for k in KINDS))
    lines.append("samples per domain: " + ", ".join(f"{d} {n}"
                                                    for d, n in samples["domain"].items()))
    lines.append("tokens per domain:  " + ", ".join(f"{d} {n}"
                                                    for d, n in report["tokens_by_domain"].items()))
    shares = report.get("token_shares") or {}
    if shares.get("achieved"):
        lines.append("token shares (target -> achieved): " + ", ".join(
            f"{s} {shares['target'][s]:.1%} -> {a:.1%}" for s, a in shares["achieved"].items()))
    if report.get("split_documents"):
        lines.append(f"documents longer than seq_len split into rows: {report['split_documents']} "
                     f"({report['document_pieces']} pieces)")
    lines.append(f"samples truncated to seq_len {report['seq_len']}: {report['truncated']}")
    dropped = {"too long": report["dropped_too_long"],
               "without loss tokens": report["dropped_no_loss"],
               **{f"unrenderable ({r})": n
                  for r, n in sorted(report["samples_unrenderable"].items())}}
    lines.append("samples dropped: " + ", ".join(f"{what} {n}" for what, n in dropped.items()))
    return "\n".join(lines)
