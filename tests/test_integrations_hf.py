"""rega-engine inside Hugging Face transformers: the patched model against the unpatched one, the
padding-free collator, the PackedLoader adapter and a few HF Trainer steps (CPU, fp32)."""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from tiny_models import make_hf_model

from rega_engine.batch import IGNORE_INDEX
from rega_engine.integrations.hf import (
    ATTENTION_NAME,
    PackedHFDataset,
    PaddingFreeCollator,
    apply_rega_kernels,
    packed_batches_for_hf,
)

ATOL = 2e-5
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers.Trainer needs accelerate>=1.1")


def _reference(family: str, seed: int = 0):
    # use_cache=False: with a cache transformers skips the packed-sequence mask and would let the
    # unpatched reference attend across documents of a flattened row.
    model = make_hf_model(family, seed=seed, use_cache=False)
    model.set_attn_implementation("sdpa")
    return model


def _docs(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=generator) for n in lengths]


def _features(docs, prompt=3):
    # SFT-like: the first `prompt` tokens of each sample are the prompt (no loss).
    features = []
    for d in docs:
        labels = d.clone()
        labels[:prompt] = IGNORE_INDEX
        features.append({"input_ids": d.tolist(), "labels": labels.tolist()})
    return features


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_patched_loss_and_gradients_equal_unpatched(family):
    reference = _reference(family)
    patched = apply_rega_kernels(copy.deepcopy(reference))
    batch = PaddingFreeCollator()(_features(_docs([9, 23, 14, 5])))
    ref_out, ref_grads = _loss_and_grads(reference, batch)
    out, grads = _loss_and_grads(patched, batch)
    assert out.logits is None            # the fused loss never built the logits
    torch.testing.assert_close(out.loss, ref_out.loss, atol=ATOL, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


def test_loss_honours_num_items_in_batch():
    reference = _reference("llama2")
    patched = apply_rega_kernels(copy.deepcopy(reference))
    batch = PaddingFreeCollator()(_features(_docs([12, 30])))
    # As the Trainer does under gradient accumulation: the sum over this micro-batch divided by
    # the target count of the whole step (here a made-up 100).
    ref = reference.train()(**batch, num_items_in_batch=torch.tensor(100)).loss
    ours = patched.train()(**batch, num_items_in_batch=torch.tensor(100)).loss
    mean = patched(**batch).loss
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours, mean * targets / 100, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids"])
def test_flattened_documents_get_their_solo_logits(boundaries):
    reference = _reference("llama3").eval()
    patched = apply_rega_kernels(copy.deepcopy(reference)).eval()
    docs = _docs([17, 6, 29])
    batch = PaddingFreeCollator()([{"input_ids": d} for d in docs])
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if boundaries == "cu_seq_lens":
        kwargs.update({k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                             "max_length_k")})
    with torch.no_grad():
        logits = patched(**kwargs).logits[0]
        start = 0
        for d in docs:
            solo = reference(input_ids=d[None]).logits[0]
            torch.testing.assert_close(logits[start:start + len(d)], solo, atol=ATOL, rtol=1e-5)
            start += len(d)


def test_padded_batches_and_generation_still_work():
    reference = _reference("llama2").eval()
    patched = apply_rega_kernels(copy.deepcopy(reference)).eval()
    short, full = _docs([7, 12], seed=3)
    input_ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    input_ids[0, :7], mask[0, :7] = short, 1        # right padding
    input_ids[1, 5:], mask[1, 5:] = short, 1        # left padding
    input_ids[2], mask[2] = full, 1
    with torch.no_grad():
        ours = patched(input_ids=input_ids, attention_mask=mask).logits
        solo_short = reference(input_ids=short[None]).logits[0]
        solo_full = reference(input_ids=full[None]).logits[0]
    torch.testing.assert_close(ours[0, :7], solo_short, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours[2], solo_full, atol=ATOL, rtol=1e-5)
    # The left-padded row sees positions 0..4 as padding; its real tokens have positions 5..11.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        left = patched(input_ids=input_ids[1:2], attention_mask=mask[1:2],
                       position_ids=positions[1:2]).logits
    torch.testing.assert_close(left[0, 5:], solo_short, atol=ATOL, rtol=1e-5)
    # Decoding with a KV cache takes the cached path: greedy continuations agree.
    reference.config.use_cache = patched.config.use_cache = True
    prompt = full[None, :6]
    want = reference.generate(prompt, max_new_tokens=6, do_sample=False)
    got = patched.generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()


