"""A domain the config declares that ends with no row is an error naming the closest domain the
rows name (a misspelt `roles.prompts` key used to train nothing for it, rows skipped one by one,
exit 0); `eval` accepts and refuses the rows prepare does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rega_engine.cli import main
from rega_engine.config import ConfigError, load_config
from rega_engine.data.mixture import build_mixture
from rega_engine.evaluate import load_eval_sets

SAMPLE = Path(__file__).resolve().parents[1] / "rega_engine" / "demo" / "sample"


def chats(path: Path, domains: dict) -> Path:
    """A data.files-style file: rows of the sample's law chats under the given domains
    ({domain: rows})."""
    law = [json.loads(line) for line in (SAMPLE / "law.jsonl").read_text().splitlines()]
    rows, at = [], 0
    for domain, n in domains.items():
        rows += [{"messages": r["messages"], "domain": domain} for r in law[at:at + n]]
        at += n
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_args(tmp: Path, files: Path, prompts: str, *extra: str) -> list[str]:
    return ["prepare", f"--data.tokenizer={SAMPLE / 'tokenizer'}",
            f"--data.general={SAMPLE / 'general.jsonl'}", f"--data.files={files}",
            f"--roles.prompts={prompts}", f"--data.prepared={tmp / 'prepared'}", *extra]


def test_a_misspelt_role_prompt_is_refused_naming_the_domain_the_rows_have(tmp_path, capsys):
    files = chats(tmp_path / "chats.jsonl", {"cooking": 12, "law": 8})
    code = main(prepare_args(tmp_path, files, "{cookery = 'You cook.', law = 'You judge.'}"))
    err = capsys.readouterr().err
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("rega-engine prepare: roles.prompts.cookery: no row of the data has "
                           "domain 'cookery'; the closest domain the rows name is 'cooking', in "
                           f"12 rows skipped for having no role prompt (first at {files}:1)")
    assert "Traceback" not in err
    assert not (tmp_path / "prepared").exists()   # refused before anything was written


def test_a_declared_domain_without_rows_names_the_closest_one_and_the_fixes(tmp_path, capsys):
    files = chats(tmp_path / "chats.jsonl", {"law": 8, "medicine": 4})
    code = main(prepare_args(tmp_path, files, "{law = 'L', medicine = 'M', finance = 'F'}"))
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2
    assert ("roles.prompts.finance: no row of the data has domain 'finance'; the closest "
            "domain") in last
    assert "remove roles.prompts.finance, or set data.sizes.finance = 0" in last


def test_a_domain_kept_empty_on_purpose_is_not_refused(tmp_path):
    files = chats(tmp_path / "chats.jsonl", {"law": 8})
    config = load_config(None, prepare_args(tmp_path, files, "{law = 'L', finance = 'F'}",
                                            "--data.sizes={finance = 0}")[1:])
    mixture = build_mixture(config)
    assert mixture.counts["domain"]["finance"] == 0 and mixture.counts["domain"]["law"] > 0
    # also beside data.domains, where data.sizes otherwise names only the sources with a file
    beside = load_config(None, [f"--data.tokenizer={SAMPLE / 'tokenizer'}",
                                f"--data.general={SAMPLE / 'general.jsonl'}",
                                f"--data.domains={{law = '{SAMPLE / 'law.jsonl'}'}}",
                                "--roles.prompts={law = 'L', finance = 'F'}",
                                "--data.sizes={finance = '0%', law = '90%', general = '10%'}"])
    assert build_mixture(beside).counts["domain"]["finance"] == 0
    # a data.domains file whose rows all name a misspelt domain: refused, naming the file
    config = load_config(None, prepare_args(tmp_path, files, "{lawyer = 'L'}")[1:])
    config.data.files = []
    config.data.domains = {"lawyer": str(files)}
    with pytest.raises(ConfigError, match=r"data.domains.lawyer = .* has no usable rows"):
        build_mixture(config)


def test_eval_refuses_the_rows_prepare_refuses(tmp_path, capsys):
    files = chats(tmp_path / "eval.jsonl", {"cooking": 3, "law": 2, "history": 2})
    config = load_config(None, ["--roles.prompts={law = 'You judge.'}", f"--eval.files={files}"])
    sets = load_eval_sets(config)   # an unrelated unknown domain: skipped and counted, as prepare
    assert {name: len(items) for name, items in sets.items()} == {"law": 2}
    assert "eval: rows rejected: unknown domain 5" in capsys.readouterr().err

    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    code = main(["eval", f"--eval.checkpoint={checkpoint}", f"--eval.files={files}",
                 "--roles.prompts={cookery = 'You cook.', law = 'You judge.'}"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2
    assert last.startswith("rega-engine eval: roles.prompts.cookery: no row of the data has "
                           "domain 'cookery'; the closest domain the rows name is 'cooking', in 3 "
                           "rows")
