"""The CLI's rules that hold for every command: the exit status (docs/pipeline.md "Exit status"),
where a config's relative paths point, and which options a command's --help offers.

Every case runs in this process (`rega_engine.cli.main`) on tiny inputs; the jobs' own failures
(a non-finite loss, a full disk, SIGTERM) are stood in for by a fake `train` that raises or
returns what the real one does, so the table holds the CLI's mapping without training anything.
"""
from __future__ import annotations

import errno
import json
import re
import sys
import types
from pathlib import Path

import pytest

from rega_engine.cli import main
from rega_engine.errors import TrainingError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "rega_engine" / "demo" / "sample"


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:   # argparse's usage errors and --help
        code = e.code
    return code, capsys.readouterr().err


def fake_train(behaviour):
    """A stand-in for rega_engine.train.loop whose train() does `behaviour`."""
    def train(config):
        if isinstance(behaviour, BaseException):
            raise behaviour
        return behaviour
    return types.SimpleNamespace(train=train)


def wrong_instructions(tmp: Path) -> list[str]:
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")   # distill stops at the instructions, before loading
    return ["distill", f"--distill.instructions={SAMPLE / 'law.jsonl'}", f"--distill.model={model}",
            f"--distill.output={tmp / 'out.jsonl'}"]


def misspelt_domain(tmp: Path) -> list[str]:
    return ["prepare", f"--data.tokenizer={SAMPLE / 'tokenizer'}",
            f"--data.general={SAMPLE / 'general.jsonl'}", f"--data.files={SAMPLE / 'law.jsonl'}",
            "--roles.prompts={lawyer = 'You are a lawyer.'}", f"--data.prepared={tmp / 'p'}"]


# (case, argv or a function of the case's folder, a fake train's behaviour or None, exit status)
CASES = [
    ("help", ["--help"], None, 0),
    ("no command", [], None, 2),
    ("unknown command", ["frobnicate"], None, 2),
    ("unknown option", ["prepare", "--frobnicate"], None, 2),
    ("resume of a job that resumes by itself", ["prepare", "--resume"], None, 2),
    ("unknown config key", ["prepare", "--data.seq_lenn=4"], None, 2),
    ("value out of range", ["train", "--train.lr=-1"], None, 2),
    ("config file missing", ["prepare", "--config", "nowhere/run.toml"], None, 2),
    ("input file missing", lambda tmp: ["eval", f"--eval.general={tmp / 'none.jsonl'}",
                                        f"--eval.checkpoint={SAMPLE / 'tokenizer'}"], None, 2),
    ("tokenizer vocabulary too small",
     lambda tmp: ["tokenizer", str(SAMPLE / "corpus.txt"), "--out", str(tmp / "t"),
                  "--vocab-size", "100"], None, 2),
    ("misspelt domain", misspelt_domain, None, 2),
    ("distilling a file of answered chats", wrong_instructions, None, 2),
    ("train done", ["train"], 0, 0),
    ("train pre-empted (SIGTERM, checkpoint saved)", ["train"], 143, 143),
    ("train cannot go on", ["train"], TrainingError("step 6: the loss is nan"), 1),
    ("disk full", ["train"], OSError(errno.ENOSPC, "No space left on device", "ckpt/model.pt"), 1),
    ("a path the run needs is missing", ["train"],
     FileNotFoundError(errno.ENOENT, "No such file or directory", "data/meta.json"), 2),
    ("Ctrl-C", ["train"], KeyboardInterrupt(), 130),
]


@pytest.mark.parametrize("name, argv, behaviour, expected", CASES, ids=[c[0] for c in CASES])
def test_exit_status_follows_one_rule(name, argv, behaviour, expected, tmp_path, monkeypatch,
                                      capsys):
    monkeypatch.chdir(tmp_path)
    if behaviour is not None:
        monkeypatch.setitem(sys.modules, "rega_engine.train.loop", fake_train(behaviour))
    argv = argv(tmp_path) if callable(argv) else argv
    code, err = run(argv, capsys)
    assert code == expected, err
    assert "Traceback" not in err
    if isinstance(behaviour, BaseException):
        # the job's failures: one line, naming the command (and the absolute path, for a file)
        assert len(err.splitlines()) == 1 and err.startswith("rega-engine train: "), err
        if isinstance(behaviour, OSError):
            assert str(tmp_path / behaviour.filename) in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setitem(sys.modules, "rega_engine.train.loop", fake_train(ZeroDivisionError()))
    with pytest.raises(ZeroDivisionError):
        main(["train"])


EXIT_STATUS_PAGE = REPO / "docs" / "pipeline.md"   # the page that states the rule


