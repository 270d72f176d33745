"""train.precision = "fp8" through the training loop, FSDP2, checkpoints, the export and the HF
integration, on CPU (torch._scaled_mm runs the FP8 matmuls). The numerics of one FP8 linear layer
against fp32, per recipe, are tests/test_fp8.py's; here the switch is held to what a user runs:

- the smoke config trains with precision = "fp8" along the bf16 run's loss curve: every one of 20
  steps within 1.5% of it, and the mean of the last 5 within 0.5% (measured: at most 0.25% and
  0.05%); the FP8 matmuls really ran (counted) and the curves are not identical;
- two gloo processes (FSDP2, FP8 all-gather of the tensorwise weights, activation checkpointing)
  equal one process on the same global batch: losses within 1e-5 and gradient norms within 1e-6
  (relative) per step, exported weights within 1e-6 (measured: identical);
- tensor parallelism (tp 2) in FP8 follows one FP8 process (its FP8 roundings drift apart a
  little after the first step: bounds in the test);
- an FP8 run's DCP checkpoint and export hold the names, shapes and dtypes of a bf16 run's, load
  into a bf16 run and back (bit-exact), resume, and the export loads in transformers;
- bad values are ConfigErrors naming the key, and GPUs below sm_89 are refused before the model
  is built.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao.float8", reason="FP8 training needs torchao (pip install torchao)")

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_hf_model  # noqa: E402
from train_helpers import (  # noqa: E402
    cli_args,
    one_torch_thread,  # noqa: F401,E402 (autouse fixture)
    read_log,
    run_config,
)

from rega_engine.config import load_config  # noqa: E402
from rega_engine.errors import ConfigError  # noqa: E402
from rega_engine.train import fp8  # noqa: E402
from rega_engine.train.checkpoint import complete_checkpoints  # noqa: E402
from rega_engine.train.loop import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The decoder blocks' linear layers of the tiny models: 2 blocks x (q, k, v, o, gate, up, down).
DECODER_LINEARS = 14


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """The inner dimension of every torch._scaled_mm call (torchao looks it up at each call)."""
    calls = []
    real = torch._scaled_mm

    def counting(a, b, *args, **kwargs):
        calls.append(a.shape[-1])
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    return calls


# --------------------------------------------------------------------------------------------
# The switch and its values


def test_precision_and_recipe_values_are_config_errors_naming_the_key(tmp_path):
    default = load_config(None, [])
    assert (default.train.precision, default.train.fp8_recipe) == ("bf16", "tensorwise")
    with pytest.raises(ConfigError, match=r"train.precision = 'float8': expected one of bf16, fp8"):
        load_config(None, ["--train.precision=float8"])
    with pytest.raises(ConfigError, match=r"train.fp8_recipe = 'delayed': expected one of "
                                          r"tensorwise, rowwise, rowwise_with_gw_hp"):
        load_config(None, ["--train.precision=fp8", "--train.fp8_recipe=delayed"])
    # FP8 GEMMs contract over the micro-batch's tokens in the weight gradient: multiples of 16.
    with pytest.raises(ConfigError, match=r"a micro-batch holds 300 tokens \(data.seq_len 100 x "
                                          r"train.micro_batch_size 3\).*e.g. 112"):
        load_config(None, ["--train.precision=fp8", "--data.seq_len=100",
                           "--train.micro_batch_size=3"])
    load_config(None, ["--data.seq_len=100", "--train.micro_batch_size=3"])   # bf16: any count
    load_config(None, ["--train.precision=fp8", "--train.fp8_recipe=rowwise_with_gw_hp"])


def test_a_gpu_below_sm89_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    from rega_engine import model as model_package
    from rega_engine.train.parallel import Runtime, build_model

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    built = []
    monkeypatch.setattr(model_package, "from_config", lambda *a, **k: built.append(a))
    config = run_config(tmp_path, "--train.precision=fp8")
    a100 = Runtime(device=torch.device("cuda", 0), dtype=torch.bfloat16, rank=0, world_size=1,
                   local_rank=0, use_fsdp=False)
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB of compute capability 8.0.*"
                                          r'train.precision = "bf16"'):
        build_model(config.model, a100, seed=0, precision="fp8")
    assert not built


# --------------------------------------------------------------------------------------------
# Through the loop


def test_the_loops_fp8_model_gets_a_gradient_in_every_parameter(tmp_path):
    """build_model as a GPU run has it (bf16 compute under FSDP2, tensorwise weights all-gathered
    in FP8, activation checkpointing per block), then the loop's forward_backward."""
    from rega_engine.data.loader import PackedLoader
    from rega_engine.train.loop import forward_backward
    from rega_engine.train.parallel import build_model, setup_runtime, teardown_runtime

    config = run_config(tmp_path, "--train.precision=fp8", "--model.dtype=bf16",
                        "--model.activation_checkpointing=block")
    runtime = setup_runtime("cpu", "bf16")
    try:
        model, dtype = build_model(config.model, runtime, seed=0, precision="fp8")
        summary = model.fp8_summary
        assert dtype == torch.bfloat16 and summary.fp8_all_gather
        assert len(summary.converted) == DECODER_LINEARS and not summary.skipped
        assert all("layers." in name for name in summary.converted)
        batch = next(iter(PackedLoader(tmp_path / "data", seq_len=64, batch_size=2, prefetch=0)))
        forward_backward(model, [batch], world_size=1, distributed=True)
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32, name   # the master weights, FP8 only in the matmuls
            assert p.grad is not None, name
            grad = p.grad.full_tensor()
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    finally:
        teardown_runtime(runtime)


