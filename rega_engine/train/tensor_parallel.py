"""Tensor parallelism (parallel.tp): each decoder block's matmuls split over the ranks of a group,
and with sequence parallelism (parallel.sequence_parallel, the default) the tokens in between.

Megatron's layout through DTensor (torch.distributed.tensor.parallel): q, k, v, gate and up are
split by output columns (ColwiseParallel: each rank computes its heads, its slice of the MLP's
hidden units), o and down by input rows (RowwiseParallel: the partial sums are reduced). The
split modules return plain local tensors, so our custom ops (attention, RoPE, SwiGLU) run
unchanged on each rank's heads and units; the attention reads its head counts from its inputs.

Between the split regions (the residual stream, the RMSNorms, the embeddings' output) every rank
holds the whole (T, hidden) activations without sequence parallelism, and its share of the
tokens, T / tp, with it: o and down then reduce-scatter their partial sums over the tokens instead
of all-reducing them, and the attention and the MLP all-gather their input (PrepareModuleInput):
the same bytes on the wire, 1 / tp of those activations per rank. The input reaches q, k and v
(gate and up) as one DTensor, so their partial input gradients add up before ONE reduction (a
reduce-scatter, or an all-reduce without SP), not one per projection. The RMSNorms then see
their rank's tokens only: the gradient of their (Replicate) weight is a partial sum
(`local_weight(..., partial_grad=True)`), which FSDP2 all-reduces over the tp ranks when it
reduces the gradient.

The embedding table and the LM head are split by vocabulary rows (Shard(0); the last rank's share
may be shorter): each rank looks up the ids its rows hold and the lookups are summed over the
ranks (embed_split_vocabulary: reduce-scattered over the tokens under SP, else all-reduced); the
final norm's output is all-gathered (gather_tokens) and the loss runs vocabulary-parallel
(CausalLM._loss, kernels/vocab_parallel_cross_entropy.py): the full-vocabulary logits and head are
never gathered, every rank gets its data-parallel rank's whole loss, and each the gradient of
its rows. A tied model's one table is split once and serves both.

Every parameter thus lives on the tp mesh (the norms as Replicate DTensors, read through
`local_weight`), so FSDP2 (2-D), the gradient norm, the optimizer and DCP see one (dp, tp) mesh,
and a checkpoint resumes on another tp degree (DCP reshards). The tp ranks of a group read the
same rows (the loader deals by data-parallel rank) and compute the same loss; one of them counts
the batch in the metrics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rega_engine.config import ConfigError
from rega_engine.model.args import ModelArgs
from rega_engine.model.llama import RMSNorm


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


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> None:
    """Splits `model` (a CausalLM, on any device, meta included) over `tp_mesh` in place;
    `sequence_parallel`: the tokens too, between the split matmuls. FP8 linear layers
    (train/fp8.py, converted before) are split like any other: their tensorwise scales are
    computed on the DTensor weights, over the whole weight, and the activations are gathered in
    the model's dtype (torchao's FP8 split styles would gather them in FP8, which gloo cannot
    carry, so nothing here could test them)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

    check_divisible(model.args, tp_mesh.size())
    ColwiseParallel, RowwiseParallel = _split_styles()
    between = Shard(0) if sequence_parallel else Replicate()   # the (T, hidden) activations
    # Attention and MLP get their input as one DTensor, whole (all-gathered under SP): the
    # partial gradients of q, k and v (gate and up) add up as DTensors and are reduced once
    # there, not once per projection. The input layouts follow forward's positional arguments.
    gathered = {"self_attn": PrepareModuleInput(input_layouts=(between, None, None, None, None),
                                                desired_input_layouts=(Replicate(), None, None,
                                                                       None, None)),
                "mlp": PrepareModuleInput(input_layouts=(between,),
                                          desired_input_layouts=(Replicate(),))}
    plan = {**gathered,
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=between),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=between)}
    for block in model.model.layers:
        parallelize_module(block, tp_mesh, plan)
    split = {id(p) for block in model.model.layers for p in block.parameters()
             if isinstance(p, DTensor)}
    # the embedding table and the LM head (a tied model has none) by vocabulary rows
    tables = {id(m) for m in (model.model.embed_tokens, model.lm_head) if m is not None}
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.tokens_split = sequence_parallel
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in split:
                continue
            # on the meta device a DTensor stays on meta: the values come later (sharded init
            # or loading), as for the rest of the model
            _distribute(module, tp_mesh, {name: Shard(0) if id(module) in tables else Replicate()})
            split.add(id(getattr(module, name)))
    model.model.sequence_parallel = sequence_parallel


