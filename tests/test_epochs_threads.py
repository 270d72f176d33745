"""train.epochs (steps from the planned batches of one pass), the one-pass line of prepare and
train, and train.threads."""
from __future__ import annotations

import math

import torch
from train_helpers import (
    make_dataset,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    read_log,
    write_model_config,
)

from rega_engine.config import load_config
from rega_engine.train.schedule import one_pass_text, steps_for_epochs


def test_steps_for_epochs_rounds_up_but_not_for_float_noise():
    assert steps_for_epochs(3, 10, 1) == 30
    assert steps_for_epochs(3, 10, 4) == 8          # 7.5 steps of 4 micro-batches
    assert steps_for_epochs(0.1, 30, 1) == 3        # 0.1 * 30 = 3.0000000000000004
    assert steps_for_epochs(0.01, 10, 1) == 1       # at least one step
    assert one_pass_text(10, micro_batch_size=2, grad_accum=4, world_size=8) == (
        "one pass over the data = 10 micro-batches per rank = 3 optimizer steps "
        "(micro_batch_size 2 x grad_accum 4 x 8 ranks)")


def test_train_epochs_sets_the_steps_and_train_threads_the_cpu_threads(tmp_path, capsys,
                                                                       monkeypatch):
    from rega_engine.data.loader import PackedLoader
    from rega_engine.train.loop import train
    data = make_dataset(tmp_path / "data")
    config = load_config(None, [
        f"--model.init_config={write_model_config(tmp_path / 'model.json')}",
        f"--data.prepared={data}",
        "--data.seq_len=64", f"--train.out_dir={tmp_path / 'run'}", "--train.epochs=1.5",
        "--train.micro_batch_size=2", "--train.grad_accum=2", "--train.lr=3e-3",
        "--train.warmup_steps=1",
        "--train.progress=false", "--train.plot=false", "--train.device=cpu",
        "--checkpoint.export=false",
        "--train.threads=1"])
    per_pass = len(PackedLoader(data, seq_len=64, batch_size=2, seed=0, prefetch=0))
    expected = math.ceil(1.5 * per_pass / 2)
    threads = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (threads.append(n), real(n)))
    assert train(config) == 0
    assert threads[:1] == [1]
    assert [r["step"] for r in read_log(tmp_path / "run")][-1] == expected
    captured = capsys.readouterr()
    assert (f"one pass over the data = {per_pass} micro-batches per rank = "
            f"{math.ceil(per_pass / 2)} optimizer steps (micro_batch_size 2 x grad_accum 2 x 1 "
            f"rank); train.epochs = 1.5: {expected} steps") in captured.out + captured.err
    assert config.train.steps == 100, "the caller's config is left as it was"


def test_prepare_prints_one_pass_for_the_world_size_it_is_told(tmp_path, capsys, monkeypatch):
    from test_data_sources import config_for, mixed_file

    from rega_engine.data.prepare import prepare
    config = config_for(tmp_path, files=[mixed_file(tmp_path)])
    config.train.micro_batch_size = 2
    report = prepare(config)
    one = report["one_pass"]
    assert (one["world_size"], one["optimizer_steps"]) == (1, one["micro_batches_per_rank"])
    assert one["text"] in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "4")
    config.data.prepared = str(tmp_path / "p4")
    four = prepare(config)["one_pass"]
    assert four["world_size"] == 4 and four["micro_batches_per_rank"] == math.ceil(
        one["micro_batches_per_rank"] / 4)
    assert "(micro_batch_size 2 x grad_accum 1 x 4 ranks)" in capsys.readouterr().out
