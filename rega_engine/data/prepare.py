"""`rega-engine prepare`: the REGA mixture, rendered and tokenized into a memory-mapped dataset.

Reads the sources (`data.general`, `data.domains`), builds the mixture (rega_engine.data.mixture),
renders each sample under its system prompt with an assistant-only loss mask
(rega_engine.data.render), tokenizes in `data.workers` processes (chunks come back in order, so
the output does not depend on the number of workers) and writes `data.prepared` with
TokenDatasetWriter. Samples longer than `data.seq_len` follow `data.too_long`; samples left
without a loss token are dropped. Nothing is dropped silently: the report printed at the end (and
stored in the dataset's meta.json) counts every row and sample that did not make it.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections import Counter

from ..config import ConfigError, RunConfig, validate_config
from ..kinds import KINDS
from ..log import get_logger
from ..tokenizer import load_tokenizer
from .dataset import TokenDatasetWriter
from .mixture import Mixture, build_mixture, count_samples
from .records import WARN_FIRST, DataError
from .render import ChatRenderer, RenderError

log = get_logger(__name__)

CHUNK = 256             # samples per task sent to a worker


def tokenizer_path(config: RunConfig) -> tuple[str, str]:
    """The tokenizer directory and the config key it came from."""
    if config.data.tokenizer:
        return config.data.tokenizer, "data.tokenizer"
    if config.model.path:
        return config.model.path, "model.path"
    raise ConfigError("no tokenizer: set data.tokenizer (or model.path) to a directory with the tokenizer files")


# -- tokenizing, in worker processes -------------------------------------------------------------
_renderer: ChatRenderer | None = None


def _init_worker(path: str, template: str) -> None:
    global _renderer
    _renderer = ChatRenderer(load_tokenizer(path), template)


def _render_chunk(chunk: list) -> list:
    """[(messages, system, text)] -> [(ids int32, mask uint8) or RenderError]; a sample with text
    (a plain-text pretraining row) is that text alone."""
    out = []
    for messages, system, text in chunk:
        try:
            out.append(_renderer.render_arrays(messages, system) if text is None
                       else _renderer.render_text_arrays(text))
        except RenderError as e:
            out.append(e)
    return out


def _rendered(samples: list, path: str, template: str, workers: int):
    """Yields each sample's rendering, in the order of `samples`."""
    chunks = [[(s.messages, s.system, s.text) for s in samples[i:i + CHUNK]]
              for i in range(0, len(samples), CHUNK)]
    workers = min(workers, len(chunks))
    if workers <= 1:
        _init_worker(path, template)
        for chunk in chunks:
            yield from _render_chunk(chunk)
        return
    # fork where there is one: workers start in milliseconds instead of re-importing transformers.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (path, template)) as pool:
        for result in pool.imap(_render_chunk, chunks):
            yield from result


def _where(origin: str) -> tuple[str, int]:
    path, _, line = origin.rpartition(":")
    return path, int(line)


