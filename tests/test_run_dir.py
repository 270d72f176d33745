"""A run's folder (train.out_dir) is never overwritten or shared by accident: a finished run is
refused unless --train.overwrite=true or --resume, a second run meets the first one's lock (which a
crash leaves stale, not stuck), a run stopped before its export is finished by --resume, the plot
comes after the export and never fails a run, and a SIGTERM leaves preempted.json beside its
checkpoint. All in one process on CPU, a few seconds each."""
from __future__ import annotations

import json
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    cli_args,
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
)

from rega_engine.cli import main  # noqa: E402
from rega_engine.errors import ConfigError  # noqa: E402
from rega_engine.train import loop, metrics, run_dir  # noqa: E402
from rega_engine.train.checkpoint import complete_checkpoints  # noqa: E402


def _finished_run(tmp_path, *extra: str):
    config = run_config(tmp_path, "--checkpoint.export=true", *extra, steps=2)
    assert loop.train(config) == 0
    return config


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("rega-engine train: "), err
    return err[-1]


def test_a_finished_run_is_refused_naming_what_it_holds(tmp_path, capsys):
    config = _finished_run(tmp_path)
    out = tmp_path / "run"
    (out / "eval.json").write_text("{}")
    weights = out / "hf" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (out / "log.jsonl").read_text())
    capsys.readouterr()
    assert main(["train", *cli_args(config)]) == 2
    line = _one_line(capsys)
    assert f"train.out_dir = {out} holds a finished run" in line
    assert "hf/" in line and "eval.json" in line and "log.jsonl of a completed run" in line
    assert "--train.overwrite=true" in line
    assert (weights.stat().st_mtime_ns, (out / "log.jsonl").read_text()) == before


@pytest.mark.parametrize("leftover", ["eval.json", "log.jsonl"])
def test_any_one_finished_output_is_enough_to_refuse(tmp_path, leftover):
    config = run_config(tmp_path, steps=2)
    assert loop.train(config) == 0   # no export: only a completed log
    out = tmp_path / "run"
    if leftover == "eval.json":
        (out / "log.jsonl").unlink()
        (out / "eval.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"holds a finished run \\({leftover}"):
        loop.train(config)


def test_a_log_cut_short_is_not_a_finished_run(tmp_path):
    """A run that crashed without checkpoints left only part of its log: run again, no flag."""
    config = run_config(tmp_path, steps=3)
    out = tmp_path / "run"
    out.mkdir(parents=True)
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "total_steps": 3}) + "\n")
    assert run_dir.finished_outputs(out) == []
    assert loop.train(config) == 0


def test_overwrite_replaces_the_finished_run_and_its_stale_eval(tmp_path, caplog):
    config = _finished_run(tmp_path, "--checkpoint.every=1")
    out = tmp_path / "run"
    (out / "eval.json").write_text("{}")
    (out / "preempted.json").write_text("{}")
    config.train.overwrite = True
    assert loop.train(config) == 0
    assert "train.overwrite = true: removed hf, eval.json, log.jsonl, checkpoints" in caplog.text
    assert not (out / "eval.json").exists() and not (out / "preempted.json").exists()
    assert (out / "hf" / "model.safetensors").is_file()
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_overwrite_keeps_a_linked_checkpoints_folder_and_empties_it(tmp_path):
    # checkpoints/ often links to a scratch disk: the link stays, the old checkpoints go.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(scratch, target_is_directory=True)
    config = _finished_run(tmp_path, "--checkpoint.every=1")
    assert sorted(p.name for p in scratch.iterdir()) == ["step_1", "step_2"]
    config.train.overwrite = True
    config.checkpoint.every = 0
    assert loop.train(config) == 0
    assert (out / "checkpoints").is_symlink() and list(scratch.iterdir()) == []


def test_a_folder_the_run_cannot_write_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:   # root writes anywhere: stand a file where a folder must be
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        config = run_config(tmp_path, steps=1)
        config.train.out_dir = str(blocker / "run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        config = run_config(tmp_path, steps=1)
        config.train.out_dir = str(locked / "run")
    capsys.readouterr()
    assert main(["train", *cli_args(config)]) == 2
    line = _one_line(capsys)
    assert "cannot prepare it for this run" in line and "point train.out_dir" in line


def test_resume_refuses_a_finished_run_without_checkpoints_and_overwrite_with_resume(tmp_path,
                                                                                      capsys):
    config = _finished_run(tmp_path)
    capsys.readouterr()
    assert main(["train", *cli_args(config), "--resume"]) == 2
    line = _one_line(capsys)
    assert "no checkpoint to resume from" in line and "--train.overwrite=true" in line
    assert main(["train", *cli_args(config), "--resume", "--train.overwrite=true"]) == 2
    assert "--resume and train.overwrite = true both given" in _one_line(capsys)


def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    config = run_config(tmp_path, steps=2)
    out = tmp_path / "run"
    holder = run_dir.lock_out_dir(out)   # the first run, still going
    try:
        capsys.readouterr()
        assert main(["train", *cli_args(config)]) == 2
        line = _one_line(capsys)
        assert f"train.out_dir = {out} is in use by another run" in line
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started 20" in line
        assert not (out / "log.jsonl").exists()   # the refused run wrote nothing
    finally:
        holder.release()
    assert loop.train(config) == 0
    assert not (out / run_dir.LOCK_FILE).exists()   # removed at a clean exit


def test_a_crashed_runs_stale_lock_is_detected_and_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir(parents=True)
    # What a killed run leaves: its record in the file, but no process holds the lock.
    (out / run_dir.LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 4242,
                                                      "started": "2024-01-02 03:04:05"}))
    assert loop.train(run_config(tmp_path, steps=1)) == 0
    assert ("the run before (host node7, pid 4242, started 2024-01-02 03:04:05) did not end "
            "cleanly") in caplog.text


