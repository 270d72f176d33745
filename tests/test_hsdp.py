"""HSDP on CPU (gloo): 4 processes on a 2 x 2, 1 x 4 and 4 x 1 (dp_replicate x dp_shard) mesh each
train like one process on the same rows; the micro-batches before a step's last one reduce no
gradients; a checkpoint saved on 2 x 2 (in the background, checkpoint.async) resumes on 1 x 4,
1 x 2 and one process with every planned row of the epoch trained exactly once.

The single process reads the four data-parallel ranks' deals as its micro-batches
(`train(config, loader_deals=[(0, 4), ..., (3, 4)])` with 4x the grad_accum), so every run sees the
same rows and the same global loss weight per step. tests/hsdp_worker.py records, per rank, the
collectives of each step between the loop's micro-batch markers and the rows each batch held.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import cli_args, read_log, run_config  # noqa: E402

from rega_engine.config import ConfigError, ParallelConfig, load_config  # noqa: E402
from rega_engine.train.parallel import mesh_shape, setup_runtime  # noqa: E402

WORKER = Path(__file__).with_name("hsdp_worker.py")
STEPS = 4
SAVED = 2            # the 2 x 2 run's checkpoint the resumes start from
GRAD_ACCUM = 2       # per rank: the first micro-batch of each step must stay quiet
ROWS = 2             # train.micro_batch_size
BLOCKS = 2           # tiny_models: 2 decoder layers; FSDP2 groups = blocks + the root
# Constant learning rate, clipping and decay on: the update is the one the single process makes.
COMMON = ("--train.warmup_steps=0", "--train.min_lr_ratio=1.0", "--train.grad_clip=0.5",
          "--train.weight_decay=0.1", f"--train.micro_batch_size={ROWS}")
# name: (dp_replicate, dp_shard, parallel.accumulate). 4 x 1 runs "sharded": with a dp_shard group
# of one it must communicate as little as "unsharded", through FSDP2's other switch.
MESHES = {"2x2": (2, 2, "unsharded"), "1x4": (1, 4, "unsharded"), "4x1": (4, 1, "sharded")}
# Measured (torch 2.13 CPU, fp32, 4 steps at lr 3e-3): the largest difference to the single process
# over the three meshes was 6.0e-7 in a step's loss, 2.4e-7 in a gradient norm and 3.8e-6 in a final
# weight (AdamW turns a last-bit difference of a gradient whose second moment is tiny into a
# visible fraction of one update, 3e-3); summation order is all that differs. 1e-5 for both, as
# tests/test_fsdp.py holds two processes to one.
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def _launch(tmp: Path, tag: str, processes: int, args: list[str],
            **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", REGA_TRACE_DIR=str(tmp),
               REGA_RUN_TAG=tag, **env_extra)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(WORKER), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _trace(tmp: Path, tag: str, rank: int) -> list[dict]:
    path = tmp / f"{tag}_rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mesh_args(replicate: int, shard: int, accumulate: str = "unsharded") -> list[str]:
    return [f"--parallel.dp_replicate={replicate}", f"--parallel.dp_shard={shard}",
            f"--parallel.accumulate={accumulate}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on the four deals, then the three 4-process meshes (2 x 2 also checkpoints at
    step SAVED); returns (tmp, the runs' common command-line args)."""
    tmp = tmp_path_factory.mktemp("hsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from rega_engine.train.loop import train
        single = run_config(tmp, *COMMON, f"--train.grad_accum={4 * GRAD_ACCUM}",
                            "--checkpoint.export=true", steps=STEPS)
        single.train.out_dir = str(tmp / "single")
        assert train(single, loader_deals=[(r, 4) for r in range(4)]) == 0
    finally:
        torch.set_num_threads(threads)
    base = run_config(tmp, *COMMON, f"--train.grad_accum={GRAD_ACCUM}", steps=STEPS)
    args = [a for a in cli_args(base) if not a.startswith("--train.out_dir=")]
    for name, (replicate, shard, accumulate) in MESHES.items():
        # 2 x 2 checkpoints in the background, its writer slowed, so training goes on meanwhile.
        extra = ([f"--checkpoint.every={SAVED}", "--checkpoint.keep=2", "--checkpoint.async=true"]
                 if name == "2x2" else [])
        _launch(tmp, name, 4, [*args, f"--train.out_dir={tmp / name}", "--checkpoint.export=true",
                               *_mesh_args(replicate, shard, accumulate), *extra],
                **({"REGA_SLOW_CHECKPOINT_WRITE": "1.0"} if name == "2x2" else {}))
    return tmp, args


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_each_mesh_trains_like_one_process(runs, name):
    tmp, _ = runs
    replicate, shard, _ = MESHES[name]
    one, four = read_log(tmp / "single"), read_log(tmp / name)
    assert [r["step"] for r in one] == [r["step"] for r in four] == list(range(1, STEPS + 1))
    for a, b in zip(one, four):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOL), (a["step"], a["loss"],
                                                                     b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=LOSS_TOL)
    assert one[-1]["loss"] < one[0]["loss"]
    final_one = load_file(tmp / "single" / "hf" / "model.safetensors")
    final_four = load_file(tmp / name / "hf" / "model.safetensors")
    assert final_one.keys() == final_four.keys()
    for key in final_one:
        torch.testing.assert_close(final_four[key], final_one[key], atol=WEIGHT_TOL, rtol=0,
                                   msg=lambda m: f"{name} {key}: {m}")
    for rank in range(4):
        (described,) = [e for e in _trace(tmp, name, rank) if "mesh" in e]
        # The data-parallel coordinate (replicate index * dp_shard + shard index) is the rank.
        assert described["mesh"] == [replicate, shard] and described["dp_rank"] == rank
        # The mesh's own groups wait train.collective_timeout_s too, not torch's 30 minutes.
        assert described["timeouts"] == {"dp_replicate": 600.0, "dp_shard": 600.0}
        # FSDP2 got the 2-D mesh (HSDP) where there are replica groups, the dp_shard dim alone
        # (plain FSDP) where there are not.
        if replicate > 1:
            assert described["mesh_dims"] == ["dp_replicate", "dp_shard"]
            assert described["placements"] == ["R", "S(0)"]
        else:
            assert described["mesh_dims"] == ["dp_shard"] and described["placements"] == ["S(0)"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_no_gradient_reduction_before_the_last_micro_batch(runs, name):
    tmp, _ = runs
    replicate, shard, _ = MESHES[name]
    groups = BLOCKS + 1
    for rank in range(4):
        steps = [e for e in _trace(tmp, name, rank) if "step" in e]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        for entry in steps:
            events = entry["events"]
            starts = [i for i, e in enumerate(events) if e.startswith("micro")]
            assert len(starts) == GRAD_ACCUM and events[starts[-1]] == "micro last"
            # Before the micro-batches: the one all-reduce of the loss weight (and stop vote).
            assert events[:starts[0]] == ["all_reduce/4"]
            for begin, end in zip(starts, starts[1:]):   # every micro-batch but the last
                quiet = [e for e in events[begin + 1:end] if not e.startswith("all_gather")]
                assert quiet == [], (name, rank, entry["step"], quiet)
            last = Counter(events[starts[-1] + 1:])
            # The last micro-batch's backward reduces every group's gradients once: reduce-scatter
            # within dp_shard (none over a group of one), all-reduce across dp_replicate.
            assert last[f"reduce_scatter/{shard}"] == (groups if shard > 1 else 0), last
            assert last[f"all_reduce/{replicate}"] == (groups if replicate > 1 else 0), last
            assert set(last) <= {f"reduce_scatter/{shard}", f"all_reduce/{replicate}",
                                 f"all_gather/{shard}"}, last


def _batches(trace: list[dict]) -> list[tuple[int, list]]:
    return [tuple(e["batch"]) for e in trace if "batch" in e]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_2x2_checkpoint_resumes_on_1x4_1x2_and_one_process(runs, monkeypatch, capfd):
    from hsdp_worker import record

    from rega_engine.cli import main
    from rega_engine.data import PackedLoader

    tmp, args = runs
    config = run_config(tmp, steps=1)
    planned = Counter()   # epoch 0's rows: the same for every number of processes
    for batch in PackedLoader(config.data.prepared, seq_len=64, batch_size=ROWS,
                              seed=config.train.seed, prefetch=0):
        for row, kinds in zip(batch.input_ids.numpy(), batch.kind_ids.numpy()):
            if (kinds >= 0).any():
                planned[tuple(row[kinds >= 0].tolist())] += 1
    before = Counter()    # what the 2 x 2 run trained up to its checkpoint
    for rank in range(4):
        for epoch, rows in _batches(_trace(tmp, "2x2", rank))[:SAVED * GRAD_ACCUM]:
            assert epoch == 0
            before.update(tuple(r) for r in rows)
    assert 0 < sum(before.values()) < sum(planned.values())
    remaining = sum(planned.values()) - SAVED * 4 * GRAD_ACCUM * ROWS
    saved = tmp / "2x2" / "checkpoints" / f"step_{SAVED}"
    assert (saved / "meta.json").is_file()
    # Written in the background (checkpoint.async): the next step trained while it was pending.
    assert [r["checkpoint_pending"] for r in read_log(tmp / "2x2")][SAVED] == SAVED

    def resumed(tag: str, processes: int) -> list[str]:
        out = tmp / f"resume_{tag}"
        shutil.copytree(saved, out / "checkpoints" / saved.name)
        # Past epoch 0's end, so that all its rows must have been trained.
        steps = SAVED + math.ceil(remaining / (processes * GRAD_ACCUM * ROWS)) + 1
        return [*args, f"--train.out_dir={out}", f"--train.steps={steps}", "--resume",
                "--checkpoint.every=0"]

    results = {}
    for tag, processes in (("1x4", 4), ("1x2", 2)):
        run = _launch(tmp, f"resume_{tag}", processes,
                      [*resumed(tag, processes), *_mesh_args(1, processes)])
        results[tag] = run.stderr
    record(str(tmp / "resume_1x1_rank0.jsonl"), patch=monkeypatch.setattr)
    assert main(["train", *resumed("1x1", 1)]) == 0
    results["1x1"] = capfd.readouterr().err

    for tag, processes in (("1x4", 4), ("1x2", 2), ("1x1", 1)):
        out = tmp / f"resume_{tag}"
        assert f"resumed from {out / 'checkpoints' / saved.name} at step {SAVED}" in results[tag]
        if processes != 4:
            assert f"was written by 4 process(es), this run has {processes}" in results[tag]
        after = Counter()
        for rank in range(processes):
            for epoch, rows in _batches(_trace(tmp, f"resume_{tag}", rank)):
                if epoch == 0:
                    after.update(tuple(r) for r in rows)
        # Every planned row of the epoch once: none twice, none skipped, whatever the meshes.
        assert before + after == planned, tag
        log = read_log(out)   # its folder held only the checkpoint: the log starts after it
        assert [r["step"] for r in log] == list(range(SAVED + 1, SAVED + len(log) + 1))
        # It goes on from the checkpointed weights: no jump back to the first step's loss.
        first = read_log(tmp / "2x2")[0]["loss"]
        assert all(0 < r["loss"] < first for r in log), (tag, [r["loss"] for r in log])
    # 1 x 4 has the 2 x 2 run's four data-parallel ranks, so it reads the same rows: resharded
    # from HSDP to FSDP, it must go on exactly as the 2 x 2 run did.
    went_on, as_saved = read_log(tmp / "resume_1x4"), read_log(tmp / "2x2")[SAVED:]
    assert [r["step"] for r in went_on] == [r["step"] for r in as_saved] == [3, 4]
    for a, b in zip(as_saved, went_on):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOL), (a["step"], a["loss"],
                                                                     b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=LOSS_TOL)