@pytest.fixture(scope="module")
def smoke_prepared(tmp_path_factory):
    from rega_engine.data.prepare import prepare

    prepared = tmp_path_factory.mktemp("smoke") / "prepared"
    # the smoke config's paths are relative to configs/: any working directory will do
    prepare(load_config(REPO / "configs" / "smoke.toml", [f"--data.prepared={prepared}"]))
    return prepared


@pytest.mark.slow
def test_smoke_config_in_fp8_follows_the_bf16_loss_curve(tmp_path, smoke_prepared, monkeypatch,
                                                         scaled_mm_calls):
    """configs/smoke.toml as shipped (on CPU its model.dtype auto is fp32), 20 steps, with
    train.precision bf16 and fp8 (tensorwise). Bounds: 1.5% at every step, 0.5% for the mean
    of the last 5 steps (the issue's GPU target is 1% after a few hundred steps)."""
    monkeypatch.chdir(REPO)
    steps = 20
    logs = {}
    for precision in ("bf16", "fp8"):
        config = load_config(REPO / "configs" / "smoke.toml", [
            f"--data.prepared={smoke_prepared}", f"--train.out_dir={tmp_path / precision}",
            f"--train.precision={precision}", f"--train.steps={steps}", "--train.progress=false",
            "--train.plot=false", "--checkpoint.every=0", "--checkpoint.export=false"])
        calls_before = len(scaled_mm_calls)
        assert train(config) == 0
        # 3 FP8 matmuls (output, grad input, grad weight) per converted layer, micro-batch and step
        expected_calls = 3 * DECODER_LINEARS * steps if precision == "fp8" else 0
        assert len(scaled_mm_calls) - calls_before == expected_calls
        logs[precision] = [record["loss"] for record in read_log(tmp_path / precision)]
    bf16, fp8_losses = logs["bf16"], logs["fp8"]
    assert len(bf16) == len(fp8_losses) == steps
    gaps = [abs(a - b) / b for a, b in zip(fp8_losses, bf16)]
    assert max(gaps) < 0.015, [round(gap, 4) for gap in gaps]
    assert 0 < abs(sum(fp8_losses[-5:]) - sum(bf16[-5:])) / sum(bf16[-5:]) < 0.005
    assert sum(fp8_losses[-5:]) / 5 < sum(fp8_losses[:5]) / 5 - 1.5   # and it learns


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_fp8_on_two_gloo_processes_equals_one_process(tmp_path):
    """Two processes under torchrun (FSDP2 with the FP8 all-gather and its scale precompute after
    each step, activation checkpointing) against one process reading both ranks' deals as its
    two micro-batches (no FSDP: FP8 casts of the full weights). Without gradient clipping the
    two are the same computation: losses and gradient norms agree to fp32 rounding and the
    final weights bit for bit. (With clipping, the norm summed shard by shard differs in its
    last bit, and FP8 rounding amplifies that: measured 7e-5 relative in the 4th step's norm.)"""
    common = ("--train.precision=fp8", "--train.warmup_steps=0", "--train.min_lr_ratio=1.0",
              "--train.grad_clip=0", "--checkpoint.export=true")
    single = run_config(tmp_path, *common, "--train.grad_accum=2", steps=4)
    single.train.out_dir = str(tmp_path / "single")
    assert train(single, loader_deals=[(0, 2), (1, 2)]) == 0

    multi = run_config(tmp_path, *common, "--train.grad_accum=1",
                       "--model.activation_checkpointing=block", steps=4)
    multi.train.out_dir = str(tmp_path / "multi")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "rega_engine.cli", "train", *cli_args(multi)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "FSDP all-gathers their weights in FP8" in result.stderr

    one, two = read_log(tmp_path / "single"), read_log(tmp_path / "multi")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    _assert_same_safetensors(tmp_path / "multi" / "hf", tmp_path / "single" / "hf", atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fp8_with_tensor_parallelism_follows_one_process(tmp_path):
    """tp 2 with sequence parallelism on two gloo processes, FP8 (tensorwise, FSDP2's FP8
    all-gather) against one FP8 process on the same rows. The first forward is the same
    computation up to summation order (each tensorwise scale covers the whole weight, on the
    DTensor and in the scale precomputed before the first step); after that the split matmuls'
    last-bit differences flip some FP8 roundings (e5m2 keeps 2 mantissa bits) and the runs drift
    apart a little. Measured: step 1 loss within 4.8e-7, every loss within 3.6e-4 relative,
    gradient norms 0.7%; bounds 1e-5, 1e-3 and 2%."""
    common = ("--train.precision=fp8", "--train.warmup_steps=0", "--train.min_lr_ratio=1.0",
              "--train.grad_clip=0", "--train.grad_accum=2")
    single = run_config(tmp_path, *common, steps=4)
    single.train.out_dir = str(tmp_path / "single")
    assert train(single, loader_deals=[(0, 1)]) == 0   # the rows of the tp group's one dp rank

    multi = run_config(tmp_path, *common, steps=4)
    multi.train.out_dir = str(tmp_path / "multi")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "rega_engine.cli", "train", *cli_args(multi), "--parallel.tp=2",
               "--parallel.dp_shard=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "FSDP all-gathers their weights in FP8" in result.stderr

    one, two = read_log(tmp_path / "single"), read_log(tmp_path / "multi")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], abs=1e-5)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.02)


