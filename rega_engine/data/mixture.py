"""The REGA training mixture: which samples, under which system prompt, of which kind.

- distilled: the general exemplars of `data.general` (self-distillation), under the central prompt;
- role: each domain's samples (`data.domains`), under the domain's role prompt;
- integration: `data.integration_fraction` of each domain's selected samples, again, under the
  central prompt (role integration); they also stay in `role`.
Each part can be switched off by configuration alone (`self_distillation`, `role_prompts`:
false puts every sample under the central prompt, `role_integration`).

Two more sources:
- `data.files`: JSONL files holding several domains, read once each; every row's own `domain`
  ("general" or a domain of the role table) says which source it joins (a row without one is
  rejected and counted). Its general rows join `data.general`'s, its domain rows that domain's.
- pretrain: the rows of `data.pretrain` (chats under the central prompt, or `{"text": ...}` plain
  text trained on every token), for training a base model, in the general domain; and the
  plain-text documents of `data.corpora` (continued pretraining on a domain's corpus next to the
  chat data), in their corpus's domain, after its role prompt when `data.corpus_prompt` is set.
  Together they are the source "pretrain" of data.sizes; absent from it, every row once,
  whatever the REGA switches say.

`data.sizes` sets the samples per source ("general", a domain, "pretrain"): fewer than the source
holds is a seeded sample without replacement, more repeats whole passes and samples the rest,
absent takes all. Given as shares of the mixture's tokens ("60%"), each source's mean rendered
length is measured on a seeded sample of its rows (SHARE_PROBE rows), the mixture keeps the
token total it has with every row once, and each source gets the sample count whose tokens make
its share of that total (a domain's integration samples count towards its share); prepare
reports the shares achieved. Everything is a function of `data.seed` and the files: the same
config gives the same mixture, in the same shuffled order.

At any size: the mixture is planned as numpy tables (rega_engine.data.tables), never as one
Python object a sample: each source's accepted rows are references (file, line, byte offset and
length; the content stays in the file and is read again when rendered), and the mixture a table
of (source, row, kind, domain, prompt), ~50 bytes a sample in all. Tables stay in memory up to
`data.memory_gb` and beyond it are file-backed memory maps, so planning 100M samples needs no
more memory than the setting. Sizes are drawn block by block (how many of a block's rows a
sample takes is a hypergeometric draw, then which ones), and the order is a uniform shuffle done
in buckets of a few million samples; neither depends on the memory setting.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError, RunConfig, size_share, validate_config
from ..kinds import GENERAL_DOMAIN, KIND_ID, KINDS, check_kind_weights
from ..log import get_logger
from . import tables
from .records import (
    RowStats,
    load_content,
    read_documents,
    read_pretrain,
    read_samples,
    read_tagged_samples,
)
from .roles import RoleTable, check_declared_domains
from .tables import TableStore, choose_sorted, seeded_rng, shuffle_into

log = get_logger(__name__)

# An accepted row: where it is, and (for the pretrain source, whose rows differ in this) the
# domain and system prompt it trains under.
ROW = np.dtype([("file", "<i4"), ("line", "<i8"), ("offset", "<i8"), ("length", "<i8"),
                ("text", "?"), ("domain", "<i2"), ("prompt", "<i2")])
# A sample of the mixture: row `row` of source table `source`, its kind, domain and prompt.
SAMPLE = np.dtype([("source", "<i2"), ("row", "<i8"), ("kind", "u1"), ("domain", "<i2"),
                   ("prompt", "<i2")])
MEMORY_SLACK = 0.75     # of data.memory_gb for the tables; the rest for the reading itself


class Sample:
    """One training sample: the row it comes from, the system prompt it trains under, its kind
    and domain. A mixture's samples are views of its tables: they keep where their row is (file,
    byte offset, length) and read the content again when `messages` or `text` is asked for;
    built in code with content, a Sample keeps that content."""
    __slots__ = ("system", "kind", "domain", "path", "line", "offset", "length", "is_text",
                 "_messages", "_text")

    def __init__(self, messages: tuple, system: str, kind: int, domain: int, origin: str = "",
                 text: str | None = None):
        path, _, line = origin.rpartition(":")
        self.system, self.kind, self.domain = system, kind, domain
        self.path, self.line = path, int(line) if line.isdigit() else 0
        self.offset = self.length = -1
        self.is_text = text is not None
        self._messages, self._text = tuple(messages), text

    @classmethod
    def of_row(cls, row: tuple, system: str, kind: int, domain: int) -> Sample:
        """From a row reference (path, line, offset, length, is_text): the content stays in the
        file."""
        sample = cls.__new__(cls)
        sample.system, sample.kind, sample.domain = system, kind, domain
        sample.path, sample.line, sample.offset, sample.length, sample.is_text = row
        sample._messages = sample._text = None
        return sample

    @property
    def messages(self) -> tuple:
        if self._messages is not None:
            return self._messages
        return () if self.is_text else load_content(self.path, self.offset, self.length, False)

    @property
    def text(self) -> str | None:
        """A plain-text document's text (trained as this text alone); None for a chat."""
        if not self.is_text or self._text is not None:
            return self._text
        return load_content(self.path, self.offset, self.length, True)

    @property
    def origin(self) -> str:
        """"path:line" of the row it came from."""
        return f"{self.path}:{self.line}"

    def _key(self) -> tuple:
        return (self.system, self.kind, self.domain, self.path, self.line, self.offset,
                self.is_text, self._messages, self._text)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sample) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key()[:7])

    def __repr__(self) -> str:
        return (f"Sample({self.origin}, kind={self.kind}, domain={self.domain}, "
                f"system={self.system!r})")


