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
"""
from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from ..config import ConfigError, RunConfig, size_share, validate_config
from ..kinds import GENERAL_DOMAIN, KIND_ID, KINDS, check_kind_weights
from ..log import get_logger
from .records import (
    Record,
    RowStats,
    load_content,
    read_documents,
    read_pretrain,
    read_samples,
    read_tagged_samples,
)
from .roles import RoleTable

log = get_logger(__name__)


class Sample:
    """One training sample of the mixture: the row it comes from, the system prompt it trains
    under, its kind and domain. A mixture's samples keep only where their row is (file, byte
    offset, length) and read the content again when `messages` or `text` is asked for, so a
    mixture holds about 200 bytes a sample, whatever its rows hold; built in code with content,
    a Sample keeps that content."""
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
                self.is_text,
                self._messages, self._text)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sample) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key()[:7])

    def __repr__(self) -> str:
        return (f"Sample({self.origin}, kind={self.kind}, domain={self.domain}, "
                f"system={self.system!r})")


def _row(record: Record) -> tuple:
    """What a mixture keeps of an accepted row: where it is (its content stays in the file)."""
    return (record.path, record.line, record.offset, record.length, record.text is not None)


@dataclass
class Mixture:
    samples: list
    domains: list                  # domain names by id
    kind_weights: dict             # kind name -> loss weight
    rows: RowStats                 # what was read and rejected
    # {"kind": {...}, "domain": {...}, "kind_domain": {...}}
    counts: dict = field(default_factory=dict)
    # data.sizes as token shares: target, measured lengths, counts
    shares: dict = field(default_factory=dict)


SHARE_PROBE = 256       # rows per source rendered to measure its mean length for token shares


def select(rows: list, n: int | None, rng: random.Random) -> list:
    """`n` rows: all (None), a sample without replacement (n <= len), or whole passes + a sample."""
    if n is None:
        return list(rows)
    passes, rest = divmod(n, len(rows)) if rows else (0, n)
    if rest and not rows:
        raise ValueError("cannot select from an empty source")
    picked = sorted(rng.sample(range(len(rows)), rest))
    return list(rows) * passes + [rows[i] for i in picked]


def _rng(seed: int, *parts: str) -> random.Random:
    # Seeded from a string (hashed with SHA-512 by `random`), so it is stable across processes
    # and Python versions, unlike hash().
    return random.Random(":".join([str(seed), *parts]))


def _sizes(data) -> dict:
    """data.sizes with token shares left out (they become counts once lengths are measured)."""
    return {k: v for k, v in data.sizes.items() if not isinstance(v, str)}


def build_mixture(config: RunConfig, *, tokenizer=None, template: str | None = None) -> Mixture:
    """Read the sources of `config.data` and build the shuffled REGA mixture. `tokenizer` (loaded
    from data.tokenizer when needed and not given) measures lengths for token shares only."""
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

    def usable(records: list, key: str, path: str, needed: bool = True) -> list[Record]:
        if not records and needed:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
        return records

    # Each source's rows: its own file first, then those of data.files naming it, in file order.
    # Rows are kept as references (see Sample): the content is read again when rendered.
    pooled: dict[str, list[tuple]] = {GENERAL_DOMAIN: [], **{d: [] for d in data.domains}}
    if data.self_distillation and data.general:
        pooled[GENERAL_DOMAIN] += usable([_row(r) for r in read_samples(
            data.general, source=GENERAL_DOMAIN, known_domains=known, bad_rows=data.bad_rows,
            stats=rows)],
            "data.general", data.general, sizes.get(GENERAL_DOMAIN, 1) > 0)
    for domain, path in data.domains.items():
        pooled[domain] += usable([_row(r) for r in read_samples(
            path, source=domain, known_domains=known, bad_rows=data.bad_rows, stats=rows)],
            f"data.domains.{domain}", path, sizes.get(domain, 1) > 0)
    left_out = 0
    for i, path in enumerate(data.files):
        key = f"data.files[{i}]"
        tagged = [(r.domain, _row(r)) for r in read_tagged_samples(path, source_key=key,
                                                                   known_domains=known,
                                                                   bad_rows=data.bad_rows,
                                                                   stats=rows)]
        for domain, r in usable(tagged, key, path):
            if domain == GENERAL_DOMAIN and not data.self_distillation:
                left_out += 1
                continue
            pooled.setdefault(domain, []).append(r)
    if left_out:
        log.info("data.self_distillation = false: the %d general row(s) of data.files are left out",
                 left_out)
    domain_rows = sum(len(v) for d, v in pooled.items() if d != GENERAL_DOMAIN)
    if data.self_distillation and not pooled[GENERAL_DOMAIN] and domain_rows:
        raise ConfigError("data.self_distillation = true but there are no general exemplars: set "
                          "data.general to the distilled exemplars (rega-engine distill), give "
                          "data.files rows with \"domain\": \"general\", or set "
                          "data.self_distillation = false")

    # The pretrain source: data.pretrain (general domain, central prompt for chats, none for
    # text), then data.corpora (each document in its corpus's domain).
    text_pool: list[Sample] = []
    for i, path in enumerate(data.pretrain):
        key = f"data.pretrain[{i}]"
        reader = (read_documents(path, source_key=key, txt_documents=data.txt_documents,
                                 bad_rows=data.bad_rows,
                                 stats=rows) if str(path).endswith(".txt")
                  else read_pretrain(path, bad_rows=data.bad_rows, stats=rows, source_key=key))
        records = usable([_row(r) for r in reader], key, path)
        text_pool += [Sample.of_row(r, "" if r[4] else roles.central_prompt, KIND_ID["pretrain"], 0)
                      for r in records]
    for domain, paths in corpora.items():
        prompt = ((roles.prompt(domain) if data.role_prompts else roles.central_prompt)
                  if data.corpus_prompt else "")
        for i, path in enumerate(paths):
            key = f"data.corpora.{domain}[{i}]"
            records = usable([_row(r) for r in read_documents(path, source_key=key,
                                                              txt_documents=data.txt_documents,
                                                              bad_rows=data.bad_rows, stats=rows)],
                                                              key, path)
            text_pool += [Sample.of_row(r, prompt, KIND_ID["pretrain"], roles.domain_id(domain))
                          for r in records]

    # Domains in data.domains order, then those only data.files holds, in role-table order.
    order = [*data.domains, *(d for d in roles.role_prompts if d not in data.domains
                              and d in pooled)]
    share_info = {}
    if shares:
        sizes, share_info = _sizes_for_shares(config, roles, shares, pooled, order, text_pool,
                                              tokenizer, template)

    samples: list[Sample] = []
    if text_pool:
        samples += select(text_pool, sizes.get("pretrain"), _rng(data.seed, "select", "pretrain"))

    if pooled[GENERAL_DOMAIN]:
        chosen = select(pooled[GENERAL_DOMAIN], sizes.get(GENERAL_DOMAIN), _rng(data.seed, "select",
                                                                                GENERAL_DOMAIN))
        samples += [Sample.of_row(r, roles.central_prompt, KIND_ID["distilled"], 0) for r in chosen]

    for domain in order:
        domain_id = roles.domain_id(domain)
        prompt = roles.prompt(domain) if data.role_prompts else roles.central_prompt
        chosen = select(pooled[domain], sizes.get(domain), _rng(data.seed, "select", domain))
        samples += [Sample.of_row(r, prompt, KIND_ID["role"], domain_id) for r in chosen]
        if data.role_integration and chosen:
            k = math.floor(data.integration_fraction * len(chosen) + 0.5)
            reused = select(chosen, k, _rng(data.seed, "integration", domain))
            samples += [Sample.of_row(r, roles.central_prompt, KIND_ID["integration"], domain_id)
                        for r in reused]

    if not samples:
        raise ConfigError("the mixture is empty: give data.domains, data.files, data.pretrain, "
                          "data.corpora and/or "
                          "data.general (with self_distillation), and data.sizes above 0")
    _rng(data.seed, "shuffle").shuffle(samples)
    return Mixture(samples, known, kind_weights, rows, count_samples(samples, known), share_info)


def _sizes_for_shares(config, roles: RoleTable, shares: dict, pooled: dict, order: list,
                      text_pool: list,
                      tokenizer, template) -> tuple[dict, dict]:
    """Sample counts per source that make the token shares of data.sizes (see the module notes)."""
    from ..tokenizer import load_tokenizer
    from .render import ChatRenderer, RenderError

    data = config.data
    if tokenizer is None:
        from .prepare import tokenizer_path
        tokenizer = load_tokenizer(*tokenizer_path(config))
    renderer = ChatRenderer(tokenizer, template or data.chat_template)
    # What each source's rows are rendered as, and the tokens one selected row brings
    # (a domain's row also brings integration_fraction of an integration sample).
    rendered: dict[str, list] = {}
    if pooled[GENERAL_DOMAIN]:
        rendered[GENERAL_DOMAIN] = [Sample.of_row(r, roles.central_prompt, 0,
                                                  0) for r in pooled[GENERAL_DOMAIN]]
    for domain in order:
        if pooled[domain]:
            prompt = roles.prompt(domain) if data.role_prompts else roles.central_prompt
            rendered[domain] = [Sample.of_row(r, prompt, 0, 0) for r in pooled[domain]]
    if text_pool:
        rendered["pretrain"] = text_pool
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
        rng = _rng(data.seed, "share-probe", source)
        probe = [items[i] for i in sorted(rng.sample(range(len(items)), min(SHARE_PROBE,
                                                                            len(items))))]
        lengths = []
        for messages, system, text in ((s.messages, s.system, s.text) for s in probe):
            try:
                ids, _ = (renderer.render_arrays(messages, system) if text is None
                          else renderer.render_text_arrays(text, system))
            except RenderError:
                continue
            lengths.append(len(ids))
        mean[source] = sum(lengths) / len(lengths) if lengths else 1.0
        extra = data.integration_fraction if (source not in (GENERAL_DOMAIN, "pretrain")
                                              and data.role_integration) else 0.0
        per_row[source] = mean[source] * (1.0 + extra)
    total = sum(per_row[s] * len(items) for s, items in rendered.items())
    counts = {s: int(round(shares[s] * total / per_row[s])) for s in rendered}
    info = {"target": {s: shares[s] for s in rendered}, "mean_tokens": {s: round(m,
        2) for s, m in mean.items()},
            "samples": counts, "rows": {s: len(items) for s, items in rendered.items()},
            "planned_tokens": int(round(total))}
    log.info("data.sizes as token shares: %s", ", ".join(
        f"{s} {shares[s]:.1%} = {counts[s]} samples of {len(rendered[s])} rows (~{mean[s]:.0f} "
        "tokens each)"
        for s in rendered))
    return counts, info


def count_samples(samples, domains: list[str]) -> dict:
    """Samples per kind, per domain and per kind/domain pair, by name."""
    pairs = Counter((s.kind, s.domain) for s in samples)
    by_kind = {name: sum(n for (k, _), n in pairs.items() if k == i)
               for i, name in enumerate(KINDS)}
    by_domain = {name: sum(n for (_, d), n in pairs.items() if d == i)
                 for i, name in enumerate(domains)}
    by_pair = {f"{KINDS[k]}/{domains[d]}": n for (k, d), n in sorted(pairs.items())}
    return {"kind": by_kind, "domain": by_domain, "kind_domain": by_pair}
