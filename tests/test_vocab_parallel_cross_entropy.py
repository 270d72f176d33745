"""vocab_parallel_linear_cross_entropy over a gloo group of 2 and 3 CPU processes.

The vocabulary (257 ids) is split unevenly: 129 + 128 rows over 2 ranks, 90 + 7 + 160 over 3.
Each child builds the same inputs from a seed, takes its rows of the LM head and runs every case
with both backends (Triton in the interpreter, fp32: the interpreter's bf16 is not trustworthy);
it saves its results to a file and the parent compares them with the single-device reference
(`linear_cross_entropy_reference`, plain autograd on the full logits) and, for the cases it
covers, torch.nn.functional.cross_entropy. chunk_size 16 over 24 tokens runs 2 chunks, the second
partial. One spawn per world size keeps the file at a few seconds of process start-up each.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

VOCAB, HIDDEN, TOKENS, IGNORE, CHUNK = 257, 16, 24, -100, 16
SHARDS = {2: [129, 128], 3: [90, 7, 160]}
# Shards above 1024 rows run the Triton kernels' unmasked full blocks before the masked tail
# (the small vocabulary's shards fit one masked block); checked on 2 ranks, all options, Triton.
BIG_VOCAB, BIG_SHARDS = 2500, [1300, 1200]
BACKENDS = ("torch", "triton")
# (options, whether token weights and ignored tokens are used)
CASES = {
    "plain": (dict(reduction="mean"), False),
    "weights_ignore_sum": (dict(reduction="sum"), True),
    "weights_ignore_mean": (dict(reduction="mean"), True),
    "smoothing": (dict(reduction="mean", label_smoothing=0.1), True),
    "z_loss": (dict(reduction="mean", z_loss=1e-4), False),
    "softcap": (dict(reduction="sum", softcap=30.0), False),
    "softcap_none": (dict(reduction="none", softcap=30.0), True),
    "everything_none": (dict(reduction="none", softcap=30.0, z_loss=1e-4,
                             label_smoothing=0.1), True),
    "everything_mean": (dict(reduction="mean", softcap=30.0, z_loss=1e-4,
                             label_smoothing=0.1), True),
}
# The interpreter takes about a second a case (mostly per launch): Triton runs the cases that
# between them cover every option, every reduction and the "none" backward's recompute; the
# torch backend runs all.
TRITON_CASES = ("weights_ignore_sum", "everything_none", "everything_mean")
RUNS = [("torch", name) for name in CASES] + [("triton", name) for name in TRITON_CASES]
# fp32 on both sides; only the summation order differs (measured differences are ~1e-6)
TOL = dict(rtol=2e-5, atol=2e-5)


def make_inputs(vocab=VOCAB):
    """hidden, full weight, labels (some ignored), token weights, upstream gradient for "none".
    Logits have a spread of about 10, so the softcap at 30 and the z-loss both change the
    result visibly."""
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    weight = torch.randn(vocab, HIDDEN, generator=gen) * 10 / math.sqrt(HIDDEN)
    labels = torch.randint(0, vocab, (TOKENS,), generator=gen)
    labels[:3] = torch.tensor([0, vocab - 1, 129])   # the edges of the vocabulary and a shard
    ignored = labels.clone()
    ignored[5::4] = IGNORE
    token_weights = torch.rand(TOKENS, generator=gen) * 2
    upstream = torch.randn(TOKENS, generator=gen)
    return hidden, weight, labels, ignored, token_weights, upstream


def _bounds(world, rank, shards=None):
    shards = shards or SHARDS[world]
    start = sum(shards[:rank])
    return start, start + shards[rank]


def _error_of(fn):
    try:
        fn()
    except ValueError as error:
        return str(error)
    return "no error"


def _worker(rank, world, store_path, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"   # before the kernels (and so triton) are imported
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    from rega_engine.kernels.vocab_parallel_cross_entropy import (
        vocab_parallel_linear_cross_entropy as vp,
    )

    hidden0, weight, labels, ignored, token_weights, upstream = make_inputs()
    start, stop = _bounds(world, rank)
    shard0 = weight[start:stop].clone()
    results = {}
    for backend, name in RUNS:
        options, weighted = CASES[name]
        hidden = hidden0.clone().requires_grad_()
        shard = shard0.clone().requires_grad_()
        loss, token_losses = vp(
            hidden, shard, ignored if weighted else labels, vocab_start=start, vocab_size=VOCAB,
            group=None, ignore_index=IGNORE, token_weights=token_weights if weighted else None,
            backend=backend, chunk_size=CHUNK, return_token_losses=True, **options)
        loss.backward(upstream if options["reduction"] == "none" else None)
        results[backend, name] = dict(loss=loss.detach(), token_losses=token_losses,
                                       grad_hidden=hidden.grad, grad_weight=shard.grad)
    if world == 2:
        hidden0_big, weight_big, _, ignored_big, weights_big, upstream_big = make_inputs(BIG_VOCAB)
        big_start, big_stop = _bounds(world, rank, BIG_SHARDS)
        hidden = hidden0_big.clone().requires_grad_()
        shard = weight_big[big_start:big_stop].clone().requires_grad_()
        loss, token_losses = vp(
            hidden, shard, ignored_big, vocab_start=big_start, vocab_size=BIG_VOCAB, group=None,
            ignore_index=IGNORE, token_weights=weights_big, backend="triton", chunk_size=CHUNK,
            return_token_losses=True, **CASES["everything_none"][0])
        loss.backward(upstream_big)
        results["triton", "big_vocab"] = dict(loss=loss.detach(), token_losses=token_losses,
                                              grad_hidden=hidden.grad, grad_weight=shard.grad)
        size = stop - start
        call = dict(vocab_start=start, vocab_size=VOCAB, group=None, backend="torch")
        results["errors"] = {
            "label": _error_of(lambda: vp(hidden0, shard0, labels.clone().fill_(VOCAB), **call)),
            "rows": _error_of(lambda: vp(hidden0, shard0, labels, vocab_start=VOCAB - size + 1,
                                         vocab_size=VOCAB, group=None)),
            "dtype": _error_of(lambda: vp(hidden0.double(), shard0, labels, **call)),
            "shape": _error_of(lambda: vp(hidden0, shard0[:, :-1], labels, **call)),
            "labels_shape": _error_of(lambda: vp(hidden0, shard0, labels[:-1], **call)),
            "overlap": _error_of(lambda: vp(hidden0, shard0, labels, vocab_start=0,
                                            vocab_size=VOCAB, group=None)),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def _reference(name, vocab=VOCAB):
    """(loss, token_losses, grad_hidden, grad_weight) on the full weight, single device."""
    from rega_engine.kernels.cross_entropy import linear_cross_entropy_reference

    hidden, weight, labels, ignored, token_weights, upstream = make_inputs(vocab)
    options, weighted = CASES[name]
    hidden.requires_grad_()
    weight.requires_grad_()
    loss, token_losses = linear_cross_entropy_reference(
        hidden, weight, ignored if weighted else labels, ignore_index=IGNORE,
        token_weights=token_weights if weighted else None, return_token_losses=True, **options)
    grad = upstream if options["reduction"] == "none" else torch.ones_like(loss)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight), grad)
    return loss.detach(), token_losses.detach(), grad_hidden, grad_weight


def _check_against_torch_cross_entropy(results):
    """The plain and label-smoothed cases against F.cross_entropy on the full logits."""
    import torch.nn.functional as F

    hidden, weight, labels, ignored, token_weights, _ = make_inputs()
    logits = hidden @ weight.t()
    want = F.cross_entropy(logits, labels)
    # the smoothing case weighs its tokens: a weighted mean over the non-ignored ones
    smoothed = F.cross_entropy(logits, ignored, ignore_index=IGNORE, label_smoothing=0.1,
                               reduction="none")
    want_smooth = (token_weights * smoothed).sum() / token_weights[ignored != IGNORE].sum()
    torch.testing.assert_close(results["torch", "plain"]["loss"], want, **TOL)
    torch.testing.assert_close(results["torch", "smoothing"]["loss"], want_smooth, **TOL)
    torch.testing.assert_close(results["torch", "plain"]["token_losses"],
                               F.cross_entropy(logits, labels, reduction="none"), **TOL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_vocabulary_matches_the_full_logits(tmp_path, world):
    per_rank = _run(world, tmp_path)
    _check_against_torch_cross_entropy(per_rank[0])
    for backend, name in RUNS:
        loss, token_losses, grad_hidden, grad_weight = _reference(name)
        for rank, results in enumerate(per_rank):
            start, stop = _bounds(world, rank)
            got = results[backend, name]
            where = f"{name}, {backend}, rank {rank} of {world}"
            torch.testing.assert_close(got["loss"], loss, **TOL, msg=where)
            torch.testing.assert_close(got["token_losses"], token_losses, **TOL, msg=where)
            torch.testing.assert_close(got["grad_hidden"], grad_hidden, **TOL, msg=where)
            torch.testing.assert_close(got["grad_weight"], grad_weight[start:stop], **TOL,
                                       msg=where)
            # every rank combines the same gathered stats in the same order
            assert torch.equal(got["loss"], per_rank[0][backend, name]["loss"]), where
    if world == 2:
        loss, token_losses, grad_hidden, grad_weight = _reference("everything_none", BIG_VOCAB)
        for rank, results in enumerate(per_rank):
            start, stop = _bounds(world, rank, BIG_SHARDS)
            got = results["triton", "big_vocab"]
            torch.testing.assert_close(got["loss"], loss, **TOL)
            torch.testing.assert_close(got["token_losses"], token_losses, **TOL)
            torch.testing.assert_close(got["grad_hidden"], grad_hidden, **TOL)
            torch.testing.assert_close(got["grad_weight"], grad_weight[start:stop], **TOL)
        for results in per_rank:
            errors = results["errors"]
            assert "outside the vocabulary [0, 257)" in errors["label"], errors
            assert "must be a non-empty part of the vocabulary" in errors["rows"], errors
            assert "share one floating dtype" in errors["dtype"], errors
            assert "weight_shard must be the LM head's rows (V, H)" in errors["shape"], errors
            assert "labels must be (N,)" in errors["labels_shape"], errors
            assert "must tile [0, 257)" in errors["overlap"], errors