class Samples(Sequence):
    """The mixture's samples, in order, as a sequence of `Sample` views of its tables; a slice is
    another such sequence (nothing is copied but the slice of the sample table)."""

    def __init__(self, table: np.ndarray, sources: list, paths: list, prompts: list):
        self.table, self.sources, self.paths, self.prompts = table, sources, paths, prompts

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Samples(self.table[index], self.sources, self.paths, self.prompts)
        s = self.table[index]
        r = self.sources[s["source"]][s["row"]]
        return Sample.of_row((self.paths[r["file"]], int(r["line"]), int(r["offset"]),
                              int(r["length"]), bool(r["text"])), self.prompts[s["prompt"]],
                             int(s["kind"]), int(s["domain"]))

    def rows(self) -> np.ndarray:
        """The ROW records of these samples, in order (gathered source by source)."""
        out = np.empty(len(self.table), ROW)
        source, row = np.asarray(self.table["source"]), np.asarray(self.table["row"])
        for s in np.unique(source):
            at = np.flatnonzero(source == s)
            out[at] = self.sources[s][row[at]]
        return out

    def references(self) -> list[tuple]:
        """[(path, line, offset, length, is_text, system, kind, domain)] of these samples."""
        rows, table = self.rows(), self.table
        paths, prompts = self.paths, self.prompts
        return [(paths[f], line, offset, length, text, prompts[p], kind, domain)
                for f, line, offset, length, text, p, kind, domain in zip(
                    rows["file"].tolist(), rows["line"].tolist(), rows["offset"].tolist(),
                    rows["length"].tolist(), rows["text"].tolist(), table["prompt"].tolist(),
                    table["kind"].tolist(), table["domain"].tolist())]

    def __eq__(self, other) -> bool:
        return (isinstance(other, Samples) and len(self) == len(other)
                and self.references() == other.references())

    __hash__ = None


@dataclass
class Mixture:
    samples: Samples
    domains: list                  # domain names by id
    kind_weights: dict             # kind name -> loss weight
    rows: RowStats                 # what was read and rejected
    # {"kind": {...}, "domain": {...}, "kind_domain": {...}}
    counts: dict = field(default_factory=dict)
    # data.sizes as token shares: target, measured lengths, counts
    shares: dict = field(default_factory=dict)
    # bytes of the planning tables held in memory and mapped from files
    table_bytes: dict = field(default_factory=dict)


SHARE_PROBE = 256       # rows per source rendered to measure its mean length for token shares


