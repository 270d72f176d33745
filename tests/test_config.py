import pytest

from rega_engine.config import ConfigError, load_config, parse_override


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, '[train]\nlr = 3e-4\nsteps = 50\n[roles]\nprompts = {law = "You are a lawyer."}\n')
    config = load_config(path, ["--train.steps=7", "--data.seq_len=512"])
    assert config.train.lr == 3e-4
    assert config.train.steps == 7
    assert config.data.seq_len == 512
    assert config.roles.prompts == {"law": "You are a lawyer."}
    assert config.data.too_long == "truncate"  # untouched default


def test_unknown_key_names_file_and_closest_key(tmp_path):
    path = write(tmp_path, "[train]\nlearning_rat = 1e-4\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'train\.learning_rat'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        load_config(None, ["--train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; did you mean 'train'"):
        load_config(None, ["--trian.lr=1e-4"])


def test_wrong_type_is_an_error_but_int_for_float_is_fine(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.steps': expected int, got float"):
        load_config(None, ["--train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"'data\.self_distillation': expected bool"):
        load_config(None, ["--data.self_distillation=1"])
    assert load_config(None, ["--train.lr=1"]).train.lr == 1.0


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_override_values_parse_as_toml_then_as_bare_strings():
    assert parse_override("--data.prepared=runs/x") == {"data": {"prepared": "runs/x"}}
    assert parse_override("--data.sizes={law=10}") == {"data": {"sizes": {"law": 10}}}
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_override("--lr=3")
