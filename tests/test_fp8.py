"""FP8 training (rega_engine/train/fp8.py) on CPU, where torch._scaled_mm runs the FP8 matmuls.

The numerics are held against the rounding of the FP8 formats. Round-to-nearest with p explicit
mantissa bits has a relative error of at most u = 2^-(p+1) per element in the normal range:
e4m3 (p = 3) u = 2^-4, e5m2 (p = 2) u = 2^-3. Hence, elementwise for C = A @ B with both operands
quantized (a' = a(1 + d), |d| <= u_a, plus an absolute error of at most eta below the normal
range), a rigorous bound
    |C' - C| <= gamma |A| @ |B| + eta_a (1 + u_b) |B| summed over K + eta_b (1 + u_a) |A| summed
                over K + K eta_a eta_b,   gamma = (1 + u_a)(1 + u_b) - 1,
and, for random operands with independent rounding errors, a relative Frobenius error near the
RMS relative rounding error of the products: about 0.038 for e4m3 x e4m3 and 0.059 for
e5m2 x e4m3 (derivation in _expected_relative_error). The tests check both: the first says FP8
is no worse than its formats allow, the second that the FP8 path really ran (bf16 alone would be
~0.003, fp32 ~1e-7) and with the recipe's formats.
"""
from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8", reason="FP8 training needs torchao (pip install torchao)")

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_hf_model, make_tiny_checkpoint, tiny_hf_config  # noqa: E402
from train_helpers import one_torch_thread  # noqa: F401,E402 (autouse fixture)

from rega_engine.errors import ConfigError  # noqa: E402
from rega_engine.model import from_config  # noqa: E402
from rega_engine.train import fp8  # noqa: E402
from rega_engine.train.fp8 import FP8_RECIPES, apply_fp8, check_fp8_supported  # noqa: E402

E4M3 = {"u": 2.0 ** -4, "p": 3, "max": 448.0, "min_subnormal": 2.0 ** -9}
E5M2 = {"u": 2.0 ** -3, "p": 2, "max": 57344.0, "min_subnormal": 2.0 ** -16}
HIGH = None   # operand kept in high precision

# (operand formats) of the three GEMMs, per recipe, as torchao's recipes define them:
# output = input @ weight^T, grad_input = grad_output @ weight, grad_weight = grad_output^T @ input
GEMM_FORMATS = {
    "tensorwise": {"y": (E4M3, E4M3), "grad_x": (E5M2, E4M3), "grad_w": (E5M2, E4M3)},
    "rowwise": {"y": (E4M3, E4M3), "grad_x": (E4M3, E4M3), "grad_w": (E4M3, E4M3)},
    "rowwise_with_gw_hp": {"y": (E4M3, E4M3), "grad_x": (E4M3, E4M3), "grad_w": (HIGH, HIGH)},
}
FP8_GEMMS_PER_LINEAR = {"tensorwise": 3, "rowwise": 3, "rowwise_with_gw_hp": 2}