def select(num_rows: int, n: int | None, rng: np.random.Generator):
    """Yields, block by block, the row indices of a source's `n` selected rows: all (None), a
    sample without replacement (n <= num_rows), or whole passes then a sample of the rest."""
    if n is None:
        n = num_rows
    passes, rest = divmod(n, num_rows) if num_rows else (0, n)
    if rest and not num_rows:
        raise ValueError("cannot select from an empty source")
    for _ in range(passes):
        for start in range(0, num_rows, tables.BLOCK):
            yield np.arange(start, min(num_rows, start + tables.BLOCK), dtype=np.int64)
    if rest:
        yield from choose_sorted(num_rows, rest, rng)


def _sizes(data) -> dict:
    """data.sizes with token shares left out (they become counts once lengths are measured)."""
    return {k: v for k, v in data.sizes.items() if not isinstance(v, str)}


class _Prompts:
    """System prompts by id (a sample table stores the id)."""

    def __init__(self):
        self.texts: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        if text not in self._ids:
            self._ids[text] = len(self.texts)
            self.texts.append(text)
        return self._ids[text]


def build_mixture(config: RunConfig, *, tokenizer=None, template: str | None = None,
                  scratch: str | os.PathLike | None = None) -> Mixture:
    """Read the sources of `config.data` and build the shuffled REGA mixture. `tokenizer` (loaded
    from data.tokenizer when needed and not given) measures lengths for token shares only;
    `scratch` is where tables past data.memory_gb are mapped from (default: the system's
    temporary directory)."""
    validate_config(config)
    data = config.data
    roles = RoleTable.from_config(config.roles)
    roles.check_domains(data.domains)
    kind_weights = check_kind_weights(data.kind_weights)   # as floats, in KINDS order
    sizes = _sizes(data)
    shares = {k: size_share(v) for k, v in data.sizes.items() if isinstance(v, str)}
    if data.self_distillation and not (data.general or data.files or data.pretrain or data.corpora):
        raise ConfigError("data.general is empty but data.self_distillation = true: set "
                          "data.general to the distilled exemplars (rega-engine distill), or "
                          "data.self_distillation = false")
    sources = {f"data.domains.{d}": p for d, p in data.domains.items()}
    if data.self_distillation and data.general:
        sources["data.general"] = data.general
    sources.update({f"data.files[{i}]": p for i, p in enumerate(data.files)})
    sources.update({f"data.pretrain[{i}]": p for i, p in enumerate(data.pretrain)})
    corpora = {d: (p if isinstance(p, list) else [p]) for d, p in data.corpora.items()}
    for d, paths in corpora.items():
        sources.update({f"data.corpora.{d}[{i}]": p for i, p in enumerate(paths)})
    for key, path in sources.items():
        if os.path.isdir(path):
            raise ConfigError(f"{key} = {path!r} is a directory; give the JSONL file in it")
        if not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")

    known = roles.domains
    rows = RowStats()
    store = TableStore(data.memory_gb * 2**30 * MEMORY_SLACK, scratch)
    paths: list[str] = []
    prompts = _Prompts()
    central = prompts.id(roles.central_prompt)

    def fill(appender, records, key: str, path: str, needed: bool = True, prompt_of=None,
             domain: int = 0) -> None:
        """Appends the references of `records` (all from `path`) to a source's table."""
        file_id, before = len(paths), len(appender)
        paths.append(path)
        for r in records:
            text = r.text is not None
            appender.append((file_id, r.line, r.offset, r.length, text, domain,
                             prompt_of(text) if prompt_of else 0))
        if len(appender) == before and needed:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")

    # Each source's rows: its own file first, then those of data.files naming it, in file order.
    pooled = {GENERAL_DOMAIN: store.appender(ROW), **{d: store.appender(ROW)
                                                      for d in data.domains}}
    if data.self_distillation and data.general:
        fill(pooled[GENERAL_DOMAIN], read_samples(
            data.general, source=GENERAL_DOMAIN, known_domains=known, bad_rows=data.bad_rows,
            stats=rows), "data.general", data.general, sizes.get(GENERAL_DOMAIN, 1) > 0)
    for domain, path in data.domains.items():
        fill(pooled[domain], read_samples(path, source=domain, known_domains=known,
                                          bad_rows=data.bad_rows, stats=rows),
             f"data.domains.{domain}", path, sizes.get(domain, 1) > 0)
    left_out = 0
    for i, path in enumerate(data.files):
        key, file_id, kept = f"data.files[{i}]", len(paths), 0
        paths.append(path)
        for r in read_tagged_samples(path, source_key=key, known_domains=known,
                                     bad_rows=data.bad_rows, stats=rows):
            kept += 1
            if r.domain == GENERAL_DOMAIN and not data.self_distillation:
                left_out += 1
                continue
            appender = pooled.get(r.domain) or pooled.setdefault(r.domain, store.appender(ROW))
            appender.append((file_id, r.line, r.offset, r.length, False, 0, 0))
        if not kept:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
    if left_out:
        log.info("data.self_distillation = false: the %d general row(s) of data.files are left out",
                 left_out)
    # The pretrain source: data.pretrain (general domain, central prompt for chats, none for
    # text), then data.corpora (each document in its corpus's domain).
    text_pool = store.appender(ROW)
    for i, path in enumerate(data.pretrain):
        key = f"data.pretrain[{i}]"
        reader = (read_documents(path, source_key=key, txt_documents=data.txt_documents,
                                 bad_rows=data.bad_rows, stats=rows)
                  if str(path).endswith(".txt")
                  else read_pretrain(path, bad_rows=data.bad_rows, stats=rows, source_key=key))
        fill(text_pool, reader, key, path,
             prompt_of=lambda text: prompts.id("") if text else central)
    for domain, paths_of in corpora.items():
        prompt = prompts.id((roles.prompt(domain) if data.role_prompts else roles.central_prompt)
                            if data.corpus_prompt else "")
        for i, path in enumerate(paths_of):
            fill(text_pool, read_documents(path, source_key=f"data.corpora.{domain}[{i}]",
                                           txt_documents=data.txt_documents,
                                           bad_rows=data.bad_rows, stats=rows),
                 f"data.corpora.{domain}[{i}]", path, prompt_of=lambda text, p=prompt: p,
                 domain=roles.domain_id(domain))

    pools = {name: appender.finish() for name, appender in pooled.items()}
    pretrain = text_pool.finish()
    _check_declared(data, roles, pools, corpora, rows)
    domain_rows = sum(len(t) for d, t in pools.items() if d != GENERAL_DOMAIN)
    if data.self_distillation and not len(pools[GENERAL_DOMAIN]) and domain_rows:
        raise ConfigError("data.self_distillation = true but there are no general exemplars: set "
                          "data.general to the distilled exemplars (rega-engine distill), give "
                          "data.files rows with \"domain\": \"general\", or set "
                          "data.self_distillation = false")

    # Domains in data.domains order, then those only data.files holds, in role-table order.
    order = [*data.domains, *(d for d in roles.role_prompts if d not in data.domains
                              and d in pools)]
    # Source tables by id, and how each one's samples are made: (name, table, kind, domain id,
    # prompt id; None: the row's own).
    plan = []
    if len(pretrain):
        plan.append(("pretrain", pretrain, KIND_ID["pretrain"], None, None))
    if len(pools[GENERAL_DOMAIN]):
        plan.append((GENERAL_DOMAIN, pools[GENERAL_DOMAIN], KIND_ID["distilled"], 0, central))
    for domain in order:
        prompt = roles.prompt(domain) if data.role_prompts else roles.central_prompt
        plan.append((domain, pools[domain], KIND_ID["role"], roles.domain_id(domain),
                     prompts.id(prompt)))
    source_tables = [t for _, t, *_ in plan]

    share_info = {}
    if shares:
        sizes, share_info = _sizes_for_shares(config, roles, shares, plan, paths, prompts.texts,
                                              tokenizer, template)
    counts = {name: len(t) if sizes.get(name) is None else sizes[name] for name, t, *_ in plan}
    integration = {name: (math.floor(data.integration_fraction * counts[name] + 0.5)
                          if data.role_integration and kind == KIND_ID["role"] else 0)
                   for name, _, kind, *_ in plan}
    total = sum(counts.values()) + sum(integration.values())
    if not total:
        raise ConfigError("the mixture is empty: give data.domains, data.files, data.pretrain, "
                          "data.corpora and/or "
                          "data.general (with self_distillation), and data.sizes above 0")
    samples = draw_samples(plan, counts, integration, data.seed, store, central)
    store.close()
    table_bytes = {"in_memory": store.in_memory, "mapped": store.spilled}
    mixture_samples = Samples(samples, source_tables, paths, prompts.texts)
    return Mixture(mixture_samples, known, kind_weights, rows, count_samples(mixture_samples,
                                                                             known),
                   share_info, table_bytes)


