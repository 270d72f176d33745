"""The training loop on CPU: the smoke config learns, the step's loss is the global weighted mean
over its micro-batches, the log carries what a user reads, MFU follows its formula, the export
loads in transformers, and bad paths get errors that name them."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import (  # noqa: E402
    DOMAINS,
    make_dataset,
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
    write_model_config,
)

from rega_engine.batch import IGNORE_INDEX, KINDS  # noqa: E402
from rega_engine.config import load_config  # noqa: E402
from rega_engine.data.loader import PackedLoader  # noqa: E402
from rega_engine.model import from_config  # noqa: E402
from rega_engine.train import metrics  # noqa: E402
from rega_engine.train.loop import forward_backward, train  # noqa: E402
from rega_engine.train.schedule import lr_at  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "rega_engine" / "demo" / "sample"


@pytest.fixture(scope="module")
def sample_tokenizer(tmp_path_factory):
    from rega_engine.tokenizer import train_tokenizer
    texts = (SAMPLE / "corpus.txt").read_text(encoding="utf-8").splitlines()
    return train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer") / "tok", vocab_size=1000)


@pytest.mark.slow
def test_smoke_config_learns(tmp_path, sample_tokenizer, monkeypatch):
    from rega_engine.data.prepare import prepare
    # the smoke config's paths are relative to configs/: any working directory will do
    config = load_config(REPO / "configs" / "smoke.toml", [
        f"--data.tokenizer={sample_tokenizer}", f"--data.prepared={tmp_path / 'prepared'}",
        f"--train.out_dir={tmp_path / 'train'}", "--train.progress=false", "--train.steps=30",
        "--checkpoint.every=0"])
    prepare(config)
    assert train(config) == 0
    log = read_log(tmp_path / "train")
    assert [r["step"] for r in log] == list(range(1, 31))
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < first - 1.5, (first, last)
    assert (tmp_path / "train" / "loss_curves.png").stat().st_size > 10_000
    # Every kind of REGA and both specific domains were trained and seen by the metrics; the
    # smoke data has no pretraining rows, so that kind has no loss (None, not 0).
    for group, names in (("loss_by_kind", KINDS), ("loss_by_domain", ["general", "law",
                                                                      "medicine"])):
        assert list(log[0][group]) == list(names)
        for name in names:
            seen = any(r[group][name] is not None for r in log)
            assert seen == (name != "pretrain"), (group, name)
    assert (tmp_path / "train" / "hf" / "tokenizer.json").is_file()


def _hand_loss(model, batches):
    """sum(w * token CE) / sum(w) over every micro-batch, from full logits with F.cross_entropy."""
    numerator, denominator = 0.0, 0.0
    per_kind = torch.zeros(len(KINDS), dtype=torch.float64)
    per_kind_count = torch.zeros(len(KINDS), dtype=torch.float64)
    for b in batches:
        logits = model(b.input_ids, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                       max_seqlen=b.max_seqlen).logits
        target = b.labels[:, 1:].reshape(-1)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target,
                             ignore_index=IGNORE_INDEX, reduction="none")
        weights = b.loss_weights[:, 1:].reshape(-1)
        numerator = numerator + (weights * ce).sum()
        denominator = denominator + weights.sum()
        valid = target != IGNORE_INDEX
        kinds = b.kind_ids[:, 1:].reshape(-1)[valid]
        per_kind.index_add_(0, kinds, ce[valid].double().detach())
        per_kind_count.index_add_(0, kinds, torch.ones_like(kinds, dtype=torch.float64))
    return numerator / denominator, per_kind / per_kind_count


def test_step_loss_is_the_global_weighted_mean_over_micro_batches(tmp_path):
    data = make_dataset(tmp_path / "data")
    model = from_config(write_model_config(tmp_path / "model.json"), seed=0)
    reference = copy.deepcopy(model)
    # integration weighs 0.5: the weights matter, and rows differ in how many tokens they train.
    loader = PackedLoader(data, seq_len=64, batch_size=2, prefetch=0)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    assert any(b.loss_weights.eq(0.5).any() for b in batches)

    sums = metrics.DeviceSums(len(DOMAINS), torch.device("cpu"))
    loss, _ = forward_backward(model, batches, world_size=1, distributed=False, sums=sums)
    hand, hand_per_kind = _hand_loss(reference, batches)
    hand.backward()

    torch.testing.assert_close(loss, hand.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
    # Not the mean of per-micro-batch means, which packing would skew.
    per_batch = [_hand_loss(copy.deepcopy(reference), [b])[0].item() for b in batches]
    assert abs(sum(per_batch) / 3 - hand.item()) > 1e-4

    sums.add_step(loss, tokens=sum(b.num_real_tokens for b in batches), flops=0.0)
    collected = sums.collect(distributed=False)
    assert collected["loss"] == pytest.approx(hand.item(), rel=1e-6)
    for got, want in zip(collected["kind"], hand_per_kind.tolist()):
        if want != want:    # NaN: a kind these batches do not hold (pretrain) has no loss, None
            assert got is None
        else:
            assert got == pytest.approx(want, rel=1e-5)


def test_log_has_per_kind_and_per_domain_fields(tmp_path):
    config = run_config(tmp_path, "--train.log_every=2", "--train.grad_accum=2", steps=5)
    train(config)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [2, 4, 5]   # every 2 steps, and the last one
    expected_keys = {"step", "total_steps", "loss", "loss_by_kind", "loss_by_domain", "tokens",
                     "tokens_per_s", "mfu", "grad_norm", "lr", "peak_memory_gib", "elapsed_s",
                     "loss_tokens_by_kind", "loss_tokens_by_domain", "data_wait_s",
                     "checkpoint_s", "checkpoint_pending"}
    dataset_tokens_per_row_max = 64
    for r in log:
        assert set(r) == expected_keys
        assert r["total_steps"] == 5
        assert list(r["loss_by_kind"]) == list(KINDS)
        assert list(r["loss_by_domain"]) == DOMAINS
        # the label tokens behind those losses: the same tokens counted by kind and by domain
        by_kind, by_domain = r["loss_tokens_by_kind"], r["loss_tokens_by_domain"]
        assert sum(by_kind.values()) == sum(by_domain.values()) > 0
        assert all((r["loss_tokens_by_kind"][k] == 0) == (r["loss_by_kind"][k] is None)
                   for k in KINDS)
        assert all(v is None or 0 < v < 10 for v in [*r["loss_by_kind"].values(),
                                                     *r["loss_by_domain"].values()])
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] is None   # CPU: no known peak, no made-up number
        assert r["peak_memory_gib"] > 0.01 and r["elapsed_s"] > 0
    # Real tokens only: 2 steps x 2 micro-batches x 2 rows, minus padding.
    assert 0 < log[0]["tokens"] < 2 * 2 * 2 * dataset_tokens_per_row_max
    assert log[-1]["lr"] == pytest.approx(lr_at(5, lr=3e-3, total_steps=5, warmup_steps=2,
                                                 min_lr_ratio=0.1))


def test_mfu_by_hand():
    model = from_config({"model_type": "llama", "vocab_size": 100, "hidden_size": 8,
                         "intermediate_size": 16, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4},
                        device="meta")
    # Per layer: q 8x8, k 8x4, v 8x4, o 8x8, mlp 3 x 8x16, two norms of 8; final norm 8; head 100x8.
    layer = 64 + 32 + 32 + 64 + 3 * 128 + 16
    non_embedding = 2 * layer + 8 + 800
    assert model.flops_per_token() == 6 * non_embedding
    # Two documents of 3 and 5 tokens and a padding run of 2 (kind -1), in one row of 10.
    from rega_engine.batch import PackedBatch
    kind_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1]])
    batch = PackedBatch(input_ids=torch.zeros(1, 10, dtype=torch.long), labels=torch.zeros(1, 10,
        dtype=torch.long),
                        position_ids=torch.zeros(1, 10, dtype=torch.long),
                        cu_seqlens=torch.tensor([0, 3, 8, 10], dtype=torch.int32), max_seqlen=5,
                        kind_ids=kind_ids, domain_ids=kind_ids.clone(), loss_weights=torch.zeros(1,
                            10),
                        num_real_tokens=8)
    lengths = metrics.document_lengths(batch)
    assert lengths.tolist() == [3, 5]
    attention = 6 * 2 * 2 * 4 * (9 + 25)
    assert model.attention_flops(lengths) == attention
    flops = 8 * 6 * non_embedding + attention
    # On 4 H100s at 989 TFLOP/s dense bf16, 0.5 s for the step:
    assert metrics.mfu(flops, 0.5, 989e12, 4) == pytest.approx(flops / (0.5 * 989e12 * 4))
    assert metrics.mfu(flops, 0.5, None, 4) is None


def test_device_peaks(monkeypatch):
    assert metrics.device_peak_flops("cpu") is None
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 PCIe", 756e12),
                       ("Tesla V100-SXM2-16GB", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert metrics.device_peak_flops(torch.device("cuda", 0)) == peak, name


def test_export_loads_in_transformers(tmp_path, sample_tokenizer):
    from transformers import AutoTokenizer

    from rega_engine.model import from_pretrained
    from rega_engine.model.hf_io import load_transformers_model
    write_model_config(tmp_path / "model.json", vocab_size=1000)
    config = run_config(tmp_path, "--checkpoint.export=true",
                        f"--data.tokenizer={sample_tokenizer}",
                        "--model.activation_checkpointing=block", steps=3)
    train(config)
    hf_dir = tmp_path / "run" / "hf"
    hf_model, info = load_transformers_model(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    initial = from_config(tmp_path / "model.json", seed=0)
    assert not torch.equal(hf_model.model.layers[0].mlp.up_proj.weight,
                           initial.model.layers[0].mlp.up_proj.weight)   # it trained
    ids = torch.randint(4, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = from_pretrained(hf_dir)(ids).logits
    torch.testing.assert_close(hf_model(ids).logits, ours, atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.decode(tokenizer("The capital of Eskel")["input_ids"]).endswith("The capital "
                                                                                     "of Eskel")


@pytest.mark.parametrize("key, value, fragment", [
    ("data.prepared", "{tmp}/nowhere", "data.prepared = {tmp}/nowhere"),
    ("model.init_config", "{tmp}/missing.json", "model.init_config = {tmp}/missing.json"),
    ("model.path", "{tmp}/no_model", "model.path = {tmp}/no_model"),
])
def test_missing_paths_are_named(tmp_path, key, value, fragment):
    value, fragment = value.format(tmp=tmp_path), fragment.format(tmp=tmp_path)
    extra = ["--model.init_config="] if key == "model.path" else []
    config = run_config(tmp_path, *extra, f"--{key}={value}")
    with pytest.raises(FileNotFoundError) as error:
        train(config)
    assert fragment in str(error.value)


def test_a_vocabulary_too_small_gets_the_fix_that_fits_the_model_source(tmp_path):
    """Token ids up to 255: a random init is told to raise its vocab_size, a pretrained model to
    have the data prepared with its own tokenizer."""
    from tiny_models import make_tiny_checkpoint

    from rega_engine.errors import TrainingError
    small = write_model_config(tmp_path / "small.json", vocab_size=200)
    with pytest.raises(TrainingError) as error:
        train(run_config(tmp_path, f"--model.init_config={small}"))
    message = str(error.value)
    assert "token ids go up to 255 but the model's vocab_size is 200" in message
    assert f'raise "vocab_size" in model.init_config = {small} to at least 256' in message
    assert "use the model's tokenizer" not in message

    pretrained = make_tiny_checkpoint(tmp_path / "pretrained", "llama3", vocab_size=200)
    with pytest.raises(TrainingError) as error:
        train(run_config(tmp_path, "--model.init_config=", f"--model.path={pretrained}"))
    message = str(error.value)
    assert "vocab_size is 200" in message
    assert "use the model's tokenizer in data.tokenizer and prepare again" in message
    assert "init_config" not in message


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        metrics.MetricsLogger(tmp_path, domain_names=DOMAINS, total_steps=1, start_step=0,
                              enabled=True, progress=False, tensorboard=True)


def test_schedule_warms_up_then_decays_to_the_floor():
    kw = {"lr": 1.0, "total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1}
    values = [lr_at(s, **kw) for s in range(1, 11)]
    assert values[:2] == [0.5, 1.0]
    assert all(a > b for a, b in zip(values[1:], values[2:]))
    assert values[-1] == pytest.approx(0.1)


def test_shipped_configs_are_valid():
    from rega_engine.model import ModelArgs
    smoke = load_config(REPO / "configs" / "smoke.toml")
    args = ModelArgs.from_hf_config(REPO / smoke.model.init_config)
    assert args.vocab_size >= 1000   # the smoke tokenizer's vocabulary fits the model
    big = load_config(REPO / "configs" / "llama3-8b-8gpu.toml")
    assert big.data.seq_len == 8192 and big.model.activation_checkpointing == "block"
    assert set(big.data.domains) == set(big.roles.prompts) and len(big.data.domains) == 3


def test_bf16_trains_under_fsdp_in_one_process(tmp_path):
    """The single-GPU set-up, on CPU: bf16 compute needs FSDP2's mixed precision, so one process
    gets a process group of its own; the weights stay fp32 and the export is bf16."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    config = run_config(tmp_path, "--model.dtype=bf16", "--checkpoint.export=true",
                        "--checkpoint.every=2", steps=3)
    assert train(config) == 0
    assert not dist.is_initialized()   # the group it made is gone again
    fp32 = run_config(tmp_path, steps=3)
    fp32.train.out_dir = str(tmp_path / "fp32")
    train(fp32)
    bf16_log, fp32_log = read_log(tmp_path / "run"), read_log(tmp_path / "fp32")
    for a, b in zip(bf16_log, fp32_log):
        assert a["loss"] == pytest.approx(b["loss"], abs=0.05)   # same data and init, bf16 rounding
    assert {t.dtype for t in load_file(tmp_path / "run" / "hf"
                                       / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "run" / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_fp16_training_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use bf16"):
        train(run_config(tmp_path, "--model.dtype=fp16"))