# tiny_hf_config: hidden 128, intermediate 256, 4 query heads and 2 key/value heads of 32, so
# every projection has dimensions divisible by 16; two blocks of 7 linear layers each.
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DECODER_LINEARS = [f"model.layers.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]


class OneBlock(nn.Module):
    """A single linear layer inside `layers.0`, where apply_fp8's default filter looks."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.layers[0].proj.weight.copy_(weight)

    def forward(self, x):
        return self.layers[0].proj(x)


def _expected_relative_error(formats) -> float:
    """RMS relative rounding error of a product of two independently rounded operands.

    Round-to-nearest with p mantissa bits leaves an error uniform in +-ulp / 2, ulp = 2^(e - p),
    for x = m 2^e, m in [1, 2). With mantissas distributed log-uniformly (as for Gaussian data),
    E[(err / x)^2] = 2^(-2p) / 12 * E[1 / m^2] and E[1 / m^2] = 3 / (8 ln 2). The relative
    errors of the two operands add in quadrature, and for random zero-mean operands so do those
    of the K products of a dot product."""
    mean_inverse_square = 3 / (8 * math.log(2))
    return math.sqrt(sum(2.0 ** (-2 * f["p"]) / 12 * mean_inverse_square
                         for f in formats if f is not HIGH))


def _rigorous_bound(a: torch.Tensor, b: torch.Tensor, formats) -> torch.Tensor:
    """Elementwise bound on |fp8(a) @ fp8(b) - a @ b| (module docstring), plus the rounding of
    an output that passes through bf16 (torchao's rowwise path for fp32 outputs) and fp32
    accumulation."""
    fa, fb = formats
    abs_product = a.abs() @ b.abs()
    if fa is HIGH:
        return 1e-6 * abs_product
    # Below the normal range the error is absolute: half the smallest subnormal, in units of
    # the tensor's scale (448 / amax, or down to half that when scales are rounded to powers of
    # two). The tensor-wide amax bounds every row's.
    eta_a = fa["min_subnormal"] / 2 * 2 * a.abs().max() / fa["max"]
    eta_b = fb["min_subnormal"] / 2 * 2 * b.abs().max() / fb["max"]
    gamma = (1 + fa["u"]) * (1 + fb["u"]) - 1
    k = a.shape[1]
    bound = (gamma * abs_product + eta_a * (1 + fb["u"]) * b.abs().sum(0, keepdim=True)
             + eta_b * (1 + fa["u"]) * a.abs().sum(1, keepdim=True) + k * eta_a * eta_b)
    exact = a @ b
    return bound + 2.0 ** -8 * (exact.abs() + bound) + 1e-6 * abs_product


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Counts torch._scaled_mm calls (torchao looks it up on torch at every call)."""
    calls = []
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    return calls


# --------------------------------------------------------------------------------------------
# One linear layer against fp32


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_linear_matches_fp32_within_the_quantization_error(recipe, scaled_mm_calls):
    g = torch.Generator().manual_seed(0)
    m, k, n = 64, 256, 128
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    grad_y = torch.randn(m, n, generator=g)
    reference, quantized = OneBlock(w), OneBlock(w)
    summary = apply_fp8(quantized, recipe)
    assert summary.converted == ["layers.0.proj"] and not summary.skipped

    results = {}
    for name, model in (("fp32", reference), ("fp8", quantized)):
        x_in = x.clone().requires_grad_()
        y = model(x_in)
        y.backward(grad_y)
        results[name] = {"y": y.detach(), "grad_x": x_in.grad,
                         "grad_w": model.layers[0].proj.weight.grad}
    assert len(scaled_mm_calls) == FP8_GEMMS_PER_LINEAR[recipe]
    assert all(dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for dtype in scaled_mm_calls)

    operands = {"y": (x, w.t()), "grad_x": (grad_y, w), "grad_w": (grad_y.t(), x)}
    for gemm, (a, b) in operands.items():
        exact, got = results["fp32"][gemm], results["fp8"][gemm]
        assert got.dtype == torch.float32 and got.shape == exact.shape
        formats = GEMM_FORMATS[recipe][gemm]
        bound = _rigorous_bound(a, b, formats)
        excess = ((got - exact).abs() - bound).max().item()
        assert excess <= 0, f"{recipe} {gemm}: error exceeds the rounding bound by {excess:.3g}"
        relative = ((got - exact).norm() / exact.norm()).item()
        if formats[0] is HIGH:
            assert relative < 1e-5, (recipe, gemm, relative)
        else:
            expected = _expected_relative_error(formats)
            assert 0.8 * expected < relative < 1.2 * expected, (recipe, gemm, relative, expected)


# --------------------------------------------------------------------------------------------
# Conversion of whole models


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_decoder_linears_convert_and_every_parameter_gets_a_gradient(recipe, scaled_mm_calls):
    reference = from_config(tiny_hf_config("llama3"), dtype=torch.float32, seed=0)
    model = copy.deepcopy(reference)
    summary = apply_fp8(model, recipe)
    assert summary.converted == DECODER_LINEARS and not summary.skipped
    for name, module in model.named_modules():
        assert fp8.is_fp8_linear(module) == (name in DECODER_LINEARS), name
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding

    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert len(scaled_mm_calls) == len(DECODER_LINEARS) * FP8_GEMMS_PER_LINEAR[recipe]
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # The FP8 rounding moves the loss a little, not far.
    expected = reference(ids, labels=ids).loss
    assert abs(loss.item() - expected.item()) < 0.01 * expected.item()


def test_layers_with_dimensions_fp8_cannot_take_stay_high_precision_and_are_reported(capsys):
    model = from_config(tiny_hf_config("llama3", intermediate_size=200), seed=0)
    summary = apply_fp8(model)
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    kept = {f"model.layers.{i}.{name}" for i in range(2) for name in mlp}
    assert set(summary.skipped) == kept
    assert summary.converted == [name for name in DECODER_LINEARS if name not in kept]
    assert summary.skipped["model.layers.0.mlp.up_proj"] == "out_features 200 not divisible by 16"
    assert summary.skipped["model.layers.1.mlp.down_proj"] == "in_features 200 not divisible by 16"
    assert not fp8.is_fp8_linear(model.model.layers[0].mlp.up_proj)
    report = capsys.readouterr().err
    assert "8 linear layers converted, 6 kept in high precision" in report
    assert "kept model.layers.1.mlp.gate_proj: out_features 200 not divisible by 16" in report
    ids = torch.randint(0, 256, (1, 32))
    model(ids, labels=ids).loss.backward()   # mixed FP8 and high-precision blocks still train


def test_a_second_call_converts_nothing_twice_and_a_filter_narrows_the_choice():
    model = from_config(tiny_hf_config("llama3"), seed=0)
    attention_only = apply_fp8(model, module_filter=lambda _module, name: "self_attn" in name)
    assert attention_only.converted == [n for n in DECODER_LINEARS if "self_attn" in n]
    again = apply_fp8(model)
    assert again.already_fp8 == attention_only.converted
    assert again.converted == [n for n in DECODER_LINEARS if "mlp" in n]
    # FSDP all-gathers in FP8 only tensorwise-scaled weights; rowwise ones go in high precision.
    rowwise = from_config(tiny_hf_config("llama3"), seed=0)
    assert not apply_fp8(rowwise, "rowwise", fsdp=True).fp8_all_gather
    assert type(rowwise.model.layers[0].mlp.up_proj.weight) is nn.Parameter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_state_dict_names_and_dtypes_are_the_models_own(dtype, tmp_path):
    from safetensors.torch import load_file

    from rega_engine.model import save_pretrained

    plain = from_config(tiny_hf_config("llama3"), dtype=dtype, seed=0)
    model = copy.deepcopy(plain)
    apply_fp8(model)
    before, after = plain.state_dict(), model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert type(tensor) is torch.Tensor, name
        assert tensor.dtype == before[name].dtype == dtype, name
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0, msg=name)

    other = from_config(tiny_hf_config("llama3"), dtype=dtype, seed=1).state_dict()
    model.load_state_dict(other)   # strict: a bf16 run's state dict loads as it is
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, other[name], atol=0, rtol=0, msg=name)

    save_pretrained(model, tmp_path / "fp8")
    save_pretrained(from_config(tiny_hf_config("llama3"), dtype=dtype, seed=1), tmp_path / "bf16")
    exported, expected = (load_file(tmp_path / d / "model.safetensors") for d in ("fp8", "bf16"))
    assert exported.keys() == expected.keys()
    for name in expected:
        assert exported[name].dtype == expected[name].dtype
        torch.testing.assert_close(exported[name], expected[name], atol=0, rtol=0, msg=name)