def _check_declared(data, roles: RoleTable, pools: dict, corpora: dict, rows: RowStats) -> None:
    """Every domain the config declares (roles.prompts, data.domains, data.sizes) has rows, unless
    data.sizes gives it 0 on purpose: a misspelt domain must not end with no sample while its rows
    are skipped one by one (check_declared_domains names the closest domain of the rows). The role
    table declares the data's domains where the data has domains (data.domains, data.files); a
    base model's config (data.pretrain, data.general) may carry it for eval and later stages."""
    declared = {}
    for domain in roles.role_prompts if data.domains or data.files else ():
        declared.setdefault(domain, f"roles.prompts.{domain}")
    for domain in data.domains:
        declared.setdefault(domain, f"data.domains.{domain}")
    for domain in data.sizes:
        if domain not in (GENERAL_DOMAIN, "pretrain"):
            declared.setdefault(domain, f"data.sizes.{domain}")
    empty_on_purpose = {d for d, n in data.sizes.items() if n == 0 or size_share(n) == 0}
    with_rows = {d for d, table in pools.items() if len(table)} | set(corpora)
    check_declared_domains(
        {d: key for d, key in declared.items() if d not in empty_on_purpose}, with_rows, rows,
        fix=": give it rows (data.domains.{domain}, or rows of data.files with \"domain\": "
            "\"{domain}\"), remove {key}, or set data.sizes.{domain} = 0 to keep it empty on "
            "purpose")


