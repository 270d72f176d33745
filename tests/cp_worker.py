"""torchrun worker for tests/test_context_parallel.py: one packed micro-batch through a plain
(unsharded) model on every rank, whole (the reference) and split over the ranks as one cp group
(CausalLM.forward(..., context=shard_batch(...))); writes to <out>/<tag>_rank<r>.json the largest
differences between the split run, summed over the group, and the reference:

  loss           the "sum" loss (each rank's share, all-reduced)
  token_losses   per token, (B, L) with zeros at other ranks' positions, all-reduced
  logits         every token's logits, likewise
  grads          every parameter's gradient (each rank's, all-reduced), the largest over them
  counted        label tokens the ranks' own() labels hold, summed, and the reference's count

The batch: 2 rows of 48 tokens; row 0 holds documents of 30, 5 and 9 tokens and a padding tail of
4, row 1 documents of 3 and 40 and a tail of 5: with cp = 2 (chunks of 12) and cp = 4 (chunks of
6) documents cross every chunk boundary, and some are shorter than a chunk.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/cp_worker.py OUT TAG
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_hf_config  # noqa: E402

from rega_engine.batch import IGNORE_INDEX, PackedBatch  # noqa: E402
from rega_engine.model import from_config  # noqa: E402
from rega_engine.train.context_parallel import shard_batch  # noqa: E402

ROWS = ((30, 5, 9), (3, 40))
SEQ_LEN = 48


def packed_batch(vocab: int) -> PackedBatch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (len(ROWS), SEQ_LEN), generator=generator)
    labels = ids.clone()
    positions = torch.zeros_like(ids)
    kinds = torch.zeros_like(ids)
    cu = [0]
    for r, docs in enumerate(ROWS):
        start = 0
        for length in (*docs, SEQ_LEN - sum(docs)):   # the documents, then the padding run
            positions[r, start:start + length] = torch.arange(length)
            labels[r, start] = IGNORE_INDEX
            start += length
            cu.append(r * SEQ_LEN + start)
        labels[r, sum(docs):] = IGNORE_INDEX
        kinds[r, sum(docs):] = -1
    weights = torch.rand(ids.shape, generator=generator) * (labels != IGNORE_INDEX)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    return PackedBatch(input_ids=ids, labels=labels, position_ids=positions,
                       cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(lengths),
                       kind_ids=kinds, domain_ids=kinds.clone(), loss_weights=weights,
                       num_real_tokens=sum(map(sum, ROWS)))


def run(model, batch: PackedBatch, context=None) -> dict:
    model.zero_grad(set_to_none=True)
    kwargs = dict(position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                  max_seqlen=batch.max_seqlen, context=context)
    out = model(batch.input_ids, labels=batch.labels, loss_weights=batch.loss_weights,
                reduction="sum", return_token_losses=True, **kwargs)
    out.loss.backward()
    logits = model(batch.input_ids, **kwargs).logits.detach()
    return {"loss": out.loss.detach(), "token_losses": out.token_losses.detach(),
            "logits": logits, **{f"grad {n}": p.grad.detach().clone()
                                 for n, p in model.named_parameters()}}


def main(out_dir: str, tag: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    config = tiny_hf_config("llama3")   # GQA: 4 query heads over 2 key/value heads
    model = from_config(config, dtype=torch.float32, seed=3)
    batch = packed_batch(model.args.vocab_size)
    reference = run(model, batch)
    shard = shard_batch(batch, cp, rank, dist.group.WORLD)
    split = run(model, batch, shard)
    for value in split.values():
        dist.all_reduce(value)
    counted = torch.tensor(float((shard.own(batch.labels) != IGNORE_INDEX).sum()))
    dist.all_reduce(counted)
    diff = {name: float((split[name] - reference[name]).abs().max()) for name in reference}
    result = {name: diff[name] for name in ("loss", "token_losses", "logits")}
    result["grads"] = max(v for k, v in diff.items() if k.startswith("grad "))
    result["grad_scale"] = max(float(v.abs().max()) for k, v in reference.items()
                               if k.startswith("grad "))
    result["counted"] = [int(counted), int((batch.labels != IGNORE_INDEX).sum())]
    result["kv_heads"] = [model.args.num_attention_heads, model.args.num_key_value_heads]
    with open(os.path.join(out_dir, f"{tag}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
