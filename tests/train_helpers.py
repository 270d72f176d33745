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
    """The config as `rega-engine train` overrides, for subprocess runs."""
    out = []
    for section, values in config.to_dict().items():
        if section not in ("model", "data", "train", "checkpoint"):
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