def draw_samples(plan: list, counts: dict, integration: dict, seed: int, store: TableStore,
                 central: int) -> np.ndarray:
    """The shuffled SAMPLE table: `counts[name]` samples of each source of `plan` ((name, row
    table, kind, domain id, prompt id) each; None: the row's own), then `integration[name]` of
    those again as integration samples under prompt `central`; in memory of `store`'s budget."""
    source_tables = [t for _, t, *_ in plan]
    total = sum(counts.values()) + sum(integration.values())
    ordered = store.empty(SAMPLE, total)
    cursor = 0

    def put(source_id: int, row_ids: np.ndarray, kind: int, domain, prompt) -> None:
        nonlocal cursor
        part = ordered[cursor:cursor + len(row_ids)]
        part["source"], part["row"], part["kind"] = source_id, row_ids, kind
        table = source_tables[source_id]
        part["domain"] = table["domain"][row_ids] if domain is None else domain
        part["prompt"] = table["prompt"][row_ids] if prompt is None else prompt
        cursor += len(row_ids)

    for source_id, (name, table, kind, domain, prompt) in enumerate(plan):
        first = cursor
        for row_ids in select(len(table), counts[name], seeded_rng(seed, "select", name)):
            put(source_id, row_ids, kind, domain, prompt)
        if integration.get(name):
            chosen = ordered["row"][first:cursor]
            for at in choose_sorted(len(chosen), integration[name],
                                    seeded_rng(seed, "integration", name)):
                put(source_id, np.asarray(chosen[at]), KIND_ID["integration"], domain, central)
    samples = store.empty(SAMPLE, total)
    shuffle_into(ordered, samples, seeded_rng(seed, "shuffle"))
    store.release(ordered)   # dropped on return
    return samples


