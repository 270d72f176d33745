"""The REGA training mixture: which samples, under which system prompt, of which kind.

- distilled: the general exemplars of `data.general` (self-distillation), under the central prompt;
- role: each domain's samples (`data.domains`), under the domain's role prompt;
- integration: `data.integration_fraction` of each domain's selected samples, again, under the
  central prompt (role integration); they also stay in `role`.
Each part can be switched off by configuration alone (`self_distillation`, `role_prompts`:
false puts every sample under the central prompt, `role_integration`).

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

from ..batch import GENERAL_DOMAIN, KIND_ID, KINDS
from ..config import ConfigError, RunConfig
from .records import Record, RowStats, read_samples
from .roles import RoleTable


@dataclass(frozen=True)
class Sample:
    """One training sample of the mixture: a conversation, the system prompt it trains under."""
    messages: tuple
    system: str
    kind: int          # index into KINDS
    domain: int        # index into the role table's domains; 0 = general
    origin: str        # "path:line" of the row it came from


@dataclass
class Mixture:
    samples: list
    domains: list                  # domain names by id
    kind_weights: dict             # kind name -> loss weight
    rows: RowStats                 # what was read and rejected
    counts: dict = field(default_factory=dict)   # {"kind": {...}, "domain": {...}, "kind_domain": {...}}


def check_kind_weights(weights) -> dict:
    if not isinstance(weights, dict) or set(weights) != set(KINDS):
        got = sorted(weights) if isinstance(weights, dict) else weights
        raise ConfigError(f"data.kind_weights must have exactly the keys {', '.join(KINDS)}; got {got}")
    out = {}
    for kind in KINDS:
        w = weights[kind]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"data.kind_weights.{kind} = {w!r}; expected a finite number >= 0")
        out[kind] = float(w)
    return out


def _check_sizes(sizes, sources: list[str]) -> dict:
    if not isinstance(sizes, dict):
        raise ConfigError("data.sizes must be a table of source = sample count")
    for source, n in sizes.items():
        if source not in sources:
            raise ConfigError(f"data.sizes.{source}: no such source; sources are {', '.join(sources)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"data.sizes.{source} = {n!r}; expected a whole number >= 0")
    return dict(sizes)


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
    data = config.data
    roles = RoleTable.from_config(config.roles)
    if not isinstance(data.domains, dict):
        raise ConfigError("data.domains must be a table of domain = \"path.jsonl\"")
    roles.check_domains(data.domains)
    kind_weights = check_kind_weights(data.kind_weights)
    sizes = _check_sizes(data.sizes, [GENERAL_DOMAIN, *data.domains])
    if not 0.0 <= data.integration_fraction <= 1.0:
        raise ConfigError(f"data.integration_fraction = {data.integration_fraction}; expected 0..1")
    if data.self_distillation and not data.general:
        raise ConfigError("data.general is empty but data.self_distillation = true: set data.general to the "
                          "distilled exemplars (rega-engine distill), or data.self_distillation = false")
    sources = {f"data.domains.{d}": p for d, p in data.domains.items()}
    if data.self_distillation:
        sources["data.general"] = data.general
    for key, path in sources.items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key} must be the path of a JSONL file")
        if not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")

    known = roles.domains
    rows = RowStats()
    samples: list[Sample] = []

    def load(source: str, path: str) -> list[Record]:
        records = list(read_samples(path, source=source, known_domains=known, bad_rows=data.bad_rows, stats=rows))
        if not records and sizes.get(source, 1) > 0:
            key = "data.general" if source == GENERAL_DOMAIN else f"data.domains.{source}"
            raise ConfigError(f"{key} = {path!r} has no usable rows (see the rejected rows above)")
        return records

    if data.self_distillation:
        chosen = select(load(GENERAL_DOMAIN, data.general), sizes.get(GENERAL_DOMAIN),
                        _rng(data.seed, "select", GENERAL_DOMAIN))
        samples += [Sample(r.messages, roles.central_prompt, KIND_ID["distilled"], 0, r.origin) for r in chosen]

    for domain, path in data.domains.items():
        domain_id = roles.domain_id(domain)
        prompt = roles.prompt(domain) if data.role_prompts else roles.central_prompt
        chosen = select(load(domain, path), sizes.get(domain), _rng(data.seed, "select", domain))
        samples += [Sample(r.messages, prompt, KIND_ID["role"], domain_id, r.origin) for r in chosen]
        if data.role_integration and chosen:
            k = math.floor(data.integration_fraction * len(chosen) + 0.5)
            reused = select(chosen, k, _rng(data.seed, "integration", domain))
            samples += [Sample(r.messages, roles.central_prompt, KIND_ID["integration"], domain_id, r.origin)
                        for r in reused]

    if not samples:
        raise ConfigError("the mixture is empty: give data.domains and/or data.general (with self_distillation), "
                          "and data.sizes above 0")
    _rng(data.seed, "shuffle").shuffle(samples)
    return Mixture(samples, known, kind_weights, rows, count_samples(samples, known))


def count_samples(samples, domains: list[str]) -> dict:
    """Samples per kind, per domain and per kind/domain pair, by name."""
    pairs = Counter((s.kind, s.domain) for s in samples)
    by_kind = {name: sum(n for (k, _), n in pairs.items() if k == i) for i, name in enumerate(KINDS)}
    by_domain = {name: sum(n for (_, d), n in pairs.items() if d == i) for i, name in enumerate(domains)}
    by_pair = {f"{KINDS[k]}/{domains[d]}": n for (k, d), n in sorted(pairs.items())}
    return {"kind": by_kind, "domain": by_domain, "kind_domain": by_pair}
