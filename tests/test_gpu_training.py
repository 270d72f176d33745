"""The model and the training loop on a CUDA device, beyond the kernels' own GPU tests:

  * the whole model (a Llama-3.2-1B-like layer layout, two layers) with the Triton kernels against
    the torch backends at bf16 on a realistic packed batch;
  * 20 training steps of a small model through `rega-engine train`, compile off and on, the
    loss falling;
  * a DCP checkpoint saved (synchronously and in the background) and resumed on the GPU, the
    resumed steps equal to the uninterrupted ones;
  * `apply_rega_kernels` on a transformers Llama at bf16 against the unpatched model.
Skipped without CUDA (the same paths run on CPU in test_model, test_train, test_checkpoint and
test_integrations_hf).

Tolerances: bf16 results are compared with an fp32 reference next to the error the other bf16
path makes against that same reference (relative Frobenius norm): ours may be at most twice that
baseline's error plus a floor of 1e-2, and never above 5e-2 (the kernels round probabilities and
logits to bf16 before their products, as every fused kernel does; a wrong mask or a missed
document boundary gives errors of order 1).
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from rega_engine.kernels import attention  # noqa: E402
from train_helpers import cli_args, read_log, run_config  # noqa: E402

from rega_engine.batch import IGNORE_INDEX  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(attention.INTERPRETED,
                       reason="kernels were built for the Triton interpreter"),
]
FLOOR, CEILING = 1e-2, 5e-2

# Llama 3.2 1B's layer layout (hidden 2048, 32 query / 8 key-value heads of 64, MLP 8192, the
# 128256-token vocabulary, llama3 rope), two layers so that the test stays seconds long.
ONE_B_LIKE = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 2,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_close_to_reference(name: str, ours, baseline, reference) -> None:
    err, base = rel_err(ours, reference), rel_err(baseline, reference)
    assert err <= min(2 * base + FLOOR, CEILING), (
        f"{name}: relative error {err:.2e} against fp32; the other bf16 path has {base:.2e}")


def packed_rows(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A batch.py batch on the GPU: documents of SFT-like lengths (64 to 2048 tokens) back to
    back, a prompt share without loss, each row's tail as one padding segment."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels, positions, segments = [], [], [], []
    for _ in range(rows):
        lengths, used = [], 0
        while True:
            n = int(torch.randint(64, 2049, (), generator=gen))
            if used + n > seq_len - 16:
                break
            lengths.append(n)
            used += n
        pad = seq_len - used
        row_ids = torch.randint(3, vocab, (seq_len,), generator=gen)
        row_labels = row_ids.clone()
        start = 0
        for n in lengths:
            prompt = int(n * 0.3)
            row_labels[start:start + max(prompt, 1)] = IGNORE_INDEX  # the first token, the prompt
            start += n
        row_labels[used:] = IGNORE_INDEX
        row_ids[used:] = 0
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(torch.cat([torch.arange(n) for n in lengths + [pad]]))
        segments += lengths + [pad]
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": torch.stack(ids).cuda(), "labels": torch.stack(labels).cuda(),
            "position_ids": torch.stack(positions).cuda(), "cu_seqlens": cu.cuda(),
            "max_seqlen": max(segments)}


def loss_and_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_model_with_triton_kernels_matches_torch_backends_at_bf16():
    from rega_engine.model import from_config

    reference = from_config(ONE_B_LIKE, dtype=torch.float32, device="cuda", seed=0)
    reference.attention_backend = reference.cross_entropy_backend = "torch"
    batch = packed_rows(rows=2, seq_len=8192, vocab=ONE_B_LIKE["vocab_size"])
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    results = {}
    for backend in ("triton", "torch"):
        model = copy.deepcopy(reference).to(torch.bfloat16)
        model.attention_backend = model.cross_entropy_backend = backend
        results[backend] = loss_and_grads(model, batch)
        del model
    (loss, grads), (base_loss, base_grads) = results["triton"], results["torch"]
    assert torch.isfinite(loss)
    assert_close_to_reference("loss", loss, base_loss, ref_loss)
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.bfloat16, name
        assert_close_to_reference(name, grads[name], base_grads[name], ref)


def _train_cli(config, *extra: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rega_engine.cli", "train", *cli_args(config), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def test_twenty_training_steps_on_the_gpu_lower_the_loss(tmp_path):
    _twenty_steps(tmp_path, compile_blocks=False)


def _twenty_steps(tmp_path, compile_blocks: bool) -> None:
    config = run_config(tmp_path, "--train.device=cuda", f"--model.compile={compile_blocks}",
                        steps=20)
    proc = _train_cli(config)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 21))
    losses = [r["loss"] for r in log]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, f"loss did not fall: {losses}"
    assert all(r["tokens_per_s"] > 0 for r in log)
    said = proc.stdout + proc.stderr
    assert "on cuda" in said and ("torch.compile" in said) == compile_blocks


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_checkpoint_resumed_on_the_gpu_continues_the_same_run(tmp_path, background):
    # async: DCP's async_save stages CUDA shards to host memory and writes them over a gloo group
    # beside the NCCL one (train/checkpoint.py), a path only a GPU runs.
    from rega_engine.train.checkpoint import complete_checkpoints

    config = run_config(tmp_path, "--train.device=cuda", "--checkpoint.every=3",
                        "--checkpoint.keep=2", f"--checkpoint.async={str(background).lower()}",
                        steps=6)
    # The two processes must run the same attention kernels: each would otherwise autotune on
    # its own, and timing noise can pick another tile order (a different bf16 rounding of the
    # loss). Triton's cached choice (in its cache directory, shared by both) makes it one.
    same_kernels = {"TRITON_CACHE_AUTOTUNING": "1"}
    _train_cli(config, **same_kernels)
    uninterrupted = read_log(tmp_path / "run")
    checkpoints = complete_checkpoints(tmp_path / "run")
    assert [step for step, _ in checkpoints] == [3, 6]
    # Drop the last checkpoint: --resume then restarts from step 3 and retrains steps 4 to 6.
    shutil.rmtree(checkpoints[-1][1])
    proc = _train_cli(config, "--resume", **same_kernels)
    assert "at step 3" in proc.stdout + proc.stderr
    resumed = read_log(tmp_path / "run")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    # Step 4's forward runs on the restored weights and data through the same kernel configs:
    # its loss is the same up to the reduction order of the loss-weight all-reduce; later steps
    # may differ by the atomics of the backward's accumulation, within bf16 noise.
    assert resumed[3]["loss"] == pytest.approx(uninterrupted[3]["loss"], rel=1e-5)
    for got, want in zip(resumed[4:], uninterrupted[4:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in uninterrupted]


def test_apply_rega_kernels_at_bf16_matches_the_unpatched_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    from rega_engine.integrations.hf import PaddingFreeCollator, apply_rega_kernels

    config = AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=8192, use_cache=False)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=torch.float32).cuda()
    gen = torch.Generator().manual_seed(1)
    features = []
    for n in torch.randint(32, 1025, (12,), generator=gen).tolist():
        ids = torch.randint(3, 32000, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v
             for k, v in PaddingFreeCollator()(features).items()}

    def run(model):
        model.train()
        return loss_and_grads(model, batch)

    ref_loss, ref_grads = run(reference)
    unpatched_loss, unpatched_grads = run(copy.deepcopy(reference).to(torch.bfloat16))
    patched = apply_rega_kernels(copy.deepcopy(reference).to(torch.bfloat16), backend="triton")
    loss, grads = run(patched)
    assert_close_to_reference("loss", loss, unpatched_loss, ref_loss)
    for name, ref in ref_grads.items():
        assert_close_to_reference(name, grads[name], unpatched_grads[name], ref)


# Last in the file: the cold torch.compile is the slowest test here, so that under gpu-check's
# deadline it is the one left out, not the ones above.
def test_twenty_compiled_training_steps_on_the_gpu_lower_the_loss(tmp_path):
    _twenty_steps(tmp_path, compile_blocks=True)
