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


def test_a_command_line_value_wins_over_the_files_alternative(tmp_path, capsys):
    # `train --config run.toml --train.epochs=1` on a file that sets train.steps: one pass, not
    # the file's steps, and the log says why; two alternatives on the command line are refused.
    import json

    from train_helpers import make_dataset, write_model_config

    from rega_engine.data.loader import PackedLoader
    data = make_dataset(tmp_path / "data", samples=48)
    config = tmp_path / "run.toml"
    config.write_text(
        f"[model]\ninit_config = {json.dumps(str(write_model_config(tmp_path / 'model.json')))}\n"
        f"[data]\nprepared = {json.dumps(str(data))}\nseq_len = 64\n"
        f"[train]\nout_dir = {json.dumps(str(tmp_path / 'run'))}\nsteps = 40\n"
        "micro_batch_size = 4\nlr = 3e-3\nwarmup_steps = 1\ndevice = \"cpu\"\nprogress = false\n"
        "plot = false\nthreads = 1\n[checkpoint]\nexport = false\n")
    assert main(["train", "--config", str(config), "--train.epochs=1"]) == 0
    one_pass = len(PackedLoader(data, seq_len=64, batch_size=4, seed=0, prefetch=0))
    assert 1 < one_pass < 40
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text()
             .splitlines() if line.strip()]
    assert steps[-1] == one_pass
    err = capsys.readouterr().err
    assert f"train.steps = 40 from {config} is ignored: the command line sets train.epochs" in err
    assert f"train.epochs = 1: {one_pass} steps (train.steps derived from train.epochs)" in err

    assert main(["train", "--config", str(config), "--train.epochs=1", "--train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rega-engine train: train.epochs = 1.0 and train.steps = 5 are both set; "
                          "give one")
    assert len(err.splitlines()) == 1
