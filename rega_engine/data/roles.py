"""The role table: REGA's central prompt for the general domain and one role prompt per domain.

Domain ids are fixed here, once for every stage: 0 is the general domain, then the specific
domains in the order of `[roles.prompts]` in the run configuration. Training, metrics and
evaluation all read the ids from this table, so a domain keeps its id across runs of one config.
"""
from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from ..config import ConfigError, RolesConfig
from ..kinds import GENERAL_DOMAIN


@dataclass(frozen=True)
class RoleTable:
    central_prompt: str
    role_prompts: dict          # domain -> role prompt, in domain-id order (general excluded)

    @classmethod
    def from_config(cls, roles: RolesConfig) -> RoleTable:
        if not isinstance(roles.central_prompt, str) or not roles.central_prompt.strip():
            raise ConfigError("roles.central_prompt is empty; REGA trains general samples and "
                              "serves under it: "
                              "set it, e.g. central_prompt = \"You are a helpful assistant.\"")
        if not isinstance(roles.prompts, dict):
            raise ConfigError("roles.prompts must be a table of domain = \"role prompt\"")
        for domain, prompt in roles.prompts.items():
            if domain == GENERAL_DOMAIN:
                raise ConfigError(f"roles.prompts.{GENERAL_DOMAIN}: the general domain uses "
                                  "roles.central_prompt; remove this key")
            if not domain.strip():
                raise ConfigError("roles.prompts has an empty domain name")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"roles.prompts.{domain} is empty; give the domain its role "
                                  f"prompt, e.g. {domain} = \"You are an expert in {domain}.\"")
        return cls(roles.central_prompt, dict(roles.prompts))

    @property
    def domains(self) -> list[str]:
        """Domain names by id: ["general", *role_prompts]."""
        return [GENERAL_DOMAIN, *self.role_prompts]

    def domain_id(self, domain: str) -> int:
        if domain == GENERAL_DOMAIN:
            return 0
        try:
            return 1 + list(self.role_prompts).index(domain)
        except ValueError:
            raise ConfigError(f"domain {domain!r} has no role prompt: add roles.prompts.{domain} = "
                              "\"...\"") from None

    def prompt(self, domain: str) -> str:
        """The system prompt a domain trains under: its role prompt; the central one for general."""
        if domain == GENERAL_DOMAIN:
            return self.central_prompt
        self.domain_id(domain)
        return self.role_prompts[domain]

    def check_domains(self, domains: Iterable[str], key: str = "data.domains") -> None:
        """Every data domain needs a role prompt; `key` names the config table they come from."""
        for domain in domains:
            if domain == GENERAL_DOMAIN:
                raise ConfigError(f"{key}.{GENERAL_DOMAIN}: the general domain's data is "
                                  "data.general (distilled exemplars); use another domain name")
            if domain not in self.role_prompts:
                raise ConfigError(f"{key}.{domain} has no role prompt: add roles.prompts.{domain} "
                                  "= \"...\" (role prompts exist for: "
                                  f"{', '.join(self.role_prompts) or 'none'})")


# How alike a domain without rows and a domain the rows name must be for eval to call it a
# misspelling (difflib's ratio; 'cookery' / 'cooking' is 0.57, 'law' / 'medicine' 0).
MISSPELT_CUTOFF = 0.5


def check_declared_domains(declared: Mapping[str, str], with_rows: Collection[str], stats, *,
                           misspelt_only: bool = False, fix: str = "") -> None:
    """Refuses a declared domain (`declared`: domain -> the config key declaring it) that has no
    row in `with_rows`, naming the closest domain the rows do name: those rejected for having no
    role prompt (`stats.unknown_domains`, a records.RowStats) first, as a misspelling shows there,
    then those with rows. A typo must not train (or evaluate) a domain on nothing while its data
    is skipped row by row. `misspelt_only`: only when some rejected rows name a close domain (eval,
    where a domain may have no evaluation set on purpose); `fix` (formatted with domain and key)
    ends the message otherwise."""
    unknown = stats.unknown_domains
    for domain, key in declared.items():
        if domain in with_rows:
            continue
        if stats.mismatched_domains.get(domain) and not misspelt_only:
            origin = stats.domain_origin.get(domain, "")
            raise ConfigError(
                f"{key}: no row of the data has domain {domain!r} where it counts: its "
                f"{stats.mismatched_domains[domain]} rows were skipped for sitting in a file "
                f"listed under another domain (first at {origin}); a file holding several "
                "domains goes in data.files, where each row's domain decides")
        close = difflib.get_close_matches(domain, list(unknown), n=1, cutoff=MISSPELT_CUTOFF)
        if misspelt_only and not close:
            continue
        others = [d for d in with_rows if d != GENERAL_DOMAIN]
        closest = close or difflib.get_close_matches(domain, [*unknown, *others], n=1, cutoff=0.0)
        text = f"{key}: no row of the data has domain {domain!r}"
        if closest and closest[0] in unknown:
            name = closest[0]
            origin = stats.domain_origin.get(name, "")
            text += (f"; the closest domain the rows name is {name!r}, in {unknown[name]} rows "
                     f"skipped for having no role prompt (first at {origin}): rename {key} to "
                     f"{name!r}, or the rows' \"domain\" to {domain!r}")
        elif closest:
            text += (f"; the closest domain the rows name is {closest[0]!r} "
                     f"(domains with rows: {', '.join(sorted(others))})")
        else:
            text += f" (the rows name no domain but {GENERAL_DOMAIN})"
        if not (closest and closest[0] in unknown):
            text += fix.format(domain=domain, key=key)
        raise ConfigError(text)
