"""`rega-engine export` (issue 25, part 2): a checkpoint becomes the Hugging Face folder the end of
its run would have written, bit for bit (and the PEFT adapter for [lora] runs), from the
checkpoint alone or, for one that predates meta.json's "model", with the run's --config; a damaged
checkpoint is refused naming the file. The several-process case (a 2 x 2 HSDP checkpoint) is in
tests/test_hsdp.py."""
from __future__ import annotations

import json
import os
import sys

import pytest
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    run_config,
)

from rega_engine.cli import main  # noqa: E402
from rega_engine.train.checkpoint import checkpoint_root  # noqa: E402
from rega_engine.train.loop import train  # noqa: E402

LORA = ("--lora.rank=4", "--lora.alpha=8", "--lora.target_modules=['q_proj', 'down_proj']")


def assert_same_weights(got_dir, expected_dir) -> None:
    got = load_file(got_dir / "model.safetensors" if got_dir.is_dir() else got_dir)
    expected = load_file(expected_dir / "model.safetensors" if expected_dir.is_dir()
                         else expected_dir)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].equal(expected[name]), name


def _finished_run(tmp_path, *extra):
    assert train(run_config(tmp_path, "--checkpoint.every=2", "--checkpoint.export=true", *extra,
                            steps=4)) == 0
    return tmp_path / "run"


def test_export_writes_what_the_run_exported(tmp_path, capsys):
    run = _finished_run(tmp_path, "--model.dtype=bf16")
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint_root(run) / "step_4"),
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    assert_same_weights(out, run / "hf")   # bf16, as the run's compute dtype
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (run / "hf" / "config.json").read_text())
    # A run's folder stands for its newest checkpoint; --dtype overrides; --out is not replaced
    # unless asked to.
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp32",
                 "--overwrite"]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {
        __import__("torch").float32}


def test_export_of_a_lora_checkpoint_gives_the_merged_model_and_the_adapter(tmp_path):
    pytest.importorskip("peft")
    run = _finished_run(tmp_path, *LORA)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint_root(run) / "step_4"),
                 "--out", str(out)]) == 0
    assert_same_weights(out, run / "hf")
    assert_same_weights(tmp_path / "exported_adapter" / "adapter_model.safetensors",
                        run / "hf_adapter" / "adapter_model.safetensors")
    assert_same_weights(tmp_path / "exported_base", run / "hf_base")
    adapter = json.loads((tmp_path / "exported_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "exported_base")


def test_an_older_checkpoint_takes_the_run_config_and_a_damaged_one_is_refused(tmp_path, capsys):
    run = _finished_run(tmp_path)
    step_4 = checkpoint_root(run) / "step_4"
    meta = json.loads((step_4 / "meta.json").read_text())
    del meta["model"]   # as checkpoints were written before it existed
    (step_4 / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(step_4), "--out", str(out)]) == 2
    assert "does not name the model" in capsys.readouterr().err
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\ninit_config = "{tmp_path / "model.json"}"\n')
    assert main(["export", "--checkpoint", str(step_4), "--out", str(out), "--config",
                 str(toml)]) == 0
    assert_same_weights(out, run / "hf")   # fp32 on CPU either way

    data = step_4 / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    assert main(["export", "--checkpoint", str(step_4), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{step_4} is damaged: {data}: sha256 differs" in err
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", "x"]) == 2