def test_a_run_stopped_before_its_export_is_finished_by_resume(tmp_path, monkeypatch, capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", "--checkpoint.export=true", steps=4)
    out = tmp_path / "run"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "hf" / "model.safetensors"))

    monkeypatch.setattr(loop.hf_io, "export_pretrained", disk_full)
    with pytest.raises(OSError):
        loop.train(config)
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4] and not (out / "hf").exists()
    monkeypatch.undo()
    capsys.readouterr()
    # Without --resume the completed log is a finished run: refused, pointing at --resume.
    assert main(["train", *cli_args(config)]) == 2
    assert "--resume to continue from its checkpoint step_4" in _one_line(capsys)
    assert main(["train", *cli_args(config), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step 4 of 4: nothing left to train, only the export" in err
    assert (out / "hf" / "model.safetensors").is_file()
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]


def test_the_plot_comes_after_the_export_and_a_failed_plot_never_fails_the_run(tmp_path,
                                                                               monkeypatch,
                                                                               caplog):
    config = run_config(tmp_path, "--checkpoint.export=true", "--train.plot=true", steps=2)
    order = []
    export = loop.hf_io.export_pretrained

    def exporting(*args, **kwargs):
        order.append("export")
        return export(*args, **kwargs)

    def broken_plot(log_path, png_path):
        order.append("plot")
        raise RuntimeError("matplotlib backend exploded")

    monkeypatch.setattr(loop.hf_io, "export_pretrained", exporting)
    monkeypatch.setattr(metrics, "plot_loss_curves", broken_plot)
    assert loop.train(config) == 0
    assert order == ["export", "plot"]
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    assert "could not draw" in caplog.text and "matplotlib backend exploded" in caplog.text


def test_sigterm_leaves_preempted_json_that_the_next_run_clears(tmp_path, monkeypatch):
    config = run_config(tmp_path, "--checkpoint.export=true", steps=5)
    out = tmp_path / "run"
    # A SIGTERM that arrived before the first step ends: the run stops after step 1.
    monkeypatch.setattr(loop._StopRequest, "install", lambda self: setattr(self, "requested",
                                                                            True))
    assert loop.train(config) == loop.PREEMPTED_EXIT_CODE
    marker = json.loads((out / run_dir.PREEMPTED_FILE).read_text())
    assert marker["step"] == 1 and marker["steps"] == 5
    assert marker["checkpoint"] == str(complete_checkpoints(out)[-1][1])
    monkeypatch.undo()
    config.checkpoint.resume = True
    assert loop.train(config) == 0
    assert not (out / run_dir.PREEMPTED_FILE).exists()
    assert (out / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("key", ["train.collective_timeout_s", "train.progress_every_s"])
def test_timeouts_and_intervals_must_be_positive(tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key} = 0.0: must be a finite number of seconds > 0"):
        loop.train(run_config(tmp_path, f"--{key}=0"))


def test_lock_without_filesystem_support_warns_and_runs(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = run_dir.lock_out_dir(tmp_path / "run")
    assert lock.fd is None
    lock.release()
    assert "does not support locks" in caplog.text
    assert not (tmp_path / "run").exists()   # nothing written: nothing left behind


def test_a_run_refused_at_set_up_leaves_no_folder_behind(tmp_path, capsys):
    config = run_config(tmp_path, f"--model.init_config={tmp_path / 'missing.json'}")
    assert main(["train", *cli_args(config)]) == 2
    assert not (tmp_path / "run").exists()


def test_a_lock_file_removed_by_a_finishing_run_is_not_locked_twice(tmp_path, monkeypatch):
    """Run A ends (removes run.lock, unlocks) between run B's open and flock: B must not hold
    the removed file while run C locks a new one; B retries on the file at the path."""
    import fcntl
    out = tmp_path / "run"
    first = run_dir.lock_out_dir(out)
    real_flock = fcntl.flock
    calls = []

    def finishing_meanwhile(fd, operation):
        if not calls and operation & fcntl.LOCK_EX:
            first.release()   # A ends after B opened the file
        calls.append(operation)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", finishing_meanwhile)
    second = run_dir.lock_out_dir(out)
    try:
        assert len([c for c in calls if c & fcntl.LOCK_EX]) == 2   # retried on the new file
        assert os.fstat(second.fd).st_ino == os.stat(out / run_dir.LOCK_FILE).st_ino
    finally:
        second.release()


def test_a_lock_holder_that_is_starting_is_named_as_such(tmp_path):
    """The holder has the lock but has not written its record yet."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / run_dir.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ConfigError, match="a run that is just starting"):
            run_dir.lock_out_dir(out)
    finally:
        os.close(fd)
