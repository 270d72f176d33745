"""The role table: REGA's central prompt for the general domain and one role prompt per domain.

Domain ids are fixed here, once for every stage: 0 is the general domain, then the specific
domains in the order of `[roles.prompts]` in the run configuration. Training, metrics and
evaluation all read the ids from this table, so a domain keeps its id across runs of one config.
"""
from __future__ import annotations

from collections.abc import Iterable
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
