"""The names every stage shares: REGA's sample kinds and the general domain, and the one rule for
a table of kind weights.

Kept apart from rega_engine.batch (which re-exports them) because the configuration and the CLI
need them too and must not import torch to check a TOML file.
"""
from __future__ import annotations

import math
import numbers

from .errors import ConfigError

# Sample kinds of the mixture; a sample's kind id is its index here (new kinds are only ever
# appended, so the ids of a dataset prepared before a kind was added stay valid):
#   distilled   general exemplars (data.general, self-distillation), under the central prompt
#   role        a domain's samples under its role prompt
#   integration a slice of each domain's samples again, under the central prompt
#   pretrain    plain text or chats for training a base model (data.pretrain), not part of REGA
KINDS = ("distilled", "role", "integration", "pretrain")
KIND_ID = {name: i for i, name in enumerate(KINDS)}
# The three kinds of REGA must each be given a weight; kinds added since weigh 1.0 unless given,
# so a table written for the three REGA kinds (a config, an older dataset's meta.json) still holds.
REQUIRED_KINDS = ("distilled", "role", "integration")
DEFAULT_KIND_WEIGHT = 1.0
# Domain id 0 is always the general domain; specific domains follow in role-table order.
GENERAL_DOMAIN = "general"


def check_kind_weights(weights, where: str = "data.kind_weights", error=ConfigError) -> dict:
    """The one rule for kind weights, wherever they come from (run config, a prepared dataset's
    meta.json, a caller of PackedLoader): only kinds of KINDS, each of REQUIRED_KINDS given (the
    others weigh DEFAULT_KIND_WEIGHT when left out), each a finite number >= 0, not all of those
    given 0 (no token would carry a loss). Returns {kind: float} for every kind, in KINDS order;
    raises `error` with a message starting with `where`, e.g. "data.kind_weights.role = -1.0:
    ..."."""
    if not isinstance(weights, dict):
        raise error(f"{where} = {weights!r}: expected a table of kind = weight, e.g. "
                    "{ distilled = 1.0, role = 1.0, integration = 1.0 }")
    unknown = sorted(set(weights) - set(KINDS), key=str)
    if unknown:
        raise error(f"{where}: unknown kind(s) {', '.join(map(str, unknown))}; the kinds are "
                    f"{', '.join(KINDS)}")
    for kind, value in weights.items():
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise error(f"{where}.{kind} = {value!r}: expected a finite number >= 0")
    missing = [kind for kind in REQUIRED_KINDS if kind not in weights]
    if missing:
        raise error(f"{where}: no weight for {', '.join(missing)}; give each of "
                    f"{', '.join(REQUIRED_KINDS)} a weight (0 switches a kind's loss off; "
                    f"{', '.join(k for k in KINDS if k not in REQUIRED_KINDS)} weigh "
                    f"{DEFAULT_KIND_WEIGHT} unless given)")
    if not any(weights.values()):
        raise error(f"{where}: every weight is 0, so no token would carry a loss; give at least "
                    "one kind a weight > 0")
    return {kind: float(weights.get(kind, DEFAULT_KIND_WEIGHT)) for kind in KINDS}