def test_the_readme_states_the_rule_the_cases_hold():
    page = EXIT_STATUS_PAGE.read_text(encoding="utf-8")
    section = re.search(r"^#+ Exit status\n(.*?)(?=^#|\Z)", page, re.S | re.M)
    assert section, f"{EXIT_STATUS_PAGE.relative_to(REPO)} has no 'Exit status' section"
    for code in sorted({expected for *_, expected in CASES}):
        assert re.search(rf"^\| `{code}` \|", section.group(1), re.M), code


@pytest.mark.parametrize("job", ["prepare", "train", "distill", "eval"])
def test_resume_is_offered_only_where_it_acts(job, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([job, "--help"])
    assert exited.value.code == 0
    assert ("--resume" in capsys.readouterr().out) == (job == "train")


def test_resume_given_to_a_job_that_resumes_by_itself_says_what_to_do(capsys):
    code, err = run(["distill", "--resume"], capsys)
    assert code == 2
    assert "--resume is train's; distill answers only the instructions that have no answer" in err


# -- paths -------------------------------------------------------------------------------------
def test_relative_paths_follow_the_file_that_gives_them(tmp_path, monkeypatch):
    from rega_engine.config import load_config

    own = tmp_path / "own"
    own.mkdir()
    (own / "rega.toml").write_text('[data]\ngeneral = "distilled.jsonl"\n'
                                   'files = ["chats.jsonl", "/abs/mixed.jsonl"]\n'
                                   'domains = { law = "../law.jsonl" }\n'
                                   '[train]\nout_dir = "runs/rega"\n[eval]\noutput = ""\n')
    monkeypatch.chdir(tmp_path)   # the parent folder, as in `rega-engine eval --config own/...`
    config = load_config("own/rega.toml", ["--eval.general=held_out.jsonl"])
    assert config.data.general == str(own / "distilled.jsonl")
    assert config.data.files == [str(own / "chats.jsonl"), "/abs/mixed.jsonl"]
    assert config.data.domains == {"law": str(tmp_path / "law.jsonl")}
    assert config.train.out_dir == str(own / "runs" / "rega")
    # a default the file leaves is its folder's too; the command line's is the working directory's
    assert config.data.prepared == str(own / "runs" / "prepared")
    assert config.eval.general == str(tmp_path / "held_out.jsonl")
    assert config.eval.output == ""   # "" stays "not set"
    # the same config from inside its folder names the same files
    monkeypatch.chdir(own)
    again = load_config("rega.toml", [f"--eval.general={tmp_path / 'held_out.jsonl'}"])
    assert again.to_dict() == config.to_dict()


def test_a_path_only_the_old_rule_finds_is_named_with_both_readings(tmp_path, monkeypatch,
                                                                    caplog):
    # Before, relative paths followed the working directory: a run's folder that only that
    # reading finds would make a requeued --resume start over in an empty one. Say so.
    from rega_engine.config import load_config

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "rega.toml").write_text('[train]\nout_dir = "runs/rega"\n'
                                                '[data]\nfiles = ["chats.jsonl"]\n')
    (tmp_path / "runs" / "rega").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        load_config("own/rega.toml")
    assert (f"train.out_dir = 'runs/rega' is relative to the config file's folder, so it names "
            f"{tmp_path / 'own' / 'runs' / 'rega'}, which does not exist; "
            f"{tmp_path / 'runs' / 'rega'} (relative to the working directory) does") in caplog.text
    assert "data.files" not in caplog.text   # neither reading finds chats.jsonl: nothing to say


def test_eval_from_the_parent_folder_finds_what_train_wrote(tmp_path, monkeypatch, capsys):
    """The newcomer's case: the config in own/, its run's model in own/runs/rega/hf, and eval
    started from the parent folder. A wrong path is named absolute."""
    from bigram_model import make_bigram_checkpoint
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    own = tmp_path / "own"
    hf = own / "runs" / "rega" / "hf"
    make_bigram_checkpoint(hf, len(tok), {}, {tok.eos_token_id: 1.0},
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(hf)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (own / "eval.jsonl").write_text(json.dumps(row) + "\n")
    (own / "rega.toml").write_text('[train]\nout_dir = "runs/rega"\nthreads = 1\n'
                                   '[eval]\ngeneral = "eval.jsonl"\nmax_new_tokens = 2\n')
    monkeypatch.chdir(tmp_path)
    code, err = run(["eval", "--config", "own/rega.toml"], capsys)
    assert code == 0, err
    assert json.loads((own / "runs" / "rega" / "eval.json").read_text())["central"]["general"][
        "samples"] == 1
    code, err = run(["eval", "--config", "own/rega.toml", "--train.out_dir=runs/other"], capsys)
    assert code == 2
    assert f"{tmp_path / 'runs' / 'other' / 'hf'} is not a model directory" in err
