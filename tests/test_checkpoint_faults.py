"""Faults in what a run resumes from and trains on: damaged or truncated checkpoints, another
run's checkpoints (another dataset, another model shape), a full disk while saving, a damaged
prepared dataset. Each one is either skipped by name (a damaged checkpoint, when a sound one is
left) or ends in one line and an exit status, never a traceback and never silently. The runs go
through `rega_engine.cli.main` in this process (tiny model, a few steps each)."""
from __future__ import annotations

import json
import os
import re
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    DOMAINS,
    cli_args,
    make_dataset,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    read_log,
    run_config,
    write_model_config,
)

from rega_engine.cli import main  # noqa: E402
from rega_engine.train import checkpoint as checkpoint_module  # noqa: E402
from rega_engine.train.checkpoint import checkpoint_root, complete_checkpoints  # noqa: E402


def _train(capsys, config, *extra: str) -> tuple[int, list[str]]:
    """`rega-engine train` with `config` and `extra` overrides: (exit status, stderr lines)."""
    capsys.readouterr()
    code = main(["train", *cli_args(config), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_line_error(code: int, lines: list[str], expected_code: int, pattern: str) -> str:
    """The command failed with `expected_code`, its last line matches `pattern`, and it printed no
    traceback."""
    text = "\n".join(lines)
    assert code == expected_code, text[-3000:]
    assert "Traceback" not in text and "Errno 22" not in text, text[-3000:]
    assert lines[-1].startswith("rega-engine train: "), text[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def _flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 1
    path.write_bytes(bytes(data))


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- damaged checkpoints -------------------------------------------------------------------------
def test_a_damaged_checkpoint_is_skipped_by_name_and_the_good_one_is_kept(tmp_path, capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", "--checkpoint.keep=2", steps=6)
    code, lines = _train(capsys, config)
    assert code == 0
    err = "\n".join(lines)
    # Saving says when it starts and ends, how much it wrote and how long it took.
    step_2 = checkpoint_root(tmp_path / "run") / "step_2"
    assert f"checkpoint: saving step 2 to {step_2} ..." in err
    assert re.search(rf"checkpoint: saved step 2, \d+\.\d MB in \d+\.\d s \(of which sha256 "
                     rf"\d+\.\d s\): {re.escape(str(step_2))}", err)
    uninterrupted = read_log(tmp_path / "run")
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [4, 6]
    meta = json.loads((checkpoint_root(tmp_path / "run") / "step_6" / "meta.json").read_text())
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "rank_0.pt"}

    # Bits flipped in the newest checkpoint: --resume names it, moves it aside and resumes from
    # the older one, bit for bit where the uninterrupted run was.
    step_6 = checkpoint_root(tmp_path / "run") / "step_6"
    _flip_byte(step_6 / "__0_0.distcp")
    code, lines = _train(capsys, config, "--resume")
    assert code == 0, "\n".join(lines)[-3000:]
    skipped = [line for line in lines if "skipping" in line]
    assert skipped == [f"--resume: skipping {step_6}: {step_6 / '__0_0.distcp'}: sha256 differs "
                       "from meta.json (the file changed after it was written); it is damaged, "
                       "moved to step_6.damaged; trying the next older checkpoint"]
    assert any(line.startswith(f"resumed from {step_6.with_name('step_4')} at step 4")
               for line in lines)
    resumed = read_log(tmp_path / "run")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"])
                                                              for r in uninterrupted]
    # keep = 2 kept the sound step 4 and the new step 6; the damaged one waits aside.
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [4, 6]
    assert (checkpoint_root(tmp_path / "run") / "step_6.damaged").is_dir()


def test_truncated_checkpoints_are_named_and_with_none_left_the_resume_stops(tmp_path, capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", "--checkpoint.keep=2", steps=4)
    assert _train(capsys, config)[0] == 0
    root = checkpoint_root(tmp_path / "run")
    distcp = root / "step_4" / "__0_0.distcp"
    os.truncate(distcp, distcp.stat().st_size // 2)
    rank_file = root / "step_2" / "rank_0.pt"
    os.truncate(rank_file, 10)
    code, lines = _train(capsys, config, "--train.steps=6", "--resume")
    _one_line_error(code, lines, 2, rf"^rega-engine train: --resume: every checkpoint in "
                    rf"{re.escape(str(root))} is damaged \(step_4, step_2; each moved aside as "
                    r"<name>\.damaged\): nothing to resume from; run again without --resume")
    err = "\n".join(lines)
    assert re.search(rf"skipping {re.escape(str(root / 'step_4'))}: {re.escape(str(distcp))} is "
                     r"\d+ bytes, meta.json says \d+ \(truncated\)", err)
    assert f"{rank_file} is 10 bytes, meta.json says" in err
    assert complete_checkpoints(tmp_path / "run") == []


def test_a_malformed_meta_json_entry_makes_that_checkpoint_damaged_not_a_traceback(tmp_path,
                                                                                  capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", "--checkpoint.keep=2", steps=4)
    assert _train(capsys, config)[0] == 0
    step_4 = checkpoint_root(tmp_path / "run") / "step_4"
    meta = json.loads((step_4 / "meta.json").read_text())
    name = sorted(meta["files"])[0]
    meta["files"][name] = {"bxtes": 1}   # parses, but is not what save wrote
    (step_4 / "meta.json").write_text(json.dumps(meta))
    code, lines = _train(capsys, config, "--train.steps=6", "--resume")
    assert code == 0, lines
    err = "\n".join(lines)
    assert f"the entry of {name} is malformed" in err and "Traceback" not in err
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [4, 6]   # from step 2


def test_a_truncated_checkpoint_written_before_checksums_is_one_line(tmp_path, capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", steps=2)
    assert _train(capsys, config)[0] == 0
    step_2 = checkpoint_root(tmp_path / "run") / "step_2"
    meta = json.loads((step_2 / "meta.json").read_text())
    del meta["files"], meta["dataset"]   # as an earlier version wrote it: nothing to verify
    (step_2 / "meta.json").write_text(json.dumps(meta))
    os.truncate(step_2 / "__0_0.distcp", 1000)
    code, lines = _train(capsys, config, "--train.steps=4", "--resume")
    _one_line_error(code, lines, 2, rf"^rega-engine train: {re.escape(str(step_2))}: DCP cannot "
                    r"read it \(.+\); the checkpoint is damaged: move it aside")
    assert f"--resume: {step_2} was written without checksums (an earlier version)" in lines[-2]


def test_pruning_keeps_checkpoints_that_verify_before_those_that_do_not(tmp_path):
    root = checkpoint_root(tmp_path)

    def checkpoint(step: int, *, files: bool = True, truncated: bool = False) -> None:
        path = root / f"step_{step}"
        path.mkdir(parents=True)
        (path / "data").write_bytes(b"x" * (50 if truncated else 100))
        meta = {"step": step, "world_size": 1}
        if files:
            meta["files"] = {"data": {"bytes": 100, "sha256": "-"}}
        (path / "meta.json").write_text(json.dumps(meta))

    checkpoint(2)
    checkpoint(4, files=False)      # written before checksums
    checkpoint(6, truncated=True)
    checkpoint(8)
    checkpoint_module._prune(tmp_path, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 8]
    checkpoint_module._prune(tmp_path, keep=1)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [8]


# -- another run's checkpoints -------------------------------------------------------------------
def test_resuming_on_another_dataset_is_one_line_before_anything_is_loaded(tmp_path, capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", steps=2)
    assert _train(capsys, config)[0] == 0
    make_dataset(tmp_path / "other", samples=40, seed=1)
    before = _tree(tmp_path / "run")
    step_2 = checkpoint_root(tmp_path / "run") / "step_2"
    code, lines = _train(capsys, config, "--train.steps=4", "--resume",
                         f"--data.prepared={tmp_path / 'other'}")
    _one_line_error(code, lines, 2, rf"--resume: {re.escape(str(step_2))} was trained on the "
                    rf"dataset {re.escape(str(tmp_path / 'data'))} \(fingerprint "
                    r"[0-9a-f]{12}, 96 samples\), but data.prepared = "
                    rf"{re.escape(str(tmp_path / 'other'))} holds "
                    r"another one \(fingerprint [0-9a-f]{12}, 40 samples\): resume with "
                    rf"--data.prepared={re.escape(str(tmp_path / 'data'))} \(the run's own "
                    r"dataset\), or start a new run in another train.out_dir$")
    assert _tree(tmp_path / "run") == before
    code, lines = _train(capsys, config, "--train.steps=4", "--resume", "--data.seq_len=48")
    _one_line_error(code, lines, 2, rf"--resume: {re.escape(str(step_2))} was saved with "
                    r"data.seq_len = 64, this run has 48 \(data.prepared = .*\): resume with the "
                    r"dataset and data settings the run started with, or start a new run")

    # A checkpoint of an earlier version records no dataset: the loader's plan still tells.
    meta = json.loads((step_2 / "meta.json").read_text())
    del meta["dataset"]
    (step_2 / "meta.json").write_text(json.dumps(meta))
    code, lines = _train(capsys, config, "--train.steps=4", "--resume",
                         f"--data.prepared={tmp_path / 'other'}")
    _one_line_error(code, lines, 2, rf"--resume: {re.escape(str(step_2))} was saved with 96 "
                    r"samples in data.prepared, this run has 40 \(data.prepared = .*other\): "
                    "resume with the dataset and data settings the run started with")


def test_resuming_with_another_model_shape_is_one_line(tmp_path, capsys):
    config = run_config(tmp_path, "--checkpoint.every=2", steps=2)
    assert _train(capsys, config)[0] == 0
    write_model_config(tmp_path / "wider.json", hidden_size=64, intermediate_size=128)
    step_2 = checkpoint_root(tmp_path / "run") / "step_2"
    code, lines = _train(capsys, config, "--train.steps=4", "--resume",
                         f"--model.init_config={tmp_path / 'wider.json'}")
    _one_line_error(code, lines, 2, rf"--resume: {re.escape(str(step_2))} holds a model of another "
                    r"shape: model\.embed_tokens\.weight is \[256, 128\] there and \[256, 64\] "
                    r"in this model \(\d+ tensors differ\); resume with the model the run "
                    r"started with \(model.init_config or model.path, and lora\), or start a new "
                    r"run")


# -- a full disk -----------------------------------------------------------------------------
def test_a_full_disk_while_saving_names_the_disk_the_folder_and_the_last_checkpoint(
        tmp_path, capsys, monkeypatch):
    config = run_config(tmp_path, "--checkpoint.every=2", steps=4)
    real_save = checkpoint_module.dcp.save
    calls = []

    def fills_the_disk(state, *, checkpoint_id, **kwargs):
        calls.append(checkpoint_id)
        if len(calls) == 1:
            return real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        # what torch's zip writer says when the disk is full: no errno, no path
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpoint_module.dcp, "save", fills_the_disk)
    monkeypatch.setattr("rega_engine.files.disk_usage", lambda path: Usage(10**12, 10**12, 0))
    code, lines = _train(capsys, config)
    root = checkpoint_root(tmp_path / "run")
    _one_line_error(code, lines, 1, rf"^rega-engine train: checkpoint step 4: writing "
                    rf"{re.escape(str(root / 'step_4.tmp'))} failed: no space left on device \(the "
                    r"disk at /\S*( \(\S+\))?: 0 B free of 1.0 TB\); the partial checkpoint was "
                    r"removed; the last complete checkpoint is "
                    rf"{re.escape(str(root / 'step_2'))}: free space \(or lower checkpoint.keep\), "
                    r"then run again with --resume$")
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]


# -- a damaged prepared dataset ------------------------------------------------------------------
def _sharded_dataset(path: Path, *, shards: int = 2, per_shard: int = 48, vocab: int = 256) -> Path:
    """A format-2 dataset (what prepare writes: shards plus an index with their sha256 sums) of
    the learnable samples train_helpers makes."""
    from rega_engine.data.dataset import ShardWriter, write_index

    rng = np.random.default_rng(0)
    entries, total_tokens = [], 0
    path.mkdir(parents=True)
    for k in range(shards):
        writer = ShardWriter(path / f"shard_{k:05d}")
        ids, masks, lengths = [], [], []
        for _ in range(per_shard):
            n = int(rng.integers(6, 40))
            start, stride = int(rng.integers(0, vocab - 4)), int(rng.integers(1, 4))
            ids.append(4 + (start + stride * np.arange(n)) % (vocab - 4))
            masks.append(np.arange(n) >= 3)
            lengths.append(n)
        writer.add_many(np.concatenate(ids), np.concatenate(masks), np.array(lengths),
                        np.arange(per_shard) % 3, rng.integers(0, 3, per_shard))
        record = writer.finish({})
        entries.append({"name": f"shard_{k:05d}", "num_samples": record["num_samples"],
                        "num_tokens": record["num_tokens"], "sha256": record["sha256"]})
        total_tokens += record["num_tokens"]
    write_index(path, {"num_samples": shards * per_shard, "num_tokens": total_tokens,
                       "domains": DOMAINS, "kinds": ["distilled", "role", "integration"],
                       "kind_weights": {"distilled": 1.0, "role": 1.0, "integration": 1.0},
                       "pad_id": 0, "vocab_size": vocab, "seq_len": 64, "shards": entries,
                       "report": {}})
    return path


def test_the_dataset_hash_shares_are_balanced_by_bytes(tmp_path):
    # Every shard holds one large tokens.bin beside small files: every 5th file to each of 5
    # ranks would hand one rank every tokens.bin. The shares split the bytes instead, and
    # together hash every file once.
    from rega_engine.data.dataset import TokenDataset

    data = TokenDataset(_sharded_dataset(tmp_path / "data", shards=5))
    files = [file for file, _ in data.checksummed_files()]
    shares = [_share_of(data, rank, 5) for rank in range(5)]
    assert sorted(f for share in shares for f in share) == sorted(files)
    assert [sum(f.name == "tokens.bin" for f in share) for share in shares] == [1] * 5
    damaged = data.path / "shard_00003" / "tokens.bin"
    _flip_byte(damaged, at=4 * 20)
    found = [p for rank in range(5) for p in data.damaged_files(rank, 5)]
    assert len(found) == 1 and found[0].startswith(f"{damaged}: sha256 differs")


def _share_of(data, rank: int, world_size: int) -> list[Path]:
    """The files rank `rank` hashes."""
    from unittest import mock

    hashed = []
    with mock.patch("rega_engine.data.dataset.file_sha256",
                    side_effect=lambda f: hashed.append(f) or ""):
        data.damaged_files(rank, world_size)
    return hashed


def test_a_damaged_shard_stops_a_fresh_run_and_a_verified_resume(tmp_path, capsys):
    data = _sharded_dataset(tmp_path / "data")
    config = run_config(tmp_path, "--checkpoint.every=2", steps=2)
    code, lines = _train(capsys, config)
    assert code == 0
    assert any(re.fullmatch(rf"data: the 10 files of {re.escape(str(data))} \(\d+\.\d KB\) match "
                            r"the sha256 sums of its meta.json \(\d+\.\d s\)", line)
               for line in lines), lines
    tokens = data / "shard_00001" / "tokens.bin"
    _flip_byte(tokens, at=4 * 20)   # the low bit of a token id: still inside the vocabulary
    damaged = (rf"^rega-engine train: {re.escape(str(tokens))}: sha256 differs from "
               rf"{re.escape(str(data / 'meta.json'))}: the shard is damaged; run `rega-engine "
               r"prepare` again to rebuild the dataset \(it rewrites damaged shards")
    # data.verify hashes at a resume too (without it a resume checks sizes only)
    code, lines = _train(capsys, config, "--train.steps=4", "--resume", "--data.verify=true")
    _one_line_error(code, lines, 2, damaged)
    # a run's first start always hashes its dataset
    code, lines = _train(capsys, config, f"--train.out_dir={tmp_path / 'fresh'}")
    _one_line_error(code, lines, 2, damaged)


def test_a_token_id_outside_the_vocabulary_is_one_line_naming_shard_and_sample(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    tokens = np.memmap(tmp_path / "data" / "tokens.bin", dtype=np.int32, mode="r+")
    tokens[:] = np.where(np.arange(len(tokens)) % 7 == 3, 60000, tokens)
    tokens.flush()
    del tokens
    config = run_config(tmp_path, steps=6)
    code, lines = _train(capsys, config)
    _one_line_error(code, lines, 2, rf"^rega-engine train: "
                    rf"{re.escape(str(tmp_path / 'data' / 'tokens.bin'))}: sample \d+ of the shard "
                    r"\(sample \d+ of the dataset\) holds token id 60000 at position \d+, outside "
                    r"the vocabulary 0..255 of .*meta.json; the shard is damaged")
