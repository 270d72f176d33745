"""apply_rega_kernels under a host trainer's sharding: FSDP2 (fully_shard), DeepSpeed ZeRO-3, TP.

The fused loss reads the LM head's weight instead of calling `lm_head(hidden)`. FSDP2 unshards a
unit's parameters only around that unit's forward, so with `fully_shard(lm_head)` the weight the
loss reads would be a sharded DTensor (Liger #332, torchtune #2800, CCE #31). The patched forward
runs the loss through the unit's FSDP2 hooks (register_fsdp_forward_method); these tests compare
the sharded, patched model with the same sharded model unpatched, on 2 gloo processes, each rank
its own batches: losses and every parameter's gradient (the sharded `.grad`, full_tensor()).

Measured (fp32, CPU, torch 2.13, backend="torch", all kernels on, two micro-batches of
accumulated gradients): max |loss diff| 9.6e-7, max |grad diff| 5.4e-7 over all parameters,
2.3e-7 on the LM head's own (LoRA) parameters. bf16 mixed precision: see BF16_*.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_hf_model

from rega_engine.integrations.hf import apply_rega_kernels

ATOL = 1e-5     # about 10x the measured differences above
WORKER = os.path.join(os.path.dirname(__file__), "hf_fsdp_worker.py")
SCENARIOS = {
    # scenario: the FSDP2 units the fused loss must run through (outermost first)
    "head_unit_shard_then_patch": ["lm_head"],
    "head_unit_patch_then_shard": ["lm_head"],
    # lm_head in the root's unit: the root's forward has unsharded it already, nothing to do
    "head_in_root": [],
    # fully_shard([embed_tokens, lm_head]): FSDP2 refuses tied weights split across units
    "tied_group": ["lm_head"],
    "tied_in_root": [],
    "lora_head_unit": ["base_model.model.lm_head"],
    "lora_head_unit_patch_then_shard": ["base_model.model.lm_head"],
    "lora_nested_units": ["base_model.model.lm_head", "base_model.model.lm_head.base_layer"],
    "head_unit_bf16": ["lm_head"],
}
# FSDP2 mixed precision (bf16 parameters, fp32 reduction): the unpatched head rounds its logits to
# bf16, the fused loss does not. Measured: loss 1.4e-3 (of 5.9), gradients 3.1e-3 with the largest
# gradient entry 0.18 (1.7%), LM head 1.0e-3. A gradient that missed the reduce-scatter, or a
# shard read as the weight, is off by the gradient's own size.
BF16_LOSS_ATOL, BF16_GRAD_RELATIVE = 1e-2, 0.04


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One torchrun of the worker for every scenario (the interpreter and transformers import
    cost most of the ~40 s)."""
    out = tmp_path_factory.mktemp("hf_fsdp") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", WORKER, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sharded_patched_model_matches_sharded_unpatched(results, scenario):
    found = results[scenario]
    assert "error" not in found, found.get("error")
    assert found["loss_units"] == SCENARIOS[scenario]
    loss_atol = BF16_LOSS_ATOL if scenario.endswith("bf16") else ATOL
    grad_atol = BF16_GRAD_RELATIVE * found["grad_scale"] if scenario.endswith("bf16") else ATOL
    assert found["loss_diff"] <= loss_atol, found
    assert found["grad_diff"] <= grad_atol, found
    assert found["head_grad_diff"] <= grad_atol, found
    assert found["missing"] == []          # no parameter gains or loses its gradient
    # the head's trainable parameters really got a gradient (frozen LoRA base: none)
    head = found["head_grads"]
    assert any(value for value in head.values()), head
    assert all(value is None for name, value in head.items() if "base_layer" in name)
    # a unit of its own is resharded between forward and backward, as the unpatched one is
    assert found["head_sharded_between"] == found["reference_head_sharded_between"]


@pytest.mark.multiprocess
def test_a_tensor_parallel_lm_head_gets_the_vocabulary_parallel_loss(results):
    # ColwiseParallel on the 2-rank mesh: half of the vocabulary per rank, never gathered.
    found = results["tensor_parallel"]
    assert "error" not in found, found.get("error")
    for when in ("after", "before"):   # parallelized, then patched / patched, then parallelized
        seen = found[when]
        assert seen["head_rows"][0] == 128, seen
        assert seen["loss_diff"] <= ATOL and seen["grad_diff"] <= ATOL, seen


def _batch():
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def test_deepspeed_zero3_lm_head_is_refused_when_patching():
    model = make_hf_model("llama3", use_cache=False)
    model.lm_head.weight.ds_id = 7     # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    with pytest.raises(TypeError, match=r"lm_head\.weight is partitioned by DeepSpeed ZeRO-3.*"
                       r"apply_rega_kernels\(model, cross_entropy=False\)"):
        apply_rega_kernels(model, backend="torch")
    assert "cross_entropy" not in model.__dict__.get("_rega_patched", set())
    # the other kernels run inside their modules' forwards, where ZeRO-3 gathers the weights
    apply_rega_kernels(model, cross_entropy=False, backend="torch")


def test_deepspeed_zero3_lm_head_is_refused_in_the_forward():
    # Patched first, partitioned afterwards (deepspeed.initialize after apply_rega_kernels).
    model = apply_rega_kernels(make_hf_model("qwen2", use_cache=False, tie_word_embeddings=True),
                               backend="torch").train()
    model.model.embed_tokens.weight.ds_status = "NOT_AVAILABLE"   # tied: lm_head's weight too
    with pytest.raises(TypeError, match="DeepSpeed ZeRO-3"):
        model(**_batch())
