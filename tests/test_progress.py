"""Progress wherever stderr goes: a bar on a terminal, plain timed lines (no carriage returns) in a
redirected log, nothing with train.progress = false except train's final summary; distill and eval
use the same helper."""
from __future__ import annotations

import io
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import one_torch_thread, run_config  # noqa: E402,F401 (autouse fixture)

from rega_engine import progress as progress_module  # noqa: E402
from rega_engine.progress import Progress, format_seconds, progress  # noqa: E402
from rega_engine.train.loop import train  # noqa: E402


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_plain_lines_every_interval_and_one_at_the_end(clock, capsys):
    bar = progress(10, desc="eval", unit="sample", every_s=30)
    assert not bar.is_bar   # pytest's stderr is not a terminal
    bar.set_postfix(loss="2.5000")
    for _ in range(3):
        clock.now += 10
        bar.update(1)
    clock.now += 10
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "eval: 3/10 samples (30%), 0.1 samples/s, loss 2.5000, elapsed 30s, left 1m10s",
        "eval: 5/10 samples (50%), 0.125 samples/s, loss 2.5000, elapsed 40s, left 40s",
    ]


def test_a_terminal_gets_a_bar_and_disabled_prints_nothing(capsys, monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    with Progress(4, desc="train", unit="step", stream=terminal) as bar:
        assert bar.is_bar
        bar.update(4)
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()
    with progress(4, desc="distill", unit="instruction", enabled=False) as bar:
        bar.update(4)
    assert capsys.readouterr().err == ""


def test_format_seconds():
    assert [format_seconds(s) for s in (3.24, 52, 381, 7500)] == ["3.2s", "52s", "6m21s",
                                                                   "2h05m"]


def test_train_in_a_redirected_log_prints_plain_lines_and_the_summary(tmp_path, capfd):
    train(run_config(tmp_path, "--train.progress=true", "--train.progress_every_s=1e-9",
                     steps=3))
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "train: 1/3 steps (33%)" in err and "train: 3/3 steps (100%)" in err
    assert "loss " in err.split("train: 3/3 steps")[1].splitlines()[0]
    assert err.rstrip().splitlines()[-1].startswith("train: finished step 3 of 3, loss ")


def test_progress_false_still_prints_the_final_summary(tmp_path, capfd):
    train(run_config(tmp_path, "--train.progress=false", "--train.progress_every_s=1e-9",
                     steps=2))
    err = capfd.readouterr().err
    assert "train: 1/2" not in err
    assert "train: finished step 2 of 2, loss " in err


def _bigram(tmp_path):
    """A tiny model (tests/bigram_model.py) that answers "law fine" after any prompt."""
    from bigram_model import make_bigram_checkpoint
    from tiny_tokenizer import tiny_tokenizer

    from rega_engine.data.render import ChatRenderer
    tok = tiny_tokenizer()
    end = ChatRenderer(tok).render_prompt([{"role": "user", "content": "q"}], "c")[-1]
    law, fine = (tok.encode(f" {w}", add_special_tokens=False)[0] for w in ("law", "fine"))
    eos = tok.eos_token_id
    return make_bigram_checkpoint(tmp_path / "bigram", len(tok),
                                  {end: {law: 1.0}, law: {fine: 1.0}, fine: {eos: 1.0}},
                                  {eos: 1.0}, eos_token_id=eos, pad_token_id=tok.pad_token_id)


def test_eval_and_distill_print_the_same_plain_progress(tmp_path, capfd):
    import json

    from tiny_tokenizer import tiny_tokenizer_dir

    from rega_engine.config import RunConfig
    from rega_engine.distill import distill
    from rega_engine.evaluate import evaluate_model

    model = _bigram(tmp_path)
    capfd.readouterr()   # transformers' own bar while writing the checkpoint: not ours
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "law fine"}]
             for i in range(3)]
    evaluate_model(model, {"general": chats}, central_prompt="c",
                   tokenizer_dir=tiny_tokenizer_dir(), max_new_tokens=4, batch_size=1,
                   progress=True, progress_every_s=1e-9)
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "eval: 1/3 samples (33%)" in err and "eval: 3/3 samples (100%)" in err

    config = RunConfig()
    config.roles.central_prompt = "c"
    config.data.tokenizer = tiny_tokenizer_dir()
    config.distill.model = model
    config.distill.max_new_tokens = 4
    config.distill.batch_size = 2
    config.distill.instructions = str(tmp_path / "instructions.jsonl")
    config.distill.output = str(tmp_path / "general.jsonl")
    config.train.progress_every_s = 1e-9
    with open(config.distill.instructions, "w") as f:
        for i in range(4):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}) + "\n")
    distill(config)
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "distill: 2/4 instructions (50%)" in err and "distill: 4/4 instructions (100%)" in err

    config.distill.restart = True   # everything again, now with train.progress = false
    config.train.progress = False
    distill(config)
    assert "distill: 2/4" not in capfd.readouterr().err
