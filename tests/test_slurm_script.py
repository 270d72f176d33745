"""configs/slurm-llama3-8b.sbatch (issue 25, part 5) cannot rot: it is valid bash, it runs with
stand-ins for srun, scontrol and torchrun (requeueing exactly when the run leaves
run_dir.PREEMPTED_FILE, also when the batch shell gets the SIGTERM itself), and the arguments
it gives torchrun and `rega-engine train` are parsed by the real torchrun parser and the real
CLI into the configuration the script promises."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rega_engine import cli
from rega_engine.train import loop, run_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "configs" / "slurm-llama3-8b.sbatch"
CONFIG = "configs/llama3-8b-8gpu.toml"

# srun: drop its options, run the command (one node here). scontrol: the node list, and the
# requeue recorded. torchrun: its arguments recorded (NUL-separated), then what FAKE_MODE says.
FAKES = {
    "srun": """#!/bin/bash
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
""",
    "scontrol": """#!/bin/bash
case "$1" in
  show) printf 'gpu-node-017\\ngpu-node-018\\n' ;;
  requeue) echo "$@" >> "$FAKE_DIR/scontrol.log" ;;
  *) exit 1 ;;
esac
""",
    "torchrun": """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_DIR/torchrun.args"
case "$FAKE_MODE" in
  finished) exit 0 ;;
  crashed) exit 1 ;;
  preempted) sleep "${FAKE_DELAY:-0}"; mkdir -p "$(dirname "$FAKE_MARKER")"
             echo '{"step": 7}' > "$FAKE_MARKER"; exit 1 ;;
esac
""",
}


def _run(tmp_path, mode, *extra, delay=0.0, term=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable, "FAKE_DIR": str(tmp_path), "FAKE_MODE": mode,
           "FAKE_DELAY": str(delay), "FAKE_MARKER": str(out / run_dir.PREEMPTED_FILE),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[017-018]"}
    proc = subprocess.Popen(["bash", str(SCRIPT), f"--train.out_dir={out}", *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if term:   # Slurm's pre-emption signals the batch shell too, here while torchrun runs
        deadline = time.monotonic() + 30
        while not (tmp_path / "torchrun.args").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    requeues = tmp_path / "scontrol.log"
    return proc.returncode, output, requeues.read_text() if requeues.exists() else ""


def test_the_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_directives():
    text = SCRIPT.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?\s*$", text, re.M))
    # every directive line has the plain form sbatch reads (no trailing comment to trip it)
    assert len(directives) == len(re.findall(r"^#SBATCH", text, re.M))
    assert "requeue" in directives and directives["ntasks-per-node"] == "1"
    assert directives["gpus-per-node"] == "8"
    assert re.fullmatch(r"TERM@\d+", directives["signal"])


def test_arguments_are_what_torchrun_and_rega_engine_accept(tmp_path, monkeypatch):
    status, output, requeues = _run(tmp_path, "finished", "--train.steps=123")
    assert status == 0 and requeues == "", output
    argv = (tmp_path / "torchrun.args").read_text().split("\0")[:-1]

    from torch.distributed.run import get_args_parser
    args = get_args_parser().parse_args(argv)
    assert args.rdzv_backend == "c10d" and args.rdzv_id == "4242"
    assert args.rdzv_endpoint == "gpu-node-017:29500"     # the job's first node
    assert args.nnodes == "2" and args.nproc_per_node == "8"
    signal_s = int(re.search(r"^#SBATCH --signal=TERM@(\d+)", SCRIPT.read_text(), re.M)[1])
    # torchrun waits this long for the ranks' checkpoint after the notice: it must fit before
    # Slurm's kill
    assert 30 <= int(args.shutdown_timeout) < signal_s
    assert args.module and args.training_script == "rega_engine.cli"

    # The rest through rega-engine's own CLI, up to the config the run would get.
    seen = []
    monkeypatch.setattr(loop, "train", lambda config: seen.append(config) or 0)
    monkeypatch.chdir(REPO)
    assert cli.main(args.training_script_args) == 0
    [config] = seen
    assert args.training_script_args[:3] == ["train", "--config", CONFIG]
    assert config.checkpoint.resume is True                 # every start passes --resume
    assert (config.parallel.dp_replicate, config.parallel.dp_shard) == (-1, "auto")   # HSDP
    assert config.train.steps == 123                        # the job's own overrides follow
    assert config.train.out_dir == str(tmp_path / "run")
    assert str(tmp_path / "run") in output                   # the out_dir it watches


def test_preempted_run_is_requeued(tmp_path):
    status, output, requeues = _run(tmp_path, "preempted")
    assert status == loop.PREEMPTED_EXIT_CODE == 143, output
    assert requeues.split() == ["requeue", "4242"]


def test_sigterm_to_the_batch_shell_still_requeues(tmp_path):
    # The batch shell gets the notice while torchrun's ranks save: it must wait for them.
    status, output, requeues = _run(tmp_path, "preempted", delay=1.0, term=True)
    assert status == 143, output
    assert requeues.split() == ["requeue", "4242"]


@pytest.mark.parametrize("stale_marker", [False, True])
def test_a_crash_is_not_requeued(tmp_path, stale_marker):
    if stale_marker:   # an earlier stop's marker must not speak for this start
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / run_dir.PREEMPTED_FILE).write_text("{}")
    status, output, requeues = _run(tmp_path, "crashed")
    assert status == 1 and requeues == "", output
    assert not (tmp_path / "run" / run_dir.PREEMPTED_FILE).exists()


def test_the_script_names_the_marker_the_run_writes():
    assert f'MARKER="$OUT/{run_dir.PREEMPTED_FILE}"' in SCRIPT.read_text()