# -- the job -------------------------------------------------------------------------------------
def prepare(config: RunConfig) -> dict:
    """Tokenize the REGA mixture of `config` into `config.data.prepared`; prints and returns the report."""
    started = time.time()
    validate_config(config)
    data = config.data
    path, key = tokenizer_path(config)
    tokenizer = load_tokenizer(path, key)
    renderer_kind = ChatRenderer(tokenizer, data.chat_template).kind   # fails on a bad setting before reading data
    mixture = build_mixture(config)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    workers = data.workers or os.cpu_count() or 1
    log.info("prepare: %d samples, %s chat template, tokenizer %s, %d process(es)",
             len(mixture.samples), renderer_kind, path,
             min(workers, max(1, -(-len(mixture.samples) // CHUNK))))

    counts = Counter()
    unrenderable = Counter()
    kept = []          # the samples written, for the counts per kind and domain
    warned = 0
    rendered = _rendered(mixture.samples, path, data.chat_template, workers)
    with TokenDatasetWriter(data.prepared, domains=mixture.domains, kind_weights=mixture.kind_weights,
                            pad_id=pad_id, vocab_size=len(tokenizer), seq_len=data.seq_len) as writer, \
            contextlib.closing(rendered):   # an error below also stops the worker pool
        for sample, result in zip(mixture.samples, rendered):
            if isinstance(result, RenderError):
                if data.bad_rows == "error":
                    raise DataError(f"{sample.origin}: {result}", result.reason, *_where(sample.origin))
                unrenderable[result.reason] += 1
                if warned < WARN_FIRST:
                    warned += 1
                    log.warning("%s: %s; sample skipped", sample.origin, result)
                continue
            ids, mask = result
            if len(ids) > data.seq_len:
                if data.too_long == "error":
                    raise DataError(f"{sample.origin}: the rendered sample has {len(ids)} tokens, more than "
                                    f"data.seq_len = {data.seq_len}; raise data.seq_len, or set data.too_long "
                                    "to \"truncate\" or \"drop\"", "too long", *_where(sample.origin))
                if data.too_long == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                ids, mask = ids[:data.seq_len], mask[:data.seq_len]
                counts["truncated"] += 1
            loss_tokens = int(mask.sum())
            if loss_tokens == 0:
                counts["dropped_no_loss"] += 1
                continue
            writer.add(ids, mask, sample.kind, sample.domain)
            kept.append(sample)
            counts["tokens"] += len(ids)
            counts["loss_tokens"] += loss_tokens
        report = _report(config, mixture, kept, counts, unrenderable, path, renderer_kind, started)
        dataset = writer.close(report)
    print(format_report(report))
    if kept:
        report["one_pass"] = one_pass(config, dataset)
        print(report["one_pass"]["text"])
    if not kept:
        log.warning("prepare: no sample was written to %s; see the counts above", data.prepared)
    return report


def one_pass(config: RunConfig, dataset) -> dict:
    """Micro-batches and optimizer steps in one pass over `dataset` for the run's train settings
    and the number of processes torchrun would start (WORLD_SIZE; 1 without it), as train plans them."""
    from ..train.schedule import one_pass_text
    from .loader import PackedLoader

    t = config.train
    world_size = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    loader = PackedLoader(dataset, seq_len=config.data.seq_len, batch_size=t.micro_batch_size,
                          world_size=world_size, seed=t.seed, prefetch=0)
    micro_batches = len(loader)
    text = one_pass_text(micro_batches, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                         world_size=world_size)
    return {"micro_batches_per_rank": micro_batches, "world_size": world_size,
            "optimizer_steps": -(-micro_batches // t.grad_accum),
            "text": f"{text}; for N processes: WORLD_SIZE=N rega-engine prepare ..."}


def _report(config, mixture: Mixture, kept, counts, unrenderable, path, renderer_kind, started) -> dict:
    written = count_samples(kept, mixture.domains)
    return {
        "output": str(config.data.prepared),
        "tokenizer": path,
        "chat_template": renderer_kind,
        "seq_len": config.data.seq_len,
        "rows": mixture.rows.as_dict()["files"],
        "rows_rejected": dict(mixture.rows.rejected),
        "mixture": mixture.counts,
        "samples": {"total": len(kept), **written},
        "samples_unrenderable": dict(unrenderable),
        "truncated": counts["truncated"],
        "dropped_too_long": counts["dropped_too_long"],
        "dropped_no_loss": counts["dropped_no_loss"],
        "tokens": counts["tokens"],
        "loss_tokens": counts["loss_tokens"],
        "seconds": round(time.time() - started, 3),
    }


def format_report(report: dict) -> str:
    lines = [f"prepared {report['output']}: {report['samples']['total']} samples, {report['tokens']} tokens, "
             f"{report['loss_tokens']} loss tokens ({report['seconds']:.1f} s)"]
    lines.append("rows read (kept / rejected / blank lines):")
    for file, c in report["rows"].items():
        lines.append(f"  {file}: {c['read']} ({c['kept']} / {c['rejected']} / {c['blank']})")
    if report["rows_rejected"]:
        lines.append("rows rejected: " + ", ".join(f"{r} {n}" for r, n in sorted(report["rows_rejected"].items())))
    samples = report["samples"]
    lines.append("samples per kind:   " + ", ".join(f"{k} {samples['kind'].get(k, 0)}" for k in KINDS))
    lines.append("samples per domain: " + ", ".join(f"{d} {n}" for d, n in samples["domain"].items()))
    lines.append(f"samples truncated to seq_len {report['seq_len']}: {report['truncated']}")
    dropped = {"too long": report["dropped_too_long"], "without loss tokens": report["dropped_no_loss"],
               **{f"unrenderable ({r})": n for r, n in sorted(report["samples_unrenderable"].items())}}
    lines.append("samples dropped: " + ", ".join(f"{what} {n}" for what, n in dropped.items()))
    return "\n".join(lines)
