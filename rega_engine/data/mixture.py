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
  text trained on every token), for training a base model; every row once, in the general domain,
  whatever the REGA switches say.

`data.sizes` sets the samples per source ("general" or a domain): fewer than the source holds is a
seeded sample without replacement, more repeats whole passes and samples the rest, absent takes
all. Everything is a function of `data.seed` and the files: the same config gives the same
mixture, in the same shuffled order.
"""
from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from ..config import ConfigError, RunConfig, validate_config
from ..kinds import GENERAL_DOMAIN, KIND_ID, KINDS, check_kind_weights
from ..log import get_logger
from .records import Record, RowStats, read_pretrain, read_samples, read_tagged_samples
from .roles import RoleTable

log = get_logger(__name__)


@dataclass(frozen=True)
class Sample:
    """One training sample of the mixture: a conversation, the system prompt it trains under."""
    messages: tuple
    system: str
    kind: int          # index into KINDS
    domain: int        # index into the role table's domains; 0 = general
    origin: str        # "path:line" of the row it came from
    text: str | None = None   # a plain-text pretraining row: trained as this text alone


@dataclass
class Mixture:
    samples: list
    domains: list                  # domain names by id
    kind_weights: dict             # kind name -> loss weight
    rows: RowStats                 # what was read and rejected
    counts: dict = field(default_factory=dict)   # {"kind": {...}, "domain": {...}, "kind_domain": {...}}


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


def build_mixture(config: RunConfig) -> Mixture:
    """Read the sources of `config.data` and build the shuffled REGA mixture."""
    validate_config(config)
    data = config.data
    roles = RoleTable.from_config(config.roles)
    roles.check_domains(data.domains)
    kind_weights = check_kind_weights(data.kind_weights)   # as floats, in KINDS order
    sizes = data.sizes
    if data.self_distillation and not (data.general or data.files or data.pretrain):
        raise ConfigError("data.general is empty but data.self_distillation = true: set data.general to the "
                          "distilled exemplars (rega-engine distill), or data.self_distillation = false")
    sources = {f"data.domains.{d}": p for d, p in data.domains.items()}
    if data.self_distillation and data.general:
        sources["data.general"] = data.general
    sources.update({f"data.files[{i}]": p for i, p in enumerate(data.files)})
    sources.update({f"data.pretrain[{i}]": p for i, p in enumerate(data.pretrain)})
    for key, path in sources.items():
        if os.path.isdir(path):
            raise ConfigError(f"{key} = {path!r} is a directory; give the JSONL file in it")
        if not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")

    known = roles.domains
    rows = RowStats()
    samples: list[Sample] = []

    def usable(records: list, key: str, path: str, needed: bool = True) -> list[Record]:
        if not records and needed:
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
        return records

    # Each source's rows: its own file first, then those of data.files naming it, in file order.
    pooled: dict[str, list[Record]] = {GENERAL_DOMAIN: [], **{d: [] for d in data.domains}}
    if data.self_distillation and data.general:
        pooled[GENERAL_DOMAIN] += usable(list(read_samples(
            data.general, source=GENERAL_DOMAIN, known_domains=known, bad_rows=data.bad_rows, stats=rows)),
            "data.general", data.general, sizes.get(GENERAL_DOMAIN, 1) > 0)
    for domain, path in data.domains.items():
        pooled[domain] += usable(list(read_samples(
            path, source=domain, known_domains=known, bad_rows=data.bad_rows, stats=rows)),
            f"data.domains.{domain}", path, sizes.get(domain, 1) > 0)
    left_out = 0
    for i, path in enumerate(data.files):
        key = f"data.files[{i}]"
        for r in usable(list(read_tagged_samples(path, source_key=key, known_domains=known,
                                                 bad_rows=data.bad_rows, stats=rows)), key, path):
            if r.domain == GENERAL_DOMAIN and not data.self_distillation:
                left_out += 1
                continue
            pooled.setdefault(r.domain, []).append(r)
    if left_out:
        log.info("data.self_distillation = false: the %d general row(s) of data.files are left out",
                 left_out)
    domain_rows = sum(len(v) for d, v in pooled.items() if d != GENERAL_DOMAIN)
    if data.self_distillation and not pooled[GENERAL_DOMAIN] and domain_rows:
        raise ConfigError("data.self_distillation = true but there are no general exemplars: set data.general to "
                          "the distilled exemplars (rega-engine distill), give data.files rows with "
                          "\"domain\": \"general\", or set data.self_distillation = false")

    for i, path in enumerate(data.pretrain):
        key = f"data.pretrain[{i}]"
        records = usable(list(read_pretrain(path, bad_rows=data.bad_rows, stats=rows, source_key=key)), key, path)
        samples += [Sample(r.messages, "" if r.text is not None else roles.central_prompt, KIND_ID["pretrain"], 0,
                           r.origin, r.text) for r in records]

    if pooled[GENERAL_DOMAIN]:
        chosen = select(pooled[GENERAL_DOMAIN], sizes.get(GENERAL_DOMAIN), _rng(data.seed, "select", GENERAL_DOMAIN))
        samples += [Sample(r.messages, roles.central_prompt, KIND_ID["distilled"], 0, r.origin) for r in chosen]

    # Domains in data.domains order, then those only data.files holds, in role-table order.
    order = [*data.domains, *(d for d in roles.role_prompts if d not in data.domains and d in pooled)]
    for domain in order:
        domain_id = roles.domain_id(domain)
        prompt = roles.prompt(domain) if data.role_prompts else roles.central_prompt
        chosen = select(pooled[domain], sizes.get(domain), _rng(data.seed, "select", domain))
        samples += [Sample(r.messages, prompt, KIND_ID["role"], domain_id, r.origin) for r in chosen]
        if data.role_integration and chosen:
            k = math.floor(data.integration_fraction * len(chosen) + 0.5)
            reused = select(chosen, k, _rng(data.seed, "integration", domain))
            samples += [Sample(r.messages, roles.central_prompt, KIND_ID["integration"], domain_id, r.origin)
                        for r in reused]

    if not samples:
        raise ConfigError("the mixture is empty: give data.domains, data.files, data.pretrain and/or data.general "
                          "(with self_distillation), and data.sizes above 0")
    _rng(data.seed, "shuffle").shuffle(samples)
    return Mixture(samples, known, kind_weights, rows, count_samples(samples, known))


def count_samples(samples, domains: list[str]) -> dict:
    """Samples per kind, per domain and per kind/domain pair, by name."""
    pairs = Counter((s.kind, s.domain) for s in samples)
    by_kind = {name: sum(n for (k, _), n in pairs.items() if k == i) for i, name in enumerate(KINDS)}
    by_domain = {name: sum(n for (_, d), n in pairs.items() if d == i) for i, name in enumerate(domains)}
    by_pair = {f"{KINDS[k]}/{domains[d]}": n for (k, d), n in sorted(pairs.items())}
    return {"kind": by_kind, "domain": by_domain, "kind_domain": by_pair}
