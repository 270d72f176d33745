"""The patched transformers attention reads a padding-free batch's cu_seq_lens_q from the device
once per batch, not once per layer: each read (its end, its longest segment) is a device-to-host
synchronisation, 16 to 32 of them per forward on a GPU. Counted here on CPU by the checks made."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import flattened_batch, make_hf_model

from rega_engine.integrations import hf


def _counting(monkeypatch) -> list:
    calls = []
    check = hf._checked_cu_seqlens

    def counted(cu_seq_lens_q, num_tokens):
        calls.append(num_tokens)
        return check(cu_seq_lens_q, num_tokens)

    monkeypatch.setattr(hf, "_checked_cu_seqlens", counted)
    return calls


def test_cu_seq_lens_is_checked_once_per_batch_whatever_the_layers(monkeypatch):
    calls = _counting(monkeypatch)
    model = make_hf_model("llama3", use_cache=False, num_hidden_layers=4)
    patched = hf.apply_rega_kernels(copy.deepcopy(model))
    batch = flattened_batch([9, 23, 14])
    patched.train()(**batch).loss.backward()
    assert calls == [batch["input_ids"].numel()]     # four layers, one check
    patched(**flattened_batch([5, 30], seed=1)).loss.backward()
    assert len(calls) == 2                           # a new batch is checked again
    # and the patched model still computes what the unpatched one does
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(patched(**batch).loss, model.train()(**batch).loss,
                               atol=2e-5, rtol=1e-5)


def test_a_cu_seq_lens_that_misses_tokens_is_still_refused():
    model = hf.apply_rega_kernels(make_hf_model("llama2", use_cache=False))
    batch = flattened_batch([9, 23])
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_q"][:-1]   # as a dispatching Trainer slices it
    with pytest.raises(ValueError, match=r"cu_seq_lens_q ends at 9 but the batch holds 32 tokens"):
        model(**batch)