# --------------------------------------------------------------------------------------------
# Checkpoints, resume and export


def _assert_same_safetensors(got_dir: Path, want_dir: Path, atol: float = 0.0) -> None:
    from safetensors.torch import load_file
    got = load_file(got_dir / "model.safetensors")
    want = load_file(want_dir / "model.safetensors")
    assert list(got) == list(want)
    for name, tensor in got.items():
        assert type(tensor) is torch.Tensor and tensor.dtype == want[name].dtype, name
        torch.testing.assert_close(tensor, want[name], atol=atol, rtol=0, msg=name)


def _dcp_tensors(checkpoint: Path) -> dict:
    """{name: (dtype, shape)} of every tensor a DCP checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {name: (entry.properties.dtype, tuple(entry.size)) for name, entry in metadata.items()
            if isinstance(entry, TensorStorageMetadata)}


def _full_weights(model, dtype: torch.dtype) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    return {name: fp8.plain_tensor(t).to(dtype) for name, t in full.items()}


@pytest.mark.slow
def test_fp8_and_bf16_checkpoints_and_exports_are_interchangeable(tmp_path):
    """model.dtype = bf16 (FSDP2 mixed precision in a process group of one, as on one GPU), so
    that the FP8 run's weights are torchao's all-gather tensors: its checkpoint and export are
    still those of a bf16 run, load into one (and back) bit-exactly, and resume."""
    from safetensors.torch import load_file

    from rega_engine.model.hf_io import load_transformers_model
    from rega_engine.train.checkpoint import load_checkpoint
    from rega_engine.train.loop import _make_optimizer
    from rega_engine.train.parallel import build_model, setup_runtime, teardown_runtime

    common = ("--model.dtype=bf16", "--train.warmup_steps=0", "--train.min_lr_ratio=1.0",
              "--checkpoint.every=3", "--checkpoint.export=true")
    configs = {}
    for precision in ("fp8", "bf16"):
        configs[precision] = run_config(tmp_path, *common, f"--train.precision={precision}",
                                        steps=5)
        configs[precision].train.out_dir = str(tmp_path / precision)
        assert train(configs[precision]) == 0
    checkpoints = {p: dict(complete_checkpoints(tmp_path / p)) for p in configs}
    assert all(sorted(c) == [3, 5] for c in checkpoints.values())

    # The same tensors in both checkpoints: names, dtypes (fp32 master weights and AdamW
    # state), shapes; and the same safetensors export (bf16), which transformers loads as it is.
    fp8_tensors, bf16_tensors = (_dcp_tensors(checkpoints[p][5]) for p in ("fp8", "bf16"))
    assert fp8_tensors == bf16_tensors
    assert {dtype for dtype, _ in fp8_tensors.values()} == {torch.float32}
    exported = load_file(tmp_path / "fp8" / "hf" / "model.safetensors")
    reference = load_file(tmp_path / "bf16" / "hf" / "model.safetensors")
    assert list(exported) == list(reference)
    assert all(t.dtype == torch.bfloat16 and t.shape == reference[n].shape
               for n, t in exported.items())
    hf_model = load_transformers_model(tmp_path / "fp8" / "hf")
    loaded = hf_model.state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0, msg=name)

    # Each run's final checkpoint loads into a model of the other precision: the weights are
    # bit for bit the ones the run exported.
    runtime = setup_runtime("cpu", "bf16")
    try:
        for load_as, written_by in (("bf16", "fp8"), ("fp8", "bf16")):
            config = configs[load_as]
            model, _ = build_model(config.model, runtime, seed=1, precision=load_as)
            optimizer = _make_optimizer(model, config.train, runtime.device)
            load_checkpoint(checkpoints[written_by][5], model, optimizer)
            weights = _full_weights(model, torch.bfloat16)
            export = load_file(tmp_path / written_by / "hf" / "model.safetensors")
            assert set(weights) == set(export)
            for name, tensor in weights.items():
                torch.testing.assert_close(tensor, export[name], atol=0, rtol=0, msg=name)
    finally:
        teardown_runtime(runtime)

    # Resume from the FP8 run's step 3: in FP8 it continues exactly as the run itself did, in
    # bf16 it continues from the same state within FP8's rounding.
    fp8_log = read_log(tmp_path / "fp8")
    for precision in ("fp8", "bf16"):
        out_dir = tmp_path / f"resumed-{precision}"
        shutil.copytree(checkpoints["fp8"][3], out_dir / "checkpoints" / "step_3")
        config = run_config(tmp_path, *common, f"--train.precision={precision}",
                            "--checkpoint.resume=true",
                            steps=5)
        config.train.out_dir = str(out_dir)
        assert train(config) == 0
        resumed = read_log(out_dir)
        assert [r["step"] for r in resumed] == [4, 5]
        tolerance = 1e-6 if precision == "fp8" else 0.02
        for got, want in zip(resumed, fp8_log[3:]):
            assert got["loss"] == pytest.approx(want["loss"], rel=tolerance), (precision, got)
    _assert_same_safetensors(tmp_path / "resumed-fp8" / "hf", tmp_path / "fp8" / "hf")


# --------------------------------------------------------------------------------------------
# The HF integration


def test_apply_rega_kernels_fp8_trains_a_transformers_llama_on_odd_token_counts(scaled_mm_calls):
    """Padding-free HF batches have any number of tokens: the FP8 matmuls' inner dimension is
    padded to a multiple of 16 (which GPUs need), and the loss stays within FP8's rounding of
    the bf16 patch's. lm_head (read by the fused loss) and the embeddings stay as they are."""
    import copy

    from torch import nn

    from rega_engine.integrations.hf import PaddingFreeCollator, apply_rega_kernels

    reference = make_hf_model("llama3").train()
    model = copy.deepcopy(reference)
    apply_rega_kernels(reference)
    assert apply_rega_kernels(model, fp8=True, fp8_recipe="rowwise") is model
    summary = model.fp8_summary
    assert summary.recipe == "rowwise" and len(summary.converted) == DECODER_LINEARS
    assert type(model.lm_head) is nn.Linear and fp8.is_fp8_linear(model.model.layers[0].mlp.up_proj)
    apply_rega_kernels(model, fp8=True)   # again: nothing converted twice
    assert model.fp8_summary is summary

    g = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(4, 256, (n,), generator=g).tolist()} for n in (20, 17)]
    batch = PaddingFreeCollator()(features)
    assert batch["input_ids"].numel() == 37
    losses = []
    for m in (reference, model):
        out = m(**batch)
        assert out.logits is None   # the fused cross-entropy ran
        out.loss.backward()
        losses.append(out.loss.item())
    assert len(scaled_mm_calls) == 3 * DECODER_LINEARS
    assert all(k % 16 == 0 for k in scaled_mm_calls), scaled_mm_calls   # 37 tokens padded to 48
    assert 48 in scaled_mm_calls
    assert losses[1] == pytest.approx(losses[0], rel=0.01) and losses[1] != losses[0]
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    with pytest.raises(ConfigError, match="fp8_recipe = 'delayed'"):
        apply_rega_kernels(make_hf_model("llama3"), fp8=True, fp8_recipe="delayed")


def test_apply_rega_kernels_fp8_leaves_lora_adapters_in_high_precision():
    peft = pytest.importorskip("peft")
    from rega_engine.integrations.hf import apply_rega_kernels

    model = peft.get_peft_model(make_hf_model("llama3"), peft.LoraConfig(
        r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    apply_rega_kernels(model, fp8=True)
    base = model.get_base_model()
    converted = base.fp8_summary.converted
    assert len(converted) == DECODER_LINEARS
    assert "model.layers.0.self_attn.q_proj.base_layer" in converted
    assert not any("lora_" in name for name in converted)
    ids = torch.randint(4, 256, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
