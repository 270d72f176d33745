"""Tensor parallelism (parallel.tp): each decoder block's matmuls split over the ranks of a group.

Megatron's layout through DTensor (torch.distributed.tensor.parallel): q, k, v, gate and up are
split by output columns (ColwiseParallel: each rank computes its heads, its slice of the MLP's
hidden units), o and down by input rows (RowwiseParallel: the partial sums are all-reduced), so a
block costs two all-reduces forward and two backward. The split modules return plain local
tensors, so our custom ops (attention, RoPE, SwiGLU, RMSNorm) run unchanged on each rank's heads
and units; the attention reads its head counts from its inputs.

Every other parameter is a Replicate DTensor on the same tp mesh (embeddings, norms; the LM head
too when it is tied), which the model reads through `local_weight`: their computation is
replicated, so the local gradient is already the whole one. That keeps every parameter on one
(dp, tp) mesh for FSDP2, the gradient norm, the optimizer and DCP (a checkpoint resumes on
another tp degree: DCP reshards). An untied LM head is split by vocabulary rows (Shard(0)) and
the loss runs vocabulary-parallel on the rows (CausalLM._loss,
kernels/vocab_parallel_cross_entropy.py): the full-vocabulary logits and head are never
gathered, every rank gets its data-parallel rank's whole loss, and each the gradient of its rows.

The tp ranks of a group read the same rows (the loader deals by data-parallel rank) and compute
the same loss; one of them counts the batch in the metrics.
"""
from __future__ import annotations

from torch import nn

from rega_engine.config import ConfigError
from rega_engine.model.args import ModelArgs


def check_divisible(args: ModelArgs, tp: int) -> None:
    """A ConfigError naming what a tp degree does not divide (heads, key/value heads, the MLP's
    hidden units); the vocabulary may split unevenly."""
    sizes = {"num_attention_heads": args.num_attention_heads,
             "num_key_value_heads": args.num_key_value_heads,
             "intermediate_size": args.intermediate_size}
    bad = [f"{name} = {value}" for name, value in sizes.items() if value % tp]
    if bad:
        raise ConfigError(f"parallel.tp = {tp} does not divide the model's {', '.join(bad)}: each "
                          "tensor-parallel rank takes an equal share of the heads and of the MLP; "
                          "use a tp degree that divides them")


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Splits `model` (a CausalLM, on any device, meta included) over `tp_mesh` in place."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    check_divisible(model.args, tp_mesh.size())
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    for block in model.model.layers:
        parallelize_module(block, tp_mesh, plan)
    split = {id(p) for block in model.model.layers for p in block.parameters()
             if p.__class__.__name__ == "DTensor"}
    lm_head = model.lm_head
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in split:
                continue
            placement = Shard(0) if module is lm_head else Replicate()
            # distribute_tensor on a meta tensor keeps it on meta: the values come later
            # (sharded init or loading), as for the rest of the model.
            module.register_parameter(name, nn.Parameter(
                distribute_tensor(param.data, tp_mesh, [placement], src_data_rank=None),
                requires_grad=param.requires_grad))
            split.add(id(getattr(module, name)))
