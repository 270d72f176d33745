"""Sharded prepare: shards plus one index, the same bytes whatever the number of processes
(torchrun or a --shard i/n job array), resuming from complete shards, and every dropped row counted
over all processes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from test_prepare import sample_config, tree_bytes
from tiny_tokenizer import SAMPLE_DIR

from rega_engine.data import prepare as prepare_module
from rega_engine.data.dataset import TokenDataset
from rega_engine.data.prepare import prepare

SHARD = 40    # 314 samples -> 8 shards


def with_bad_rows(tmp_path):
    """law.jsonl plus a row of bad JSON and a sample the tokenizer cannot render."""
    law = tmp_path / "law.jsonl"
    # written once: a rewritten source is a new input (its mtime is in the fingerprint)
    if law.exists():
        return {"law": str(law), "medicine": str(SAMPLE_DIR / "medicine.jsonl")}
    shutil.copy(SAMPLE_DIR / "law.jsonl", law)
    with open(law, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a</s>"}]}) + "\n")
    return {"law": str(law), "medicine": str(SAMPLE_DIR / "medicine.jsonl")}


def config(tmp_path, name, **data):
    return sample_config(tmp_path, shard_samples=SHARD, workers=1, prepared=str(tmp_path / name),
                         domains=with_bad_rows(tmp_path), **data)


def test_a_job_array_writes_the_single_process_bytes_and_the_index_comes_last(tmp_path, capsys):
    single = prepare(config(tmp_path, "one"))
    data = TokenDataset(tmp_path / "one")
    assert len(data.shards) == 8 and len(data) == single["samples"]["total"]
    meta = data.meta
    assert [s["name"] for s in meta["shards"]] == [f"shard_{k:05d}" for k in range(8)]
    assert meta["report"]["rows_rejected"] == {"bad JSON": 1}
    assert meta["report"]["samples_unrenderable"] == {"special token in text": 1}
    assert meta["report"]["tokens_by_domain"]["law"] > 0
    assert meta["config"]["data"]["shard_samples"] == SHARD
    data.verify()   # every file matches the sha256 the index holds
    # The loader reads every shard through its memory maps: each sample once per epoch, intact.
    from collections import Counter

    from rega_engine.data.loader import PackedLoader
    want = Counter(tuple(data.sample(i)[0].tolist()) for i in range(len(data)))
    got = Counter()
    for batch in PackedLoader(data, batch_size=4, prefetch=2):
        ids, cu = batch.input_ids.reshape(-1).numpy(), batch.cu_seqlens.numpy()
        kinds = batch.kind_ids.reshape(-1).numpy()
        got.update(tuple(ids[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:]) if kinds[a] >= 0)
    assert got == want

    part = prepare(config(tmp_path, "array"), shard=(1, 2))
    assert part["shards_written"] == 4 and not (tmp_path / "array" / "meta.json").exists()
    assert "4 of 8 complete" in capsys.readouterr().out
    done = prepare(config(tmp_path, "array"), shard="0/2")
    assert done["samples"] == single["samples"]
    assert done["samples_unrenderable"] == {"special token in text": 1}
    assert tree_bytes(tmp_path / "array") == tree_bytes(tmp_path / "one")


def test_an_interrupted_prepare_resumes_from_its_complete_shards(tmp_path, monkeypatch, capsys):
    fresh = config(tmp_path, "fresh")
    prepare(fresh)
    written = []
    real = prepare_module.write_shard

    def dies_after_three(directory, *args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(directory.name)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tmp_path, "resumed"))
    out = tmp_path / "resumed"
    assert not (out / "meta.json").exists()
    assert sorted(p.name for p in out.iterdir()) == written == ["shard_00000", "shard_00001",
                                                                "shard_00002"]
    with pytest.raises(FileNotFoundError, match="not a complete prepared dataset"):
        TokenDataset(out)
    kept = {name: (out / name / "tokens.bin").stat().st_ino for name in written}

    written.clear()
    monkeypatch.setattr(prepare_module, "write_shard", lambda d, *a, **k: (written.append(d.name),
                                                                            real(d, *a, **k))[1])
    prepare(config(tmp_path, "resumed"))
    assert written == [f"shard_{k:05d}" for k in range(3, 8)]   # only the missing ones
    assert {name: (out / name / "tokens.bin").stat().st_ino for name in kept} == kept
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")

    # A finished dataset of another config is not replaced unless the user says so; then its
    # shards are not reused: every shard is written again, the index replaced.
    written.clear()
    with pytest.raises(FileExistsError, match=r"holds a finished prepared dataset made from "
                       r"another config \(data\.seed 0 -> 1\); pass --data\.overwrite=true"):
        prepare(config(tmp_path, "resumed", seed=1))
    assert written == [] and tree_bytes(out) == tree_bytes(tmp_path / "fresh")
    report = prepare(config(tmp_path, "resumed", seed=1, overwrite=True))
    assert len(written) == 8 and TokenDataset(out).meta["config"]["data"]["seed"] == 1
    assert report["samples"]["total"] == TokenDataset(out).meta["report"]["samples"]["total"]


def test_a_format_1_dataset_and_foreign_files_in_the_output(tmp_path):
    from rega_engine.data.dataset import TokenDatasetWriter
    with TokenDatasetWriter(tmp_path / "old", domains=["general"], kind_weights={}, pad_id=0,
                            vocab_size=10,
                            seq_len=8) as writer:
        writer.add([1, 2], [0, 1], 0, 0)
    with pytest.raises(FileExistsError, match=r"a dataset of format 1, written by another "
                       r"version\); pass --data.overwrite=true"):
        prepare(config(tmp_path, "old"))
    prepare(config(tmp_path, "old", overwrite=True))
    assert not (tmp_path / "old" / "tokens.bin").exists() and len(TokenDataset(tmp_path
                                                                               / "old").shards) == 8
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare(config(tmp_path, "notes"))


def test_of_two_processes_completing_at_once_only_the_first_writes_the_index(tmp_path):
    # The second to take the index lock finds the index of this fingerprint written after it
    # started, and neither rewrites it nor prints the report again; a later rerun does.
    import json
    import time

    from rega_engine.data import prepare as prepare_module

    out = tmp_path / "one"
    before = time.time() - 1
    prepare(config(tmp_path, "one"))
    fingerprint = json.loads((out / "meta.json").read_text())["fingerprint"]
    with prepare_module._IndexLock(out):
        assert prepare_module._index_written_since(out, fingerprint, before)
        assert not prepare_module._index_written_since(out, "another", before)
        assert not prepare_module._index_written_since(out, fingerprint, time.time() + 1)
    assert not (out / ".index.lock").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_processes_share_the_prepare_and_write_the_single_process_bytes(tmp_path):
    single = config(tmp_path, "one")
    prepare(single)
    toml = tmp_path / "run.toml"
    c = single.data
    toml.write_text("\n".join([
        "[roles]", f'central_prompt = "{single.roles.central_prompt}"',
        "[roles.prompts]", *(f'{k} = "{v}"' for k, v in single.roles.prompts.items()),
        "[data]", f'tokenizer = "{c.tokenizer}"', f'general = "{c.general}"',
        f"seq_len = {c.seq_len}",
        f"shard_samples = {SHARD}", "workers = 1", f'prepared = "{tmp_path / "two"}"',
        "[data.domains]", *(f'{k} = "{v}"' for k, v in c.domains.items()), ""]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2",
                             "-m", "rega_engine.cli", "prepare", "--config", str(toml)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert ("(process 0 of 2): 315 samples in 8 shard(s) of 40, 4 of them this process's"
            in result.stderr)
    assert result.stdout.count("prepared ") == 1   # one report, from rank 0
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_the_default_shard_size_gives_up_to_64_processes_an_even_share():
    from rega_engine.data.prepare import shard_size

    assert shard_size(0, 142_250) == 2223          # 64 shards, the last one a little smaller
    assert -(-142_250 // shard_size(0, 142_250)) == 64
    assert shard_size(0, 500) == 1024              # one shard for a small mixture
    assert shard_size(0, 100_000_000) == 16384     # big mixtures: shards of at most 16384
    assert shard_size(5000, 142_250) == 5000       # a set size is kept


def _flip_byte(path, at: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_a_rerun_writes_a_damaged_shard_again_and_removes_stale_temporaries(tmp_path, monkeypatch,
                                                                            capsys):
    from rega_engine.errors import DataError

    fresh = config(tmp_path, "fresh")
    prepare(fresh)
    out = tmp_path / "fresh"
    reference = tree_bytes(out)
    _flip_byte(out / "shard_00003" / "tokens.bin")
    # Opening checks sizes only (unchanged here); the hashes name the damaged file.
    with pytest.raises(DataError, match=r"shard_00003/tokens.bin: sha256 differs from .*meta\.json"
                       r".*the shard is damaged; run `rega-engine prepare` again"):
        TokenDataset(out).verify()
    # What a prepare killed (or stopped by a full disk) leaves behind.
    (out / ".shard_00005.tmp-99999").mkdir()
    (out / ".shard_00005.tmp-99999" / "tokens.bin").write_bytes(b"partial")
    (out / ".plan-dead").mkdir()
    (out / ".meta.json.tmp-4242").write_text("{")
    capsys.readouterr()

    written = []
    real = prepare_module.write_shard
    monkeypatch.setattr(prepare_module, "write_shard", lambda d, *a, **k: (written.append(d.name),
                                                                            real(d, *a, **k))[1])
    prepare(fresh)   # the same config: allowed, and the damaged shard is not kept
    err = capsys.readouterr().err
    assert written == ["shard_00003"]
    assert re.search(r"shard_00003/tokens.bin: sha256 differs from .*shard_00003/shard.json: the "
                     r"shard is damaged; writing it again", err)
    assert "removed 2 temporary file(s)" in err and "removed 1 temporary shard(s)" in err
    assert tree_bytes(out) == reference   # hidden temporaries gone, the shard's bytes restored
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def _toml(c, path) -> str:
    """The config of `c` as a run TOML, for the CLI."""
    path.write_text("\n".join([
        "[roles]", f'central_prompt = "{c.roles.central_prompt}"',
        "[roles.prompts]", *(f'{k} = "{v}"' for k, v in c.roles.prompts.items()),
        "[data]", f'tokenizer = "{c.data.tokenizer}"', f'general = "{c.data.general}"',
        f"seq_len = {c.data.seq_len}", f"shard_samples = {c.data.shard_samples}", "workers = 1",
        f'prepared = "{c.data.prepared}"',
        "[data.domains]", *(f'{k} = "{v}"' for k, v in c.data.domains.items()), ""]))
    return str(path)


def test_a_full_disk_in_prepare_is_one_line_naming_the_disk_and_the_next_run_resumes(
        tmp_path, monkeypatch, capsys):
    import errno

    from rega_engine.cli import main
    from rega_engine.data.dataset import ShardWriter

    c = config(tmp_path, "full")
    toml = _toml(c, tmp_path / "run.toml")
    real_add = ShardWriter.add_many

    def disk_fills_in_shard_3(self, *args):
        real_add(self, *args)   # part of the shard is on disk, as when a write fails half way
        if self.dir.name == "shard_00003":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "add_many", disk_fills_in_shard_3)
    capsys.readouterr()
    assert main(["prepare", "--config", toml]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    out = tmp_path / "full"
    assert re.fullmatch(rf"rega-engine prepare: {re.escape(str(out))}: writing shard_00003 "
                        r"failed: no space left on device \(the disk at /\S* .*free of .*\); the 3 "
                        r"shard\(s\) this run completed before are kept and its temporary files "
                        r"removed: free space and run `rega-engine prepare` again, it resumes from "
                        r"the complete shards", err[-1]), err[-1]
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000", "shard_00001", "shard_00002"]

    # The planning files past data.memory_gb live in the output folder too.
    monkeypatch.setattr(ShardWriter, "add_many", real_add)
    monkeypatch.setattr(prepare_module, "build_mixture", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    assert main(["prepare", "--config", toml]) == 1
    assert re.fullmatch(rf"rega-engine prepare: {re.escape(str(out))}: writing to it failed: no "
                        r"space left on device \(.*\); the complete shards are kept .*",
                        capsys.readouterr().err.strip().splitlines()[-1])

    monkeypatch.undo()
    assert main(["prepare", "--config", toml]) == 0
    assert "8 of them this process's, 3 already complete" in capsys.readouterr().err
    TokenDataset(out).verify()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as on Linux")
def test_a_write_that_really_fails_leaves_no_temporary_shard(tmp_path):
    """A real failing write (the file-size limit, which fails like a full disk, EFBIG instead of
    ENOSPC): the shard's buffered files then fail again on close, and its temporary directory
    must still go."""
    import resource
    import signal

    c = config(tmp_path, "limited")
    toml = _toml(c, tmp_path / "run.toml")

    def limit_file_size():   # in the child, before exec; SIG_IGN survives exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))

    result = subprocess.run([sys.executable, "-m", "rega_engine.cli", "prepare", "--config", toml],
                            preexec_fn=limit_file_size, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith(f"rega-engine prepare: {tmp_path / 'limited'}: writing shard_00000 "
                           "failed: File too large (the disk at ")
    assert not (tmp_path / "limited").exists()   # nothing was complete: nothing is left
