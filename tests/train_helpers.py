"""Small prepared datasets and run configs for the training-loop tests (tests/test_train.py,
test_checkpoint.py, test_fsdp.py and the torchrun worker tests/fsdp_worker.py).

The synthetic samples are learnable (arithmetic progressions modulo the vocabulary, a few prompt
tokens then the "answer") so a loss can fall, and spread over every kind and three domains so that
the per-kind and per-domain metrics have something to show. Nothing here needs the tokenizer or
prepare, so these tests stay fast and independent of the data pipeline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_hf_config  # noqa: E402

from rega_engine.config import load_config  # noqa: E402

DOMAINS = ["general", "law", "medicine"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread than on two
    competing with other test processes; the subprocess runs get OMP_NUM_THREADS=1 likewise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(path: str | os.PathLike, *, samples: int = 96, seq_len: int = 64, seed: int = 0,
                 vocab_size: int = 256) -> Path:
    from rega_engine.data.dataset import TokenDatasetWriter
    rng = np.random.default_rng(seed)
    with TokenDatasetWriter(path, domains=DOMAINS, kind_weights={"distilled": 1.0, "role": 1.0,
                                                                 "integration": 0.5},
                            pad_id=0, vocab_size=vocab_size, seq_len=seq_len) as writer:
        for i in range(samples):
            length = int(rng.integers(6, 40))
            start, stride = int(rng.integers(0, vocab_size - 4)), int(rng.integers(1, 4))
            tokens = 4 + (start + stride * np.arange(length)) % (vocab_size - 4)
            mask = np.zeros(length, dtype=bool)
            mask[int(rng.integers(2, 5)):] = True
            writer.add(tokens, mask, kind=i % 3, domain=int(rng.integers(0, 3)))
    return Path(path)


def write_model_config(path: str | os.PathLike, family: str = "llama3", **overrides) -> Path:
    path = Path(path)
    path.write_text(json.dumps(tiny_hf_config(family, **overrides)))
    return path


def run_config(tmp: str | os.PathLike, *extra: str, steps: int = 6, **keys):
    """A RunConfig for a tiny CPU run in `tmp` (dataset tmp/data, model config tmp/model.json,
    output tmp/run), plus --section.key=value overrides."""
    tmp = Path(tmp)
    if not (tmp / "data" / "meta.json").exists():
        make_dataset(tmp / "data")
    if not (tmp / "model.json").exists():
        write_model_config(tmp / "model.json")
    overrides = [
        f"--model.init_config={tmp / 'model.json'}", f"--data.prepared={tmp / 'data'}",
        "--data.seq_len=64", f"--train.out_dir={tmp / 'run'}", f"--train.steps={steps}",
        "--train.lr=3e-3", "--train.warmup_steps=2", "--train.micro_batch_size=2",
        "--train.progress=false", "--train.plot=false", "--train.device=cpu",
        "--checkpoint.export=false", *extra,
    ]
    return load_config(None, overrides)


def cli_args(config) -> list[str]:
    """The config as `rega-engine train` overrides, for subprocess runs. [parallel] included: a
    test that sets --parallel.* keys in run_config gets them in the launched run (a later
    command-line key still wins)."""
    out = []
    for section, values in config.to_dict().items():
        if section not in ("model", "data", "train", "checkpoint", "parallel"):
            continue
        for key, value in values.items():
            if isinstance(value, dict):
                continue
            text = json.dumps(value) if isinstance(value, (bool, str)) else repr(value)
            out.append(f"--{section}.{key}={text}")
    return out


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Settings under which a multi-process run must equal one process step for step: a constant
# learning rate (so that a resumed run is the same run), clipping and decay on (their global
# norms and per-parameter updates must come out the same however the model is split).
COMPARABLE = ("--train.warmup_steps=0", "--train.min_lr_ratio=1.0", "--train.grad_clip=0.5",
              "--train.weight_decay=0.1")


def torchrun(processes: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N ARGS` on one thread per
    process; fails the test with the output's tail unless it exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def single_process_runs(tmp: Path, common: tuple, deals: tuple[int, ...], grad_accum: int,
                        steps: int) -> list[str]:
    """One process reading the rows of 1, 2, ... data-parallel ranks (tmp/single<n>, exported),
    for multi-process runs to be compared against; returns the common command-line arguments
    (without train.out_dir) for those runs, at `grad_accum` per rank."""
    from rega_engine.train.loop import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in deals:
            single = run_config(tmp, *common, f"--train.grad_accum={n * grad_accum}",
                                "--checkpoint.export=true", steps=steps)
            single.train.out_dir = str(tmp / f"single{n}")
            assert train(single, loader_deals=[(r, n) for r in range(n)]) == 0
    finally:
        torch.set_num_threads(threads)
    base = run_config(tmp, *common, f"--train.grad_accum={grad_accum}", steps=steps)
    return [a for a in cli_args(base) if not a.startswith("--train.out_dir=")]


def assert_same_run(one: list[dict], other: list[dict], tol: float) -> None:
    """Two runs' log records step by step: tokens and label counts equal, losses (also per
    domain) and gradient norms within `tol`."""
    assert [r["step"] for r in one] == [r["step"] for r in other]
    for a, b in zip(one, other):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=tol), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=tol)
        assert a["loss_tokens_by_kind"] == b["loss_tokens_by_kind"]
        for name, value in a["loss_by_domain"].items():
            if value is not None:
                assert value == pytest.approx(b["loss_by_domain"][name], abs=tol)


def assert_same_weights(one: Path, other: Path, tol: float) -> None:
    """Two runs' exported weights (<run>/hf/model.safetensors) within `tol`."""
    from safetensors.torch import load_file
    want = load_file(Path(one) / "hf" / "model.safetensors")
    got = load_file(Path(other) / "hf" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=tol, rtol=0,
                                   msg=lambda m: f"{other} {key}: {m}")
