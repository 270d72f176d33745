from rega_engine.cli import main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train", "distill", "eval", "demo", "bench"):
        assert command in out


def test_unknown_command_and_bad_config_key_fail_clearly(capsys):
    assert main(["frobnicate"]) == 2
    assert main(["prepare", "--data.seq_lenn=4"]) == 2
    assert "did you mean 'data.seq_len'" in capsys.readouterr().err


def test_bad_train_settings_are_config_errors_naming_the_key(tmp_path, capsys):
    # Exit status 2 and one line naming the key, not a traceback.
    from train_helpers import make_dataset, write_model_config
    assert main(["train", "--train.steps=0"]) == 2
    assert "train.steps = 0: must be >= 1" in capsys.readouterr().err
    base = [f"--data.prepared={make_dataset(tmp_path / 'data', samples=8)}", "--train.device=cpu",
            f"--model.init_config={write_model_config(tmp_path / 'model.json')}",
            f"--train.out_dir={tmp_path / 'run'}", "--data.seq_len=64"]
    assert main(["train", *base, "--model.dtype=fp16"]) == 2
    assert "model.dtype = 'fp16'" in capsys.readouterr().err
    assert main(["train", *base, "--model.attention_backend=trition"]) == 2
    assert "model.attention_backend = 'trition'" in capsys.readouterr().err
