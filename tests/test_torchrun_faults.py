"""Faults under torchrun (2 gloo ranks on CPU), through the real launcher:

- pre-emption: SIGTERM to the torchrun agent (what a scheduler sends the job) or to one rank.
  torchrun itself exits 1 either way; the requeue recipe of docs/many-gpus.md reads
  <out_dir>/preempted.json
  and exits 143, and the requeued run resumes and finishes with 0;
- a frozen rank (SIGSTOP): rank 0 names it within the collective timeout and ends the job with one
  line naming the step;
- a killed rank (SIGKILL): rank 0 names it from the heartbeats and the job ends at once, not after
  the collective timeout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import cli_args, run_config  # noqa: E402

from rega_engine.train.checkpoint import complete_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TORCHRUN = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2"
# The requeue recipe of docs/many-gpus.md, as its lines are written there (a test checks they are).
RECIPE_PAGE = REPO / "docs" / "many-gpus.md"
RECIPE_LINES = ('rm -f "$OUT/preempted.json"', '[ -f "$OUT/preempted.json" ] && status=143')


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _rank_pid(agent: int, rank: int) -> int:
    for child in _children(agent):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return child
    raise AssertionError(f"no rank {rank} under torchrun pid {agent}")


def _logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if line.endswith("}")) \
        if log.exists() else 0


def _wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _logged_steps(out) < steps:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) early:\n"
                        f"{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the first steps")
        time.sleep(0.05)


def _recipe(tmp_path: Path, out: Path, args: list[str]) -> Path:
    script = tmp_path / "job.sh"
    train = " ".join(f"'{a}'" for a in args)
    script.write_text("\n".join([
        f"OUT='{out}'",
        RECIPE_LINES[0],
        f"{TORCHRUN} -m rega_engine.cli train {train}",
        "status=$?",
        'echo "torchrun exited $status" >&2',
        RECIPE_LINES[1],
        "exit $status",
    ]) + "\n")
    return script


def test_the_readme_holds_the_recipe_lines_this_test_runs():
    page = RECIPE_PAGE.read_text(encoding="utf-8")
    for line in RECIPE_LINES:
        assert line in page, line


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("target", ["agent", "rank 1"])
def test_preemption_under_torchrun_exits_143_through_the_recipe_and_resumes(tmp_path, target):
    config = run_config(tmp_path, "--checkpoint.export=true", steps=10_000)
    out = Path(config.train.out_dir)
    out.mkdir(parents=True)
    (out / "preempted.json").write_text("{}")   # an earlier stop's marker: not this job's word
    args = cli_args(config)
    job = subprocess.Popen(["bash", str(_recipe(tmp_path, out, args))], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(job, out, 2)
        assert not (out / "preempted.json").exists()   # cleared as the run started
        agent = _children(job.pid)[0]
        os.kill(agent if target == "agent" else _rank_pid(agent, 1), signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, output[-4000:]
    assert "torchrun exited 1" in output   # what torchrun alone would have told the scheduler
    marker = json.loads((out / "preempted.json").read_text())
    newest = complete_checkpoints(out)[-1]
    assert marker["checkpoint"] == str(newest[1]) and marker["step"] == newest[0]
    assert not (out / "hf").exists()

    # Requeued: the same job with --resume finishes, exports and exits 0, the marker gone.
    config.train.steps = newest[0] + 2
    resumed = subprocess.run(["bash", str(_recipe(tmp_path, out, [*cli_args(config),
                                                                  "--resume"]))],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert not (out / "preempted.json").exists()
    assert (out / "hf" / "model.safetensors").is_file()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_frozen_rank_is_named_and_ends_the_job_within_the_collective_timeout(tmp_path):
    timeout_s = 8
    config = run_config(tmp_path, f"--train.collective_timeout_s={timeout_s}", steps=10_000)
    out = Path(config.train.out_dir)
    job = subprocess.Popen([*TORCHRUN.split(), "-m", "rega_engine.cli", "train",
                            *cli_args(config)], env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        _wait_for_steps(job, out, 3)
        victim = _rank_pid(job.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        lines = []
        for line in job.stdout:   # read as it comes, to time the lines
            lines.append(line)
            if line.startswith("rega-engine train: "):
                break
        ended_after = time.monotonic() - stopped_at
        # torchrun would SIGKILL the frozen rank after its 30 s shutdown grace; waking it ends the
        # job sooner (its next collective finds rank 0 gone).
        os.kill(victim, signal.SIGCONT)
        rest, _ = job.communicate(timeout=120)
    finally:
        if victim is not None and job.poll() is None:
            os.kill(victim, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
    text = "".join(lines)
    assert ended_after < timeout_s + 10, text[-3000:]
    warning = next(line for line in lines if "waiting for rank 1" in line)
    assert warning.startswith("[rank 0] step ") and "no heartbeat for" in warning
    error = lines[-1]
    assert f"rank 0 waited train.collective_timeout_s = {timeout_s} s for the other ranks" in error
    assert "waiting for rank 1" in error and "--resume" in error
    assert job.returncode != 0
    assert "Traceback" not in text


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_job_ends_at_once(tmp_path):
    # The collective timeout is long on purpose: the job must end because the peer's connection
    # closed, not because a timeout ran out, and rank 0 must say which rank it lost.
    config = run_config(tmp_path, "--train.collective_timeout_s=120", steps=10_000)
    out = Path(config.train.out_dir)
    job = subprocess.Popen([*TORCHRUN.split(), "-m", "rega_engine.cli", "train",
                            *cli_args(config)], env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(job, out, 3)
        os.kill(_rank_pid(job.pid, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        text, _ = job.communicate(timeout=90)
        ended_after = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert ended_after < 60, text[-3000:]
    (line,) = [line for line in text.splitlines() if "lost its connection" in line]
    assert "rank 0 lost its connection to rank 1 (no heartbeat for " in line, line
    assert "the process died or its host went away" in line and "--resume" in line
    # No traceback of ours (torchrun prints its own ChildFailedError, naming rank 1's SIGKILL).
    assert not [line for line in text.splitlines()
                if line.strip().startswith('File "') and "/rega_engine/" in line]
