"""The role table and the REGA mixture: kinds, prompts, integration, sizes, ablations,
determinism."""
import json
from collections import Counter

import numpy as np
import pytest

from rega_engine.batch import KIND_ID
from rega_engine.config import ConfigError, RunConfig
from rega_engine.data.mixture import build_mixture, select
from rega_engine.data.roles import RoleTable

CENTRAL = "You are a helpful assistant."
ROLE = {"law": "You are a lawyer.", "medicine": "You are a physician."}
SIZES = {"general": 15, "law": 20, "medicine": 10}


def write_source(path, n, domain=None, distilled=False):
    with open(path, "w") as f:
        for i in range(n):
            row = {"messages": [{"role": "user", "content": f"{domain or 'general'} q{i}"},
                                {"role": "assistant", "content": f"a{i}"}]}
            if domain:
                row["domain"] = domain
            if distilled:
                row["distilled"] = True
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def config(tmp_path):
    c = RunConfig()
    c.roles.central_prompt = CENTRAL
    c.roles.prompts = dict(ROLE)
    c.data.general = write_source(tmp_path / "general.jsonl", SIZES["general"], distilled=True)
    c.data.domains = {d: write_source(tmp_path / f"{d}.jsonl", SIZES[d], d) for d in ("law",
                                                                                      "medicine")}
    c.data.integration_fraction = 0.25
    return c


def by_kind(mixture, kind):
    return [s for s in mixture.samples if s.kind == KIND_ID[kind]]


def test_role_table_ids_prompts_and_errors():
    c = RunConfig().roles
    c.prompts = {"law": "L", "medicine": "M"}
    table = RoleTable.from_config(c)
    assert table.domains == ["general", "law", "medicine"]
    assert [table.domain_id(d) for d in table.domains] == [0, 1, 2]
    assert table.prompt("general") == c.central_prompt and table.prompt("medicine") == "M"
    with pytest.raises(ConfigError,
                       match=r"data.domains.finance has no role prompt: add roles.prompts.finance"):
        table.check_domains(["law", "finance"])
    c.prompts["law"] = " "
    with pytest.raises(ConfigError, match=r"roles.prompts.law is empty"):
        RoleTable.from_config(c)
    c.prompts = {"general": "G"}
    with pytest.raises(ConfigError, match=r"roles.prompts.general"):
        RoleTable.from_config(c)
    c.prompts, c.central_prompt = {}, ""
    with pytest.raises(ConfigError, match=r"roles.central_prompt is empty"):
        RoleTable.from_config(c)


def test_kinds_prompts_domains_and_integration_fraction(config):
    m = build_mixture(config)
    assert m.domains == ["general", "law", "medicine"]
    distilled, role, integration = (by_kind(m, k) for k in ("distilled", "role", "integration"))
    assert len(distilled) == 15 and {s.system for s in distilled} == {CENTRAL} and {s.domain
        for s in distilled} == {0}
    assert Counter(s.domain for s in role) == {1: 20, 2: 10}
    assert {(s.domain, s.system) for s in role} == {(1, ROLE["law"]), (2, ROLE["medicine"])}
    # round(0.25 * 20) = 5 law and round(0.25 * 10) = 3 (2.5 rounds up) medicine samples reused...
    assert Counter(s.domain for s in integration) == {1: 5, 2: 3}
    # ...under the central prompt, distinct, and taken from the role samples, which keep them too.
    assert {s.system for s in integration} == {CENTRAL}
    assert len({s.origin for s in integration}) == 8
    role_rows = {s.origin: s.messages for s in role}
    assert all(role_rows[s.origin] == s.messages for s in integration)
    assert m.counts["kind"] == {"distilled": 15, "role": 30, "integration": 8, "pretrain": 0}
    assert m.counts["domain"] == {"general": 15, "law": 25, "medicine": 13}
    assert m.counts["kind_domain"]["integration/law"] == 5
    assert m.kind_weights == {"distilled": 1.0, "role": 1.0, "integration": 1.0, "pretrain": 1.0}
    assert m.rows.files[config.data.domains["law"]]["kept"] == 20
    # the sample's domain id follows its source; origins name the file and line
    assert all(s.origin.startswith(config.data.domains["law"] + ":") for s in role if s.domain == 1)


