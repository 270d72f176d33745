"""README.md and docs/*.md do not rot silently: every relative link and image resolves (a
`page.md#anchor` link to a heading of that page, in GitHub's anchor style), every config key a page
names is one the CLI reads (`rega_engine.config.config_keys`), every docs page is linked from the
README, and the README stays a short front door.

Fast: text only, no subprocess."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from rega_engine.config import config_keys

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 260

KEYS = config_keys()
SECTIONS = tuple(KEYS)
TABLE_KEYS = {(section, key) for section, rows in KEYS.items()
              for key, default, _ in rows if isinstance(default, dict)}

# Mentions shaped like config keys that are on purpose not keys, each with where and why. Each must
# stay a non-key and stay in the docs, or leave this table.
NOT_KEYS = {
    "train.warmup_step": "docs/pipeline.md: a mistyped key the CLI corrects (train.warmup_steps)",
    "train.batch_size": "docs/pipeline.md: a mistyped key the CLI corrects "
                        "(train.micro_batch_size)",
}
# `eval.json`, `eval.jsonl`: file names, not keys.
FILE_SUFFIXES = {"json", "jsonl", "toml", "txt", "md", "py", "png", "sh", "lock"}

FENCE = re.compile(r"^(```|~~~)([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
KEY = re.compile(r"(?<![\w./-])(?:--)?(" + "|".join(SECTIONS)
                 + r")\.([A-Za-z_]\w*)((?:\.[\w<>-]+)*)")
FLAG = re.compile(r"(?<![\w.-])--(" + "|".join(SECTIONS) + r")\.([A-Za-z_]\w*)")
HEREDOC_TOML = re.compile(r"<<\s*'?TOML'?\n(.*?)^TOML$", re.S | re.M)


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def split_fences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text with its fenced code blocks blanked (line count kept), and the blocks as (info,
    body)."""
    blocks = [(m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation removed (word
    characters, spaces and hyphens kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(prose):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def key_mentions(page: Path) -> list[tuple[str, str, str]]:
    """(section, key, where) for each config key the page names: in inline code, as
    `section.key[.sub]` or `--section.key`; in fenced blocks, as `--section.key` flags and as the
    keys of TOML (```toml blocks and bash heredocs delimited by TOML)."""
    text = page.read_text(encoding="utf-8")
    prose, blocks = split_fences(text)
    out = []
    for code in INLINE_CODE.finditer(prose):
        line = prose.count("\n", 0, code.start()) + 1
        for m in KEY.finditer(code.group(2)):
            section, key, sub = m.groups()
            if key in FILE_SUFFIXES and not sub:
                continue
            if sub and not any(s == section for s, _ in TABLE_KEYS):
                continue   # `model.layers.0.mlp`: an attribute path; no key of model is a table
            out.append((section, key, f"{rel(page)}:{line}: `{code.group(2)}`"))
    for info, body in blocks:
        for m in FLAG.finditer(body):
            out.append((m.group(1), m.group(2), f"{rel(page)}: {m.group(0)} in a code block"))
        tomls = [body] if info.split()[:1] == ["toml"] else HEREDOC_TOML.findall(body)
        for doc in tomls:
            for section, table in tomllib.loads(doc).items():
                for key in table:
                    out.append((section, key, f"{rel(page)}: [{section}] {key} in a TOML block"))
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for line, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{rel(page)}:{line}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}: {rel(dest)} has no heading with the anchor #{anchor}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_image_resolves(page):
    broken = broken_links(page)
    assert not broken, "\n".join(broken)


def test_a_broken_link_an_unknown_anchor_and_a_missing_image_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## FP8 training (`x`)\n", encoding="utf-8")
    page = tmp_path / "p.md"
    page.write_text("# Title\n[ok](other.md#fp8-training-x) [ok](#title) [web](https://x.org/a)\n"
                    "[gone](nothere.md) [anchor](other.md#fp8) ![img](img.png) [self](#nope)\n"
                    "`[code](not-a-link.md)`\n```\n[fenced](not-a-link.md)\n```\n",
                    encoding="utf-8")
    found = broken_links(page)
    assert [line.split(": ")[1] for line in found] == [
        "nothere.md", "other.md#fp8", "img.png", "#nope"], found


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_config_key_a_page_names_is_one_the_cli_reads(page):
    stale = []
    for section, key, where in key_mentions(page):
        if key not in {k for k, _, _ in KEYS.get(section, [])} \
                and f"{section}.{key}" not in NOT_KEYS:
            stale.append(f"{where}: {section}.{key} is not a config key")
    assert not stale, "\n".join(stale)


def test_the_keys_named_on_purpose_as_non_keys_are_not_keys_and_are_still_named():
    named = {f"{s}.{k}" for page in PAGES for s, k, _ in key_mentions(page)}
    for mention in NOT_KEYS:
        section, key = mention.split(".")
        assert key not in {k for k, _, _ in KEYS[section]}, f"{mention} is a key now"
        assert mention in named, f"no page names {mention} any more: drop it from NOT_KEYS"


def test_the_key_matcher_tells_keys_from_python_names(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("`rega_engine.model` `model.layers.0.mlp has act_fn` `eval.json` "
                    "`--train.lr=1e-4` `<train.out_dir>/hf` `data.sizes.<domain> = 0` "
                    "`data.seq_len x train.micro_batch_size`\n"
                    "```bash\nrega-engine train --checkpoint.every=500 --section.key=value\n```\n"
                    "```toml\n[lora]\nrank = 16\n```\n", encoding="utf-8")
    found = [(s, k) for s, k, _ in key_mentions(page)]
    assert found == [("train", "lr"), ("train", "out_dir"), ("data", "sizes"), ("data", "seq_len"),
                     ("train", "micro_batch_size"), ("checkpoint", "every"), ("lora", "rank")]


def test_github_anchors():
    assert slug('FP8 training (`train.precision = "fp8"`)') == "fp8-training-trainprecision--fp8"
    assert slug("LoRA in our own loop (`[lora]`)") == "lora-in-our-own-loop-lora"
    assert slug("Using rega-engine's kernels from Hugging Face transformers and TRL") == \
        "using-rega-engines-kernels-from-hugging-face-transformers-and-trl"


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for _, target in links(README)}
    missing = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_stays_a_short_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       "move reference text to docs/")
