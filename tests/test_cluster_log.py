"""What a cluster job shows (issue 25, part 6): log.jsonl's data_wait_s and checkpoint_s, the
summary line's totals, and train.profile_steps' torch profiler trace; tiny CPU runs."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
)

from rega_engine.config import load_config  # noqa: E402
from rega_engine.data.loader import PackedLoader  # noqa: E402
from rega_engine.errors import ConfigError  # noqa: E402
from rega_engine.train import loop, metrics  # noqa: E402
from rega_engine.train.checkpoint import Checkpointer  # noqa: E402
from rega_engine.train.loop import train  # noqa: E402


@pytest.fixture
def messages(monkeypatch):
    """The lines the run prints through its MetricsLogger (header, checkpoints, summary)."""
    seen = []
    real = metrics.MetricsLogger.message

    def message(self, text):
        if self.enabled:
            seen.append(text)
        real(self, text)

    monkeypatch.setattr(metrics.MetricsLogger, "message", message)
    return seen


def test_log_times_the_wait_for_data(tmp_path, monkeypatch):
    # A loader slower than the step: the prefetch thread makes each micro-batch in 0.25 s, so a
    # step of 2 micro-batches waits about 0.5 s less the time the previous step ran.
    make_batch = PackedLoader._make_batch

    def slow_batch(self, plan, k):
        time.sleep(0.25)
        return make_batch(self, plan, k)

    monkeypatch.setattr(PackedLoader, "_make_batch", slow_batch)
    train(run_config(tmp_path, "--train.grad_accum=2", "--train.log_every=4", steps=4))
    [record] = read_log(tmp_path / "run")
    # The mean per step over the record's 4 steps: at most the 0.5 s a step's batches take to
    # make (their sum, 4 x that less the steps, would be well above), and most of it.
    assert 0.1 < record["data_wait_s"] < 0.55, record
    assert record["checkpoint_s"] == 0


def test_log_times_the_checkpoints(tmp_path, monkeypatch, messages):
    save = Checkpointer.save

    def slow_save(self, step, **kwargs):
        time.sleep(0.2)
        return save(self, step, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    assert train(run_config(tmp_path, "--checkpoint.every=2", steps=4)) == 0
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # A checkpoint is saved after its step's record: step 2's shows in step 3's record, step 4's
    # (after the last record) only in the summary.
    assert [r["checkpoint_s"] == 0 for r in log] == [True, True, False, True]
    assert 0.2 <= log[2]["checkpoint_s"] < 30
    assert all(0 <= r["data_wait_s"] < 30 for r in log)
    summary = messages[-1]
    assert summary.startswith("train: finished step 4 of 4") and "data wait " in summary
    assert "2 checkpoint(s) in " in summary


def test_profile_steps_writes_a_chrome_trace_of_those_steps(tmp_path, messages):
    assert train(run_config(tmp_path, "--train.profile_steps=[2, 3]", steps=4)) == 0
    traces = list((tmp_path / "run" / "profile").iterdir())
    assert [t.name for t in traces] == ["steps2-3-rank0.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3", "data wait"} <= names
    assert not {"step 1", "step 4"} & names
    assert any(str(n).startswith("aten::") for n in names)   # the ops themselves are traced
    assert any(str(traces[0]) in m for m in messages)
    # The whole run is still logged; the trace only adds a file.
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4]


def test_profile_window_is_clipped_to_the_run(tmp_path, messages):
    # Past train.steps: no trace, and a line that says why.
    train(run_config(tmp_path, "--train.profile_steps=[5, 6]", steps=2))
    assert not (tmp_path / "run" / "profile").exists()
    assert any("train.profile_steps = [5, 6]: beyond train.steps = 2; no trace" in m
               for m in messages)
    # Ending inside the window: the steps the run has.
    train(run_config(tmp_path, "--train.profile_steps=[2, 9]", "--train.overwrite=true",
                     steps=3))
    assert (tmp_path / "run" / "profile" / "steps2-3-rank0.json").is_file()


@pytest.mark.parametrize("is_main,all_ranks,traced", [
    (True, False, True), (False, False, False), (False, True, True), (True, True, True)])
def test_profile_rank_0_or_every_rank(tmp_path, is_main, all_ranks, traced):
    config = run_config(tmp_path, "--train.profile_steps=[1, 2]",
                        f"--train.profile_all_ranks={str(all_ranks).lower()}")
    run = SimpleNamespace(config=config, step=0, out_dir=Path(tmp_path / "run"),
                          runtime=SimpleNamespace(is_main=is_main, rank=0 if is_main else 3,
                                                  device="cpu"),
                          logger=SimpleNamespace(message=lambda text: None))
    profiler = loop._StepProfiler.for_run(run)
    assert (profiler is not None) == traced
    if traced:   # each rank names its own file
        assert profiler.path.name == f"steps1-2-rank{0 if is_main else 3}.json"


def test_no_profile_steps_no_profiler(tmp_path):
    config = run_config(tmp_path)
    assert config.train.profile_steps == [] and config.train.profile_all_ranks is False
    run = SimpleNamespace(config=config, step=0, out_dir=tmp_path,
                          runtime=SimpleNamespace(is_main=True, rank=0, device="cpu"))
    assert loop._StepProfiler.for_run(run) is None


@pytest.mark.parametrize("value,message", [
    ("[0, 3]", r"train.profile_steps = \[0, 3\]: the first step must be >= 1"),
    ("[-2, 3]", r"train.profile_steps = \[-2, 3\]: the first step must be >= 1"),
    ("[4, 3]", r"train.profile_steps = \[4, 3\]: the first step must be <= the last"),
    ("[3]", r"train.profile_steps = \[3\]: expected \[first, last\]"),
    ("[1, 2, 3]", r"train.profile_steps = \[1, 2, 3\]: expected \[first, last\]"),
    ("[1.5, 3]", r"train.profile_steps = \[1.5, 3\]: expected \[first, last\]"),
    ("[true, 3]", r"train.profile_steps = \[True, 3\]: expected \[first, last\]"),
    ("3", r"'train.profile_steps': expected list"),
])
def test_profile_steps_is_validated(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"--train.profile_steps={value}"])


def test_profile_steps_accepts_one_step_and_the_empty_list():
    assert load_config(None, ["--train.profile_steps=[3, 3]"]).train.profile_steps == [3, 3]
    assert load_config(None, ["--train.profile_steps=[]"]).train.profile_steps == []