def test_a_transformers_llama_converts_with_its_lm_head_untouched(scaled_mm_calls):
    from rega_engine.integrations.hf import apply_rega_kernels

    model = make_hf_model("llama3").train()
    names = [name for name, _ in model.named_parameters()]
    summary = apply_fp8(model)
    assert summary.converted == DECODER_LINEARS and not summary.skipped
    assert type(model.lm_head) is nn.Linear
    assert [name for name, _ in model.named_parameters()] == names
    # Composes with our patches: varlen attention and the fused loss over lm_head.weight.
    apply_rega_kernels(model)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None   # the fused cross-entropy ran
    out.loss.backward()
    assert len(scaled_mm_calls) == len(DECODER_LINEARS) * 3
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Where FP8 may run


def test_gpus_without_fp8_are_refused_with_the_device_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as error:
        check_fp8_supported(torch.device("cuda", 0))
    message = str(error.value)
    for part in ("NVIDIA A100-SXM4-80GB", "compute capability 8.0", "cuda:0", "8.9",
                 'train.precision = "bf16"'):
        assert part in message
    check_fp8_supported("cuda:0", capability=(9, 0))          # H100 / H200
    check_fp8_supported("cuda:0", capability=(8, 9))          # L4, RTX 4090
    with pytest.raises(ConfigError, match="7.5"):
        check_fp8_supported("cuda:1", capability=(7, 5), device_name="Tesla T4")
    with pytest.raises(ConfigError, match="not on mps"):
        check_fp8_supported("mps")


