"""Checkpoints: a run killed with SIGKILL and resumed is bit-identical to one never interrupted;
SIGTERM saves and exits 143 (not finished: `train && eval` must stop); a NaN stops the run naming
the step and leaves the last checkpoint
intact. The killed and resumed runs go through the real CLI in subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    cli_args,
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
)

from rega_engine.errors import ConfigError  # noqa: E402
from rega_engine.model.llama import CausalLM  # noqa: E402
from rega_engine.train.checkpoint import checkpoint_root, complete_checkpoints  # noqa: E402
from rega_engine.train.loop import PREEMPTED_EXIT_CODE, TrainingError, train  # noqa: E402

# One thread everywhere: the runs compared bit for bit must do their float sums in the same order.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rega_engine.cli", "train", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 300, returncode: int = 0) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == returncode, out[-2000:] + err[-5000:]
    return err


def _logged_steps(run_dir) -> list[int]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        if line.endswith("}"):   # a line being written is not a step yet
            steps.append(int(line.split('"step": ')[1].split(",")[0]))
    return steps


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before "
                        f"{what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    steps = 14
    config = run_config(tmp_path, "--checkpoint.every=4", "--checkpoint.keep=2",
                        "--checkpoint.export=true", steps=steps)
    args = cli_args(config)
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = _start([*args, f"--train.out_dir={reference_dir}"])

    victim = _start([*args, f"--train.out_dir={run_dir}"])

    def checkpoint_then_a_later_step():
        done = complete_checkpoints(run_dir)
        return bool(done) and any(s > done[-1][0] for s in _logged_steps(run_dir))

    _wait_for(checkpoint_then_a_later_step, victim, "a checkpoint and a later step")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    killed_at = max(_logged_steps(run_dir))
    assert killed_at < steps, "the run finished before it was killed"
    assert not (run_dir / "hf").exists()
    resume_from = complete_checkpoints(run_dir)[-1][0]

    err = _finish(_start([*args, f"--train.out_dir={run_dir}", "--resume"]))
    assert f"step_{resume_from}" in err and f"at step {resume_from}" in err
    _finish(reference)

    expected, got = read_log(reference_dir), read_log(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in expected]
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]
    assert [r["loss_by_domain"] for r in got] == [r["loss_by_domain"] for r in expected]
    final_expected = load_file(reference_dir / "hf" / "model.safetensors")
    final_got = load_file(run_dir / "hf" / "model.safetensors")
    assert final_expected.keys() == final_got.keys()
    for name in final_expected:
        assert torch.equal(final_got[name], final_expected[name]), name
    # keep=2: only the two newest complete checkpoints remain, and no temporary directory.
    assert [s for s, _ in complete_checkpoints(run_dir)] == [12, 14]
    assert not [p for p in checkpoint_root(run_dir).iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143_saying_how_to_resume(tmp_path):
    config = run_config(tmp_path, "--checkpoint.every=0", "--checkpoint.export=true", steps=200)
    run_dir = tmp_path / "run"
    proc = _start(cli_args(config))
    _wait_for(lambda: len(_logged_steps(run_dir)) >= 2, proc, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    # 128 + SIGTERM: what Slurm's --requeue and `train && eval` read as "not done".
    assert PREEMPTED_EXIT_CODE == 143
    err = _finish(proc, timeout=120, returncode=143)
    last = max(_logged_steps(run_dir))
    assert last < 200
    saved = complete_checkpoints(run_dir)
    assert [s for s, _ in saved] == [last]
    assert f"checkpoint saved to {saved[0][1]}" in err
    assert "exiting with status 143" in err and "--resume" in err
    assert not (run_dir / "hf").exists()   # a pre-empted run is not finished: no export


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = run_config(tmp_path, "--checkpoint.every=2", "--checkpoint.keep=5",
                        "--checkpoint.export=true", steps=8)
    run_dir = tmp_path / "run"
    forward = CausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:   # grad_accum 1: the fifth forward is step 5
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CausalLM, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"^step 5: non-finite loss") as error:
        train(config)
    assert str(checkpoint_root(run_dir) / "step_4") in str(error.value)
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2, 4]
    assert [p.name for p in checkpoint_root(run_dir).iterdir() if p.name.endswith(".tmp")] == []
    assert max(_logged_steps(run_dir)) == 4
    assert not (run_dir / "hf").exists()

    # The checkpoint before the NaN is whole: the run resumes from it and finishes.
    monkeypatch.setattr(CausalLM, "forward", forward)
    # a fresh run into the same out_dir would mix its checkpoints with these: a usage mistake
    with pytest.raises(ConfigError, match="pass --resume"):
        train(config)
    config.checkpoint.resume = True
    assert train(config) == 0
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(r["loss"] == r["loss"] for r in log)   # no NaN anywhere
    assert (run_dir / "hf" / "model.safetensors").is_file()