def test_patch_under_the_triton_interpreter():
    # The Triton kernels (interpreted on CPU) behind the HF hooks, not only the references.
    reference = _reference("llama2")
    patched = apply_rega_kernels(copy.deepcopy(reference), backend="triton")
    batch = PaddingFreeCollator()(_features(_docs([10, 6])))
    ref_out, ref_grads = _loss_and_grads(reference, batch)
    out, grads = _loss_and_grads(patched, batch)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-4, rtol=1e-4)
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight"):
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_mixed_precision_autocast_with_fp32_weights():
    # The Trainer's bf16=True: fp32 weights under autocast, where the rotary embedding leaves q/k
    # in fp32 but v in bf16, and the LM head weight is fp32 while the hidden states are not.
    reference = _reference("llama2")
    patched = apply_rega_kernels(copy.deepcopy(reference))
    batch = PaddingFreeCollator()(_features(_docs([21, 13])))
    losses = []
    for model in (reference, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.train()(**batch).loss
        loss.backward()
        assert loss.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=0.03, rtol=0.01)


def test_apply_is_idempotent_and_switchable():
    model = _reference("llama2")
    assert apply_rega_kernels(model, cross_entropy=False) is model
    assert model.config._attn_implementation == ATTENTION_NAME
    assert not hasattr(model, "_rega_original_forward")
    apply_rega_kernels(model)
    forward = model.forward
    original = model._rega_original_forward
    apply_rega_kernels(model)
    assert model.forward == forward and model._rega_original_forward == original
    # Eval mode keeps the original forward: logits and HF's own loss.
    batch = PaddingFreeCollator()(_features(_docs([8, 8])))
    with torch.no_grad():
        out = model.eval()(**batch)
    assert out.logits.shape == (1, 16, 256) and torch.isfinite(out.loss)


def test_unsupported_models_and_settings_get_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=32))
    with pytest.raises(TypeError, match="model_type='gpt2'"):
        apply_rega_kernels(gpt2)
    with pytest.raises(ValueError, match="backend"):
        apply_rega_kernels(_reference("llama2"), backend="cuda")
    # Mistral's tiny config has a 64-token sliding window that varlen attention does not apply.
    mistral = apply_rega_kernels(_reference("mistral"))
    with pytest.raises(ValueError, match="sliding window of 64"):
        mistral(**PaddingFreeCollator()([{"input_ids": _docs([70])[0]}]))


