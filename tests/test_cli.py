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