def test_mesh_shape_rules():
    default = ParallelConfig()
    assert mesh_shape(default, 8, 8) == (1, 8)   # 1 x all: plain FSDP, today's default
    assert mesh_shape(ParallelConfig(dp_replicate=2, dp_shard=4), 8, 4) == (2, 4)
    assert mesh_shape(ParallelConfig(dp_replicate=-1, dp_shard="auto"), 16, 8) == (2, 8)
    assert mesh_shape(ParallelConfig(dp_replicate=2, dp_shard="auto"), 16, 8) == (2, 8)
    assert mesh_shape(ParallelConfig(dp_replicate=4), 4, 4) == (4, 1)
    assert mesh_shape(ParallelConfig(dp_replicate=-1, dp_shard=2), 4, 4) == (2, 2)
    assert mesh_shape(default, 1, 1) == (1, 1)
    with pytest.raises(ConfigError, match=r"parallel\.dp_replicate = 2, parallel\.dp_shard = 3: "
                                          r"a mesh of 2 x 3 = 6 process\(es\), but this run has 4"):
        mesh_shape(ParallelConfig(dp_replicate=2, dp_shard=3), 4, 4)
    # "auto" on two nodes of 8 with dp_replicate left at 1: say which keys and what LOCAL_WORLD_SIZE
    with pytest.raises(ConfigError, match=r"parallel\.dp_shard = 'auto' \(LOCAL_WORLD_SIZE 8\).*"
                                          r"but this run has 16"):
        mesh_shape(ParallelConfig(dp_shard="auto"), 16, 8)
    with pytest.raises(ConfigError, match=r"parallel\.dp_replicate = -1 takes what the other "
                                          r"leaves of the 6 process\(es\), but 4 does not divide"):
        mesh_shape(ParallelConfig(dp_replicate=-1, dp_shard=4), 6, 6)
    with pytest.raises(ConfigError, match=r"parallel\.dp_shard = -1 .* but 3 does not divide 4"):
        mesh_shape(ParallelConfig(dp_replicate=3), 4, 4)
    # One process: the shape is checked before anything starts.
    with pytest.raises(ConfigError, match=r"parallel\.dp_replicate = 2.*of the 1 process\(es\)"):
        setup_runtime("cpu", "fp32", parallel=ParallelConfig(dp_replicate=2))


