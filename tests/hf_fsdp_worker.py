"""Worker for tests/test_hf_fsdp_host.py, run by torchrun with 2 gloo processes (CPU).

Every scenario builds the same tiny transformers model twice (fp32), shards both copies the same
way with FSDP2's fully_shard (one scenario with bf16 mixed precision), patches one with
apply_rega_kernels (before or after sharding), runs two training forwards and backwards
(gradients accumulated) on batches of its own per rank and compares: the losses on each rank and
every parameter's gradient (the sharded DTensor's `.grad`, gathered with full_tensor()).
`tensor_parallel` instead splits the LM head by vocabulary rows over both ranks (ColwiseParallel)
and compares the patched model's (vocabulary-parallel) loss and gradients with one unsplit,
unpatched copy's on the same batch.
Rank 0 writes {scenario: {...measured differences...}} as JSON to the path in argv[1];
argv[2:] picks scenarios (all by default).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_hf_model  # noqa: E402

from rega_engine.batch import IGNORE_INDEX  # noqa: E402
from rega_engine.integrations.hf import apply_rega_kernels  # noqa: E402


def _batch(rank: int, micro: int = 0) -> dict:
    # Different tokens on each rank, so that the reduce-scatter averages two different gradients.
    generator = torch.Generator().manual_seed(100 + 10 * micro + rank)
    ids = torch.randint(4, 256, (2, 24), generator=generator)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, -5:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _model(family: str, lora: bool, **overrides):
    model = make_hf_model(family, use_cache=False, **overrides)
    if lora:
        import peft
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj", "lm_head"])
        model = peft.get_peft_model(model, config)
    return model


def _causal_lm(model):
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def _shard(model, mesh, layout: str, bf16: bool = False) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def fully_shard(module, mesh):
        return shard(module, mesh=mesh, mp_policy=policy) if bf16 else shard(module, mesh=mesh)

    lm = _causal_lm(model)
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "head_unit":
        fully_shard(lm.lm_head, mesh=mesh)
    elif layout == "head_and_base_units":
        # Units nested inside the LM head (a size-based wrap policy may do this): the frozen base
        # weight is a unit of its own inside the LoRA wrapper's unit.
        fully_shard(lm.lm_head.base_layer, mesh=mesh)
        fully_shard(lm.lm_head, mesh=mesh)
    elif layout == "tied_group":
        # FSDP2 wants tied parameters in one unit: the embedding and the head together.
        fully_shard([lm.model.embed_tokens, lm.lm_head], mesh=mesh)
    elif layout != "root_only":
        raise ValueError(layout)
    fully_shard(model, mesh=mesh)


def _run(model, batches):
    # Two micro-batches, gradients accumulated: the second forward finds the units FSDP2's state
    # machine left after the first backward.
    from torch.distributed.tensor import DTensor
    model.train()
    losses, between = [], []
    head = _causal_lm(model).lm_head
    head_weight = getattr(head, "base_layer", head)
    for batch in batches:
        loss = model(**batch).loss
        # Between forward and backward: a unit that reshards after forward holds shards again.
        between.append(isinstance(head_weight.weight, DTensor))
        loss.backward()
        losses.append(loss.detach())
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            grads[name] = None
            continue
        assert isinstance(param, DTensor) and isinstance(param.grad, DTensor), name
        grads[name] = param.grad.full_tensor()
    return torch.stack(losses), grads, between


SCENARIOS = {
    # name: (family, lora, layout, patch "before"/"after" sharding, config overrides)
    "head_unit_shard_then_patch": ("llama3", False, "head_unit", "after", {}),
    "head_unit_patch_then_shard": ("llama3", False, "head_unit", "before", {}),
    "head_in_root": ("llama3", False, "root_only", "after", {}),
    "tied_group": ("qwen2", False, "tied_group", "after", {"tie_word_embeddings": True}),
    "tied_in_root": ("qwen2", False, "root_only", "before", {"tie_word_embeddings": True}),
    "lora_head_unit": ("llama3", True, "head_unit", "after", {}),
    "lora_head_unit_patch_then_shard": ("llama3", True, "head_unit", "before", {}),
    "lora_nested_units": ("llama3", True, "head_and_base_units", "after", {}),
    # FSDP2 mixed precision: bf16 compute (the unit casts the hidden states it is handed), fp32
    # gradient reduction; the unpatched head makes bf16 logits, the fused loss does not.
    "head_unit_bf16": ("llama3", False, "head_unit", "after", {"bf16": True}),
}


def scenario(name: str, mesh, rank: int) -> dict:
    family, lora, layout, when, overrides = SCENARIOS[name]
    overrides = dict(overrides)
    bf16 = overrides.pop("bf16", False)
    batches = [_batch(rank, 0), _batch(rank, 1)]
    reference = _model(family, lora, **overrides)
    patched = _model(family, lora, **overrides)
    _shard(reference, mesh, layout, bf16)
    if when == "before":
        apply_rega_kernels(patched, backend="torch")
    _shard(patched, mesh, layout, bf16)
    if when == "after":
        apply_rega_kernels(patched, backend="torch")
    ref_loss, ref_grads, ref_between = _run(reference, batches)
    loss, grads, between = _run(patched, batches)
    loss_diff = (loss - ref_loss).abs().max().reshape(1)
    dist.all_reduce(loss_diff, op=dist.ReduceOp.MAX)
    assert grads.keys() == ref_grads.keys()
    missing = sorted(n for n in grads if (grads[n] is None) != (ref_grads[n] is None))
    grad_diff, worst = 0.0, None
    for n, g in grads.items():
        if g is None or ref_grads[n] is None:
            continue
        diff = float((g - ref_grads[n]).abs().max())
        if diff >= grad_diff:
            grad_diff, worst = diff, n
    head = [n for n in grads if "lm_head" in n or (overrides.get("tie_word_embeddings")
                                                   and "embed_tokens" in n)]
    head_diff = max(float((grads[n] - ref_grads[n]).abs().max()) for n in head
                    if grads[n] is not None)
    scale = max(float(g.abs().max()) for g in ref_grads.values() if g is not None)
    return {"loss_diff": float(loss_diff), "grad_scale": scale, "loss": ref_loss.tolist(),
            "grad_diff": grad_diff,
            "worst": worst, "missing": missing, "head_grad_diff": head_diff,
            # the units that ran the fused loss through register_fsdp_forward_method
            "loss_units": [n for n, m in patched.named_modules()
                           if m.__dict__.get("_rega_loss_method")],
            "head_sharded_between": between, "reference_head_sharded_between": ref_between,
            "trainable": sum(g is not None for g in grads.values()),
            "head_grads": {n: None if grads[n] is None else float(grads[n].abs().max())
                           for n in head}}


def tensor_parallel(mesh, rank: int) -> dict:
    """lm_head under ColwiseParallel on the 2-rank mesh (its weight a Shard(0) DTensor, 128 of the
    256 ids per rank), patched after or before parallelizing, against the same model unsplit and
    unpatched: the loss and every gradient (the head's gathered) on the same batch on both ranks,
    as the ranks of a tensor-parallel group see it."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    batch = _batch(0)
    reference = make_hf_model("llama3", use_cache=False).train()
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    found = {}
    for when in ("after", "before"):
        model = make_hf_model("llama3", use_cache=False)
        if when == "before":
            apply_rega_kernels(model, backend="torch")
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
        if when == "after":
            apply_rega_kernels(model, backend="torch")
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in model.named_parameters()}
        found[when] = {
            "loss_diff": float((loss - ref_loss).abs()),
            "grad_diff": max(float((grads[n] - p.grad).abs().max())
                             for n, p in reference.named_parameters()),
            "head_rows": list(model.lm_head.weight.to_local().shape)}
    return found


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    names = sys.argv[2:] or [*SCENARIOS, "tensor_parallel"]
    results = {}
    for name in names:
        try:
            if name == "tensor_parallel":
                results[name] = tensor_parallel(mesh, rank)
            else:
                results[name] = scenario(name, mesh, rank)
        except Exception:   # noqa: BLE001 - reported to the test, which names the scenario
            results[name] = {"error": traceback.format_exc()[-3000:]}
        dist.barrier()
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