def _split_styles():
    """torch's ColwiseParallel and RowwiseParallel, splitting a LoRA layer's adapters (model/
    lora.py: lora_A and lora_B submodules of the linear layer) with its weight: column-wise, A
    (rank x in) whole and B (out x rank) by its output rows, like the weight; row-wise, A by its
    input columns, like the weight, and B whole. The adapter's output then has the base output's
    layout (this rank's columns; a partial sum), and the layer's forward adds the two as
    DTensors. torch's own styles would split A and B by rows (column-wise) or not at all."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # distribute_module calls the partition function for the layer (name "") and then for each
    # of its submodules: the adapters are split with the layer, and left alone after.
    class Colwise(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            if not name:
                _distribute(module, device_mesh, {"weight": Shard(0), "bias": Shard(0),
                                                  "lora_A.weight": Replicate(),
                                                  "lora_B.weight": Shard(0)})

    class Rowwise(RowwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            if not name:
                _distribute(module, device_mesh, {"weight": Shard(1), "bias": Replicate(),
                                                  "lora_A.weight": Shard(1),
                                                  "lora_B.weight": Replicate()})

    return Colwise, Rowwise


def _distribute(module: nn.Module, mesh, placements: dict) -> None:
    """Each parameter of `placements` that `module` has (dotted names reach into submodules)
    replaced by a DTensor of that placement on `mesh`, its local piece cut from the tensor
    without communication (every rank holds the same values, or the meta device)."""
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        param = getattr(owner, leaf, None)
        if param is not None:
            owner.register_parameter(leaf, nn.Parameter(
                distribute_tensor(param.data, mesh, [placement], src_data_rank=None),
                requires_grad=param.requires_grad))


def embed_split_vocabulary(ids: torch.Tensor, split, mesh, tokens_split: bool) -> torch.Tensor:
    """The embeddings of `ids` (T,) from a table split by vocabulary rows over `mesh` (`split`:
    vocab_shard of the Shard(0) DTensor table, this rank's rows and their first id): each rank
    looks up the ids its rows hold (zeros for the others), and the ranks' lookups are summed:
    all-reduced, or reduce-scattered over the tokens when they are split (each rank then gets
    its share, T / tp). The backward all-gathers (under SP) and each rank's rows get the
    gradient of their ids."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    rows, start, _ = split
    local = ids - start
    held = (local >= 0) & (local < rows.shape[0])
    looked_up = F.embedding(torch.where(held, local, 0), rows).masked_fill(~held[:, None], 0.0)
    if tokens_split and ids.shape[0] % mesh.size():
        raise ValueError(f"sequence parallelism (parallel.sequence_parallel) splits a "
                         f"micro-batch's {ids.shape[0]} tokens over the {mesh.size()} tp ranks, "
                         "which does not divide them; make data.seq_len a multiple of "
                         "parallel.tp x parallel.cp")
    summed = DTensor.from_local(looked_up, mesh, [Partial()], run_check=False)
    return summed.redistribute(mesh, [Shard(0) if tokens_split else Replicate()]).to_local()


def gather_tokens(x: torch.Tensor, mesh) -> torch.Tensor:
    """Every rank's share of the tokens (T / tp, hidden) -> all of them (T, hidden), for the LM
    head. The backward keeps this rank's share of the gradient without summing: the head's
    vocabulary-parallel loss already returns the gradient summed over the tp ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shares = DTensor.from_local(x, mesh, [Shard(0)], run_check=False)
    return shares.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Replicate()])