def test_parallel_keys_are_validated():
    config = load_config(None, ["--parallel.dp_replicate=-1", "--parallel.dp_shard=auto"])
    assert (config.parallel.dp_replicate, config.parallel.dp_shard) == (-1, "auto")
    assert load_config(None, ["--parallel.dp_shard=4"]).parallel.dp_shard == 4
    for override, message in (
            ("--parallel.dp_shard=node", r"parallel\.dp_shard = 'node': expected an integer >= 1"),
            ("--parallel.dp_shard=0", r"parallel\.dp_shard = 0: expected an integer >= 1"),
            ("--parallel.dp_shard=1.5", r"'parallel\.dp_shard': expected an integer or a string"),
            ("--parallel.dp_replicate=0", r"parallel\.dp_replicate = 0: expected an integer >= 1"),
            ("--parallel.dp_replicate=auto", r"'parallel\.dp_replicate': expected int"),
            ("--parallel.accumulate=never", r"parallel\.accumulate = 'never': expected one of"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"parallel\.dp_replicate = -1 and parallel\.dp_shard = "
                                          r"-1: at most one"):
        load_config(None, ["--parallel.dp_replicate=-1"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_2x2_checkpoint_exports_in_one_process_as_the_run_did(runs, tmp_path):
    from test_export import assert_same_weights

    from rega_engine.cli import main
    tmp, _ = runs
    out = tmp_path / "exported"
    # The newest checkpoint of the 2 x 2 run (step 4, written in the background) is its end.
    assert main(["export", "--checkpoint", str(tmp / "2x2"), "--out", str(out)]) == 0
    assert_same_weights(out, tmp / "2x2" / "hf")