def test_cpu_is_allowed_and_says_once_that_it_is_for_numerics_only(monkeypatch, capsys):
    monkeypatch.setattr(fp8, "_cpu_notice_given", False)
    check_fp8_supported("cpu")
    check_fp8_supported("cpu")
    err = capsys.readouterr().err
    assert err.count("torch._scaled_mm") == 1 and "slow" in err


def test_missing_torchao_old_torch_bad_recipe_and_token_count_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="tensorwise, rowwise, rowwise_with_gw_hp"):
        apply_fp8(nn.Linear(16, 16), "delayed")
    with pytest.raises(ConfigError, match="round it to 112"):
        fp8.check_fp8_token_count(100)
    fp8.check_fp8_token_count(2 * 4096)
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    with pytest.raises(ConfigError, match="torch >= 2.9"):
        check_fp8_supported("cpu")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torchao.float8", None)   # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'rega-engine\[fp8\]'"):
        check_fp8_supported("cpu")


# --------------------------------------------------------------------------------------------
# Training: FP8 against the high-precision run, and under FSDP2


def _train_losses(recipe: str | None, dtype: torch.dtype, steps: int = 20) -> list[float]:
    """AdamW on two fixed batches of arithmetic progressions, in turn: a task the tiny model
    learns within the steps, so the curve falls far (from ~5.6 to ~1.5)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (2, 4, 1), generator=g)
    stride = torch.randint(1, 8, (2, 4, 1), generator=g)
    batches = (start + stride * torch.arange(64)) % 256
    model = from_config(tiny_hf_config("llama3"), dtype=dtype, seed=0)
    if recipe is not None:
        apply_fp8(model, recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids = batches[step % 2]
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_training_follows_the_high_precision_loss_curve(dtype):
    """FP8 within 5% of the same run without it at every one of 20 steps (measured: up to 3.6%
    against fp32 and 2.4% against bf16 weights); both learn."""
    reference = _train_losses(None, dtype)
    assert reference[-1] < 0.4 * reference[0]
    for recipe in FP8_RECIPES:
        losses = _train_losses(recipe, dtype)
        gaps = [abs(a - b) / b for a, b in zip(losses, reference)]
        assert max(gaps) < 0.05, (recipe, [round(gap, 4) for gap in gaps])


def test_fsdp2_fp8_all_gather_trains_like_the_plain_model_and_round_trips(tmp_path):
    """FSDP2 (one gloo process) with the tensorwise weights all-gathered in FP8: built on the
    meta device and loaded into shards as the training loop does, it trains like the plain FP8
    model, and its DCP checkpoint and safetensors export hold the bf16 model's names and dtypes."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from rega_engine.model import from_pretrained, load_state_dict_into, save_pretrained

    source = make_tiny_checkpoint(tmp_path / "base", "llama3")
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))

    def train(model, steps):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(steps):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            fp8.precompute_fp8_weight_scales(model)
            losses.append(loss.item())
        return losses

    plain = from_pretrained(source)
    apply_fp8(plain)
    expected = train(plain, 3)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def build(use_fp8=True):
            model = from_pretrained(source, device="meta")
            summary = apply_fp8(model, fsdp=True) if use_fp8 else None
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to_empty(device="cpu")
            return model, summary

        model, summary = build()
        assert summary.fp8_all_gather
        assert type(model.model.layers[0].mlp.up_proj.weight._local_tensor).__name__ == (
            "WeightWithDynamicFloat8CastTensor")
        load_state_dict_into(model, source)
        losses = train(model, 3)
        torch.testing.assert_close(losses, expected, atol=1e-5, rtol=0)

        # Resume: an FP8 run's DCP checkpoint loads into an FP8 model and into a bf16 run's.
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp_path / "dcp"))
        trained = plain.state_dict()
        for run, resumed in (("fp8", build()[0]), ("bf16", build(use_fp8=False)[0])):
            state = get_model_state_dict(resumed)
            dcp.load({"model": state}, checkpoint_id=str(tmp_path / "dcp"))
            set_model_state_dict(resumed, state)
            assert all(isinstance(p, DTensor) for p in resumed.parameters())
            full = get_model_state_dict(resumed, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
            full = fp8.plain_state_dict(full)
            assert list(full) == list(trained)
            for name, tensor in full.items():
                assert type(tensor) is torch.Tensor, name
                assert tensor.dtype == trained[name].dtype == torch.float32, name
                torch.testing.assert_close(tensor, trained[name], atol=1e-6, rtol=0, msg=name)
            # Export, as the loop writes it: bf16 safetensors from the full state dict.
            save_pretrained(resumed, tmp_path / run, state_dict=full, dtype=torch.bfloat16)
    finally:
        dist.destroy_process_group()
    exported, expected = (load_file(tmp_path / run / "model.safetensors")
                          for run in ("fp8", "bf16"))
    assert set(exported) == set(expected) == set(load_file(tmp_path / "base" / "model.safetensors"))
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=name)



@pytest.mark.slow
def test_fp8_composes_with_activation_checkpointing_and_compile():
    """FP8 is applied first, then the loop's per-block checkpointing or torch.compile; both
    compute what the eager FP8 model does. (They are tested apart: on CPU the torch attention
    reference breaks the graph inside a checkpointed block, and Dynamo then runs that block
    eagerly, so checkpointing plus compile would compile nothing here.)"""
    from torch._dynamo.utils import counters

    from rega_engine.train.parallel import checkpoint_block, compile_block

    eager = from_config(tiny_hf_config("llama3", num_hidden_layers=1), dtype=torch.float32,
                        seed=0)
    apply_fp8(eager)
    checkpointed, compiled = copy.deepcopy(eager), copy.deepcopy(eager)
    for block in checkpointed.model.layers:
        checkpoint_block(block)
    for block in compiled.model.layers:
        compile_block(block)
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(4))
    losses = []
    for model in (eager, checkpointed, compiled):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert counters["stats"]["unique_graphs"] > 0   # the FP8 blocks were really compiled
    for model, loss in zip((checkpointed, compiled), losses[1:]):
        assert loss == pytest.approx(losses[0], rel=1e-4)
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)