def _sizes_for_shares(config, roles: RoleTable, shares: dict, plan: list, paths: list,
                      prompts: list, tokenizer, template) -> tuple[dict, dict]:
    """Sample counts per source that make the token shares of data.sizes (see the module notes)."""
    from ..tokenizer import load_tokenizer
    from .render import ChatRenderer, RenderError

    data = config.data
    if tokenizer is None:
        from .prepare import tokenizer_path
        tokenizer = load_tokenizer(*tokenizer_path(config))
    renderer = ChatRenderer(tokenizer, template or data.chat_template)
    # Each source with rows, as the samples its rows are rendered as.
    source_tables = [t for _, t, *_ in plan]
    rendered = {name: Samples(_as_samples(table, source_id, domain, prompt), source_tables, paths,
                              prompts)
                for source_id, (name, table, _, domain, prompt) in enumerate(plan) if len(table)}
    missing = [s for s in rendered if s not in shares]
    if missing:
        raise ConfigError(f"data.sizes gives token shares, but not for {', '.join(missing)}, which "
                          "has rows; give it a share (\"0%\" leaves it out)")
    empty = [s for s, share in shares.items() if share > 0 and s not in rendered]
    if empty:
        raise ConfigError(f"data.sizes.{empty[0]} = {data.sizes[empty[0]]!r}: the source has no "
                          "rows")
    mean, per_row = {}, {}
    for source, items in rendered.items():
        rng = seeded_rng(data.seed, "share-probe", source)
        probe = next(choose_sorted(len(items), min(SHARE_PROBE, len(items)), rng))
        lengths = []
        for s in (items[int(i)] for i in probe):
            try:
                ids, _ = (renderer.render_text_arrays(s.text, s.system) if s.is_text
                          else renderer.render_arrays(s.messages, s.system))
            except RenderError:
                continue
            lengths.append(len(ids))
        mean[source] = sum(lengths) / len(lengths) if lengths else 1.0
        extra = data.integration_fraction if (source not in (GENERAL_DOMAIN, "pretrain")
                                              and data.role_integration) else 0.0
        per_row[source] = mean[source] * (1.0 + extra)
    total = sum(per_row[s] * len(items) for s, items in rendered.items())
    counts = {s: int(round(shares[s] * total / per_row[s])) for s in rendered}
    info = {"target": {s: shares[s] for s in rendered},
            "mean_tokens": {s: round(m, 2) for s, m in mean.items()},
            "samples": counts, "rows": {s: len(items) for s, items in rendered.items()},
            "planned_tokens": int(round(total))}
    log.info("data.sizes as token shares: %s", ", ".join(
        f"{s} {shares[s]:.1%} = {counts[s]} samples of {len(rendered[s])} rows (~{mean[s]:.0f} "
        "tokens each)"
        for s in rendered))
    return counts, info


def _as_samples(table: np.ndarray, source_id: int, domain, prompt) -> np.ndarray:
    """Every row of a source table once, as SAMPLE records (kind left 0)."""
    samples = np.zeros(len(table), SAMPLE)
    samples["source"], samples["row"] = source_id, np.arange(len(table))
    samples["domain"] = table["domain"] if domain is None else domain
    samples["prompt"] = table["prompt"] if prompt is None else prompt
    return samples


def count_samples(samples: Samples, domains: list[str]) -> dict:
    """Samples per kind, per domain and per kind/domain pair, by name."""
    cells = len(KINDS) * len(domains)
    pairs = np.zeros(cells, np.int64)
    table = samples.table
    for start in range(0, len(table), tables.BLOCK):
        block = table[start:start + tables.BLOCK]
        cell = block["kind"].astype(np.int64) * len(domains) + block["domain"]
        pairs += np.bincount(cell, minlength=cells)
    pairs = pairs.reshape(len(KINDS), len(domains))
    by_kind = {name: int(pairs[i].sum()) for i, name in enumerate(KINDS)}
    by_domain = {name: int(pairs[:, d].sum()) for d, name in enumerate(domains)}
    by_pair = {f"{KINDS[k]}/{domains[d]}": int(pairs[k, d])
               for k, d in zip(*np.nonzero(pairs))}
    return {"kind": by_kind, "domain": by_domain, "kind_domain": by_pair}
