"""docs/walkthrough.md, "Your own data, end to end", runs as written: the bash block between the
walkthrough markers, on files made from the bundled sample, every command exiting 0 with its
outputs there."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "rega_engine" / "demo" / "sample"
HELD_OUT = 8     # rows of each set kept out of training, for eval.jsonl
PAGE = REPO / "docs" / "walkthrough.md"   # the page that holds the walkthrough markers


def walkthrough_block() -> str:
    text = PAGE.read_text(encoding="utf-8")
    found = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```\s*<!-- /walkthrough -->", text,
                      re.S)
    assert found, (f"{PAGE.relative_to(REPO)} has no ```bash block between <!-- walkthrough --> "
                   "and <!-- /walkthrough -->")
    return found.group(1)


def commands(block: str) -> list[str]:
    """The block's command lines, heredoc bodies left out."""
    lines, in_heredoc = [], None
    for line in block.splitlines():
        if in_heredoc:
            in_heredoc = None if line.strip() == in_heredoc else in_heredoc
            continue
        heredoc = re.search(r"<<\s*'?(\w+)'?", line)
        if heredoc:
            in_heredoc = heredoc.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    return lines


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _dump(path: Path, rows) -> int:
    rows = list(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def write_user_files(tmp: Path) -> dict:
    """The walkthrough's five files, from the bundled sample: what a user would bring."""
    general, law, medicine = _rows("general.jsonl"), _rows("law.jsonl"), _rows("medicine.jsonl")
    corpus = (SAMPLE / "corpus.txt").read_text(encoding="utf-8")
    (tmp / "corpus.txt").write_text(corpus, encoding="utf-8")

    def chat(row, domain=None):
        return {"messages": row["messages"], **({"domain": domain} if domain else {})}

    texts = [line for line in corpus.splitlines() if line.strip()][:300]
    counts = {"pretrain": _dump(tmp / "pretrain.jsonl", [{"text": t} for t in texts]
                                + [chat(r) for r in general[:-HELD_OUT]]),
              "instructions": _dump(tmp / "instructions.jsonl",
                                    [{"messages": r["messages"][:-1]} for r in general[:40]])}
    mixed = [chat(r, "law") for r in law[:-HELD_OUT]] + [chat(r,
        "medicine") for r in medicine[:-HELD_OUT]]
    random.Random(0).shuffle(mixed)
    counts["chats"] = _dump(tmp / "chats.jsonl", mixed)
    counts["law"], counts["medicine"] = len(law) - HELD_OUT, len(medicine) - HELD_OUT
    _dump(tmp / "eval.jsonl", [chat(r, "general") for r in general[-HELD_OUT:]]
          + [chat(r, "law") for r in law[-HELD_OUT:]] + [chat(r,
              "medicine") for r in medicine[-HELD_OUT:]])
    return counts


def test_the_walkthrough_uses_only_rega_engine_commands():
    lines = commands(walkthrough_block())
    assert lines, "the walkthrough has no commands"
    for line in lines:
        assert line.startswith("rega-engine ") or re.match(r"cat > \S+ <<", line), line
    used = {line.split()[1] for line in lines if line.startswith("rega-engine ")}
    assert {"tokenizer", "model-config", "prepare", "train", "distill", "eval"} <= used


@pytest.mark.slow
def test_the_readme_walkthrough_runs_on_a_tiny_world(tmp_path):
    counts = write_user_files(tmp_path)
    script = tmp_path / "walkthrough.sh"
    script.write_text(walkthrough_block(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # rega-engine
    done = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]

    # 1-2: the tokenizer and a model config sized to it, loadable by transformers and by us
    assert "tokenizer written to tok: vocabulary of 1000 tokens" in output
    assert "bos <s> = 1, eos </s> = 2, pad <pad> = 3" in output
    model_json = json.loads((tmp_path / "model.json").read_text())
    assert (model_json["vocab_size"], model_json["bos_token_id"],
            model_json["eos_token_id"]) == (1000, 1, 2)
    # 3: the base model, pretrained from scratch on data of its own kind
    kinds = f"distilled 0, role 0, integration 0, pretrain {counts['pretrain']}"
    assert f"samples per kind:   {kinds}" in output
    assert re.search(r"one pass over the data = \d+ micro-batches per rank = \d+ optimizer steps",
                     output)
    assert re.search(r"train\.epochs = 4: \d+ steps", output)
    assert (tmp_path / "runs/base/hf/model.safetensors").is_file()
    # 4: self-distillation, the REGA mixture from one file of two domains (each row counted
    # once), training and evaluation under the central prompt, per domain of the eval file
    distilled = (tmp_path / "distilled.jsonl").read_text().splitlines()
    assert 0 < len(distilled) <= 40
    meta = json.loads((tmp_path / "runs/rega/data/meta.json").read_text())
    rows = {Path(p).name: c for p, c in meta["report"]["rows"].items()}
    assert rows["chats.jsonl"] == {"read": counts["chats"], "blank": 0, "kept": counts["chats"],
                                   "rejected": 0}
    assert meta["report"]["samples"]["domain"]["law"] > counts["law"]   # role + integration
    assert meta["report"]["samples"]["kind"]["role"] == counts["chats"]
    assert (tmp_path / "runs/rega/hf/model.safetensors").is_file()
    for model in ("rega", "base"):
        result = json.loads((tmp_path / "runs" / model / "eval.json").read_text())
        assert {name: m["samples"] for name, m in result["central"].items()} == {
            "general": HELD_OUT, "law": HELD_OUT, "medicine": HELD_OUT}