def test_collator_layout_and_errors():
    collate = PaddingFreeCollator(pad_to_multiple_of=8)
    batch = collate([
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": np.array([9, 10, 11]), "assistant_masks": [0, 1, 1]},
        {"input_ids": torch.tensor([12, 13])},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 10, 11, -100, 13] + [-100] * 7]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 9, 16] == batch["cu_seq_lens_k"].tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    with pytest.raises(ValueError, match="feature 1: `labels` has 2 entries but `input_ids` has 3"):
        collate([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(KeyError, match="feature 0 has no `input_ids`"):
        collate([{"text": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        collate([{"input_ids": []}])


def _hf_trainer(model, dataset, collator, **extra):
    from transformers import Trainer, TrainingArguments
    settings = dict(output_dir="unused", report_to="none", save_strategy="no", max_steps=4,
                    per_device_train_batch_size=4, learning_rate=2e-3, lr_scheduler_type="constant",
                    logging_steps=1, seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0,
                    disable_tqdm=True, remove_unused_columns=False)
    args = TrainingArguments(**{**settings, **extra})
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


@needs_accelerate
def test_trainer_with_collator_trains_like_the_unpatched_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(7)
    dataset = []
    for n in torch.randint(6, 40, (16,), generator=generator).tolist():
        ids = torch.randint(4, 256, (n,), generator=generator)
        mask = (torch.arange(n) >= n // 3).long()     # assistant tokens after a prompt
        dataset.append({"input_ids": ids.tolist(), "assistant_masks": mask.tolist()})
    histories, weights = [], []
    for patch in (False, True):
        model = _reference("llama2")
        if patch:
            apply_rega_kernels(model)
        trainer = _hf_trainer(model, dataset, PaddingFreeCollator(), gradient_accumulation_steps=2)
        trainer.train()
        histories.append([r["loss"] for r in trainer.state.log_history if "loss" in r])
        weights.append(model.lm_head.weight.detach().clone())
    assert len(histories[0]) == 4
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-4)
    torch.testing.assert_close(weights[1], weights[0], atol=1e-5, rtol=1e-4)
    assert histories[1][-1] < histories[1][0]       # it learns


@needs_accelerate
def test_packed_loader_batches_feed_model_and_trainer(tmp_path, monkeypatch):
    from rega_engine.data import PackedLoader, TokenDatasetWriter
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    with TokenDatasetWriter(tmp_path / "data", domains=["general"], kind_weights={}, pad_id=0,
                            vocab_size=256, seq_len=48) as writer:
        for n in rng.integers(5, 40, size=24):
            mask = np.arange(n) >= n // 4
            writer.add(rng.integers(4, 256, size=n), mask, kind=0, domain=0)
    loader = PackedLoader(tmp_path / "data", batch_size=2, shuffle=False, prefetch=0)
    reference = _reference("llama2")
    patched = apply_rega_kernels(copy.deepcopy(reference))
    kwargs = next(packed_batches_for_hf(loader))
    assert kwargs["input_ids"].shape == (1, 96) and kwargs["cu_seq_lens_q"][-1] == 96
    ref_out, ref_grads = _loss_and_grads(reference, kwargs)
    out, grads = _loss_and_grads(patched, kwargs)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(grads["lm_head.weight"], ref_grads["lm_head.weight"], atol=ATOL,
                               rtol=1e-4)

    trainer = _hf_trainer(patched, PackedHFDataset(loader), PackedHFDataset.collate,
                          per_device_train_batch_size=1, max_steps=3,
                          accelerator_config={"dispatch_batches": False})
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        PackedHFDataset.collate([kwargs, kwargs])


@needs_accelerate
def test_trl_sft_trainer_with_the_collator(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tiny_tokenizer import tiny_tokenizer
    monkeypatch.chdir(tmp_path)
    model = apply_rega_kernels(_reference("llama2"))
    rows = [{"input_ids": d.tolist(), "completion_mask": [0, 0, 0] + [1] * (len(d) - 3)}
            for d in _docs([12, 20, 9, 15, 30, 8], seed=5)]
    config = trl.SFTConfig(output_dir="unused", report_to="none", save_strategy="no", max_steps=2,
                           per_device_train_batch_size=3, use_cpu=True, remove_unused_columns=False,
                           dataset_kwargs={"skip_prepare_dataset": True}, logging_steps=1,
                           disable_tqdm=True)
    seen = []
    collator = PaddingFreeCollator()

    def collate(features):
        batch = collator(features)
        seen.append(batch)
        return batch
    trainer = trl.SFTTrainer(model=model, args=config,
                             train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tiny_tokenizer(), data_collator=collate)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # The completion mask reached the collator: prompt tokens carry no loss.
    assert seen and all(int((b["labels"] != IGNORE_INDEX).sum()) == sum(
        n - 3 for n in (b["cu_seq_lens_q"][1:] - b["cu_seq_lens_q"][:-1]).tolist()) for b in seen)


def test_collator_honours_trl_packed_seq_lengths():
    # TRL's pack_dataset (padding_free) writes several documents into one example and their
    # lengths into `seq_lengths`: each inner document must be a document of its own.
    collate = PaddingFreeCollator()
    batch = collate([
        {"input_ids": [5, 6, 7, 8, 9, 10, 11], "seq_lengths": [4, 3]},
        {"input_ids": [12, 13, 14], "completion_mask": [0, 1, 1], "seq_lengths": [1, 2]},
        {"input_ids": [15, 16]},
    ])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, -100, 10, 11, -100, -100, 14, -100, 16]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 8, 10, 12]
    assert batch["max_length_q"] == 4
    # The packed example trains exactly like its documents given as separate samples.
    docs = _docs([9, 6, 14])
    packed = collate([{"input_ids": torch.cat(docs).tolist(), "seq_lengths": [9, 6, 14]}])
    separate = collate([{"input_ids": d.tolist()} for d in docs])
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"):
        assert packed[key].tolist() == separate[key].tolist(), key
    model = apply_rega_kernels(_reference("llama3"), backend="torch").train()
    torch.testing.assert_close(model(**packed).loss, _reference("llama3").train()(**separate).loss,
                               atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError,
                       match=r"feature 1: `seq_lengths` \[2, 2\] sum to 4 but `input_ids` has 3"):
        collate([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3], "seq_lengths": [2, 2]}])
    with pytest.raises(ValueError, match="feature 0: `seq_lengths` must be positive"):
        collate([{"input_ids": [1, 2], "seq_lengths": [2, 0]}])