def test_same_seed_same_mixture_other_seed_other_order(config):
    first, again = build_mixture(config), build_mixture(config)
    assert first.samples == again.samples
    kinds = [s.kind for s in first.samples]
    assert kinds != sorted(kinds)   # shuffled, not grouped by source
    config.data.seed = 1
    other = build_mixture(config)
    assert other.samples != first.samples
    assert other.counts == first.counts


def test_ablations_by_configuration_alone(config):
    config.data.self_distillation = False
    config.data.general = ""        # not needed without self-distillation
    m = build_mixture(config)
    assert not by_kind(m, "distilled") and by_kind(m, "role") and by_kind(m, "integration")

    config.data.self_distillation = True
    config.data.general = write_source(config.data.domains["law"].replace("law", "g2"), 4,
                                       distilled=True)
    config.data.role_prompts = False
    m = build_mixture(config)
    assert {s.system for s in m.samples} == {CENTRAL}
    assert {s.domain for s in by_kind(m, "role")} == {1, 2}   # domains still tell the samples apart

    config.data.role_prompts = True
    config.data.role_integration = False
    m = build_mixture(config)
    assert not by_kind(m, "integration") and m.counts["kind"]["role"] == 30


def test_sizes_subsample_repeat_and_zero(config):
    config.data.sizes = {"law": 7, "medicine": 25, "general": 0}
    config.data.integration_fraction = 0.0
    m = build_mixture(config)
    law = Counter(s.origin for s in m.samples if s.domain == 1)
    med = Counter(s.origin for s in m.samples if s.domain == 2)
    assert sum(law.values()) == 7 and set(law.values()) == {1}                 # without replacement
    # 2 passes + 5
    assert sum(med.values()) == 25 and len(med) == 10 and set(med.values()) <= {2, 3}
    assert sorted(med.values()).count(3) == 5
    assert not by_kind(m, "distilled")


def test_select_is_deterministic_and_whole_passes_first():
    from rega_engine.data.tables import seeded_rng

    def chosen(n, seed):
        return np.concatenate(list(select(10, n, seeded_rng(seed, "t")))).tolist()

    assert chosen(None, 0) == list(range(10))
    assert chosen(23, 0)[:20] == list(range(10)) * 2
    assert chosen(4, 3) == chosen(4, 3) and chosen(4, 3) == sorted(set(chosen(4, 3)))


@pytest.mark.parametrize("change,message", [
    ({"kind_weights": {"distilled": 1.0, "role": 1.0}},
     r"data.kind_weights: no weight for integration"),
    ({"kind_weights": {"distilled": 1.0, "role": 1.0, "integration": 1.0, "extra": 1.0}},
     r"data.kind_weights: unknown kind\(s\) extra"),
    ({"kind_weights": {"distilled": -1.0, "role": 1.0, "integration": 1.0}},
     r"data.kind_weights.distilled = -1.0"),
    ({"kind_weights": {"distilled": 0, "role": 0.0, "integration": 0}}, r"every weight is 0"),
    ({"sizes": {"finance": 3}}, r"data.sizes.finance: no such source"),
    ({"sizes": {"law": -1}}, r"data.sizes.law = -1"),
    ({"integration_fraction": 1.5}, r"data.integration_fraction = 1.5"),
    ({"general": ""}, r"data.general is empty but data.self_distillation = true"),
    ({"domains": {"finance": "x.jsonl"}}, r"data.domains.finance has no role prompt"),
    ({"domains": {"law": "missing.jsonl"}}, r"data.domains.law = 'missing.jsonl': file not found"),
])
def test_config_errors_name_the_key(config, change, message):
    for key, value in change.items():
        setattr(config.data, key, value)
    with pytest.raises(ConfigError, match=message):
        build_mixture(config)


def test_kind_weights_reach_the_mixture_and_a_source_without_usable_rows_fails(config, tmp_path):
    config.data.kind_weights = {"distilled": 0.5, "role": 1.0, "integration": 2}
    # pretrain, a kind added after the three of REGA, weighs 1.0 when a table leaves it out
    assert build_mixture(config).kind_weights == {"distilled": 0.5, "role": 1.0, "integration": 2.0,
                                                  "pretrain": 1.0}
    (tmp_path / "empty.jsonl").write_text('{"messages": []}\n')
    config.data.domains["law"] = str(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match=r"data.domains.law = .*empty.jsonl' has no usable rows"):
        build_mixture(config)
