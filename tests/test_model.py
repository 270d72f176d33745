"""The Llama-family model against transformers' own implementation, on packed batches (CPU path:
the PyTorch references of varlen_attention and fused_linear_cross_entropy)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, make_tiny_checkpoint, tiny_hf_config

from rega_engine.batch import IGNORE_INDEX
from rega_engine.model import ConfigError, ModelArgs, from_config, from_pretrained

ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, tied) -> checkpoint directory saved by transformers, made on first use."""
    made = {}

    def get(family, tied=False):
        if (family, tied) not in made:
            path = tmp_path_factory.mktemp(f"{family}_{'tied' if tied else 'untied'}")
            made[family, tied] = make_tiny_checkpoint(path, family, seed=len(made),
                                                      tie_word_embeddings=tied)
        return made[family, tied]
    return get


def _hf_model(path):
    from rega_engine.model.hf_io import load_transformers_model
    return load_transformers_model(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_loss_match_transformers(checkpoints, family, tied):
    path = checkpoints(family, tied)
    hf, ours = _hf_model(path), from_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    # 60 tokens run past original_max_position_embeddings=64 only for llama3's long wavelengths'
    # effect; positions reach 59, enough for every rope branch to change the result.
    input_ids = torch.randint(0, 256, (2, 60), generator=generator)
    labels = input_ids.clone()
    labels[0, :10] = IGNORE_INDEX          # a prompt
    labels[1, 45:] = IGNORE_INDEX          # trailing padding
    with torch.no_grad():
        ref = hf(input_ids, labels=labels)
        logits = ours(input_ids).logits
        loss = ours(input_ids, labels=labels).loss
    assert logits.shape == (2, 60, 256)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(loss, ref.loss, atol=ATOL, rtol=1e-5)


def _packed_row(docs, pad):
    """One batch.py row: documents back to back, then a padding run (its own segment)."""
    ids = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])
    labels = torch.cat([torch.cat([torch.tensor([IGNORE_INDEX]), d[1:]]) for d in docs]
                       + [torch.full((pad,), IGNORE_INDEX)])
    positions = torch.cat([torch.arange(len(d)) for d in docs] + [torch.arange(pad)])
    lengths = [len(d) for d in docs] + [pad]
    return ids, labels, positions, lengths


def test_packed_documents_get_the_logits_and_losses_they_get_alone(checkpoints):
    model = from_pretrained(checkpoints("llama3"))
    generator = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 256, (n,), generator=generator) for n in (7, 13, 20, 25, 11)]
    row0 = _packed_row(docs[:3], pad=8)          # 40 + 8
    row1 = _packed_row(docs[3:], pad=12)         # 36 + 12
    input_ids = torch.stack([row0[0], row1[0]])
    labels = torch.stack([row0[1], row1[1]])
    position_ids = torch.stack([row0[2], row1[2]])
    cu = torch.tensor([0] + list(torch.tensor(row0[3] + row1[3]).cumsum(0)), dtype=torch.int32)
    kwargs = dict(position_ids=position_ids, cu_seqlens=cu, max_seqlen=25)
    with torch.no_grad():
        packed = model(input_ids, **kwargs).logits.reshape(-1, 256)
        out = model(input_ids, labels=labels, return_token_losses=True, **kwargs)
        derived = model(input_ids, cu_seqlens=cu, max_seqlen=25).logits.reshape(-1, 256)
        alone = [model(d[None]).logits[0] for d in docs]
        alone_losses = [model(d[None], labels=d[None], reduction="sum").loss for d in docs]
    starts = [0, 7, 20, 48, 73]
    for doc, start, logits in zip(docs, starts, alone):
        torch.testing.assert_close(packed[start:start + len(doc)], logits, atol=ATOL, rtol=1e-5)
    # position ids derived from cu_seqlens on the device equal the explicit restarts
    torch.testing.assert_close(derived, packed, atol=0, rtol=0)
    # the loss is the mean over every document's predicted tokens, nothing from padding
    n_predicted = sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(out.loss, torch.stack(alone_losses).sum() / n_predicted,
                               atol=ATOL, rtol=1e-5)
    token_losses = out.token_losses.reshape(-1)
    assert torch.all(token_losses[labels.reshape(-1) == IGNORE_INDEX] == 0)
    torch.testing.assert_close(token_losses.sum(), torch.stack(alone_losses).sum(), atol=1e-4,
                               rtol=1e-5)


def test_loss_weights_reduction_and_token_losses_follow_the_label_alignment(checkpoints):
    model = from_pretrained(checkpoints("qwen2"))
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 256, (2, 16), generator=generator)
    labels = input_ids.clone()
    labels[:, 0] = IGNORE_INDEX
    labels[1, 3:6] = IGNORE_INDEX
    weights = torch.rand(2, 16, generator=generator) + 0.5
    weights[labels == IGNORE_INDEX] = 0
    with torch.no_grad():
        logits = model(input_ids).logits
        mean = model(input_ids, labels=labels, loss_weights=weights, return_token_losses=True)
        total = model(input_ids, labels=labels, loss_weights=weights, reduction="sum").loss
        per_token = model(input_ids, labels=labels, loss_weights=weights, reduction="none").loss
    # by hand: position t - 1 predicts labels[t]
    expected = torch.zeros(2, 16)
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    valid = labels[:, 1:] != IGNORE_INDEX
    nll = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    expected[:, 1:] = torch.where(valid, nll, torch.zeros_like(nll))
    torch.testing.assert_close(mean.token_losses, expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(total, (expected * weights).sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(mean.loss, (expected * weights).sum() / weights.sum(), atol=ATOL,
                               rtol=1e-5)
    torch.testing.assert_close(per_token, expected * weights, atol=ATOL, rtol=1e-5)
    assert mean.logits is None


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("llama3", False)])
def test_gradients_reach_every_parameter(family, tied):
    model = from_config(tiny_hf_config(family, tie_word_embeddings=tied, attention_bias=True),
                        seed=0)
    input_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 10, 24, 40, 48], dtype=torch.int32)
    out = model(input_ids, cu_seqlens=cu, max_seqlen=16, labels=input_ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_random_init_after_meta_construction_is_reproducible():
    config = tiny_hf_config("qwen2", initializer_range=0.05)
    meta = from_config(config, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(seed=7)
    eager = from_config(config, seed=7)
    for (name, a), b in zip(meta.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    params = dict(eager.named_parameters())
    assert torch.all(params["model.norm.weight"] == 1)
    assert torch.all(params["model.layers.0.self_attn.q_proj.bias"] == 0)
    std = params["model.layers.0.mlp.up_proj.weight"].std().item()
    assert 0.045 < std < 0.055


def test_backends_are_settable_on_every_block():
    model = from_config(tiny_hf_config("llama2"), seed=0)
    model.attention_backend = "torch"
    assert {layer.self_attn.backend for layer in model.model.layers} == {"torch"}
    model.attention_backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        model(torch.zeros(1, 4, dtype=torch.long))
    model.attention_backend = "auto"
    model.cross_entropy_backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))


def test_sliding_window_is_enforced_not_ignored():
    model = from_config(tiny_hf_config("mistral", sliding_window=16), seed=0)
    model(torch.zeros(2, 16, dtype=torch.long))   # a document as long as the window is exact
    with pytest.raises(ValueError, match="sliding_window=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    # Qwen2 only slides when use_sliding_window is set
    qwen = ModelArgs.from_hf_config(tiny_hf_config("qwen2", sliding_window=16))
    assert qwen.sliding_window is None
    qwen = ModelArgs.from_hf_config(tiny_hf_config("qwen2", sliding_window=16,
                                                   use_sliding_window=True,
                                                   max_window_layers=1))
    assert qwen.sliding_window == 16


def test_sliding_window_ignores_padding_segments_longer_than_the_window():
    # batch.py: a row's padding run is a segment of its own, so max_seqlen counts it; an
    # all-padding row (the last global batch of an epoch) is a segment of seq_len. Padding
    # trains nothing, so seq_len > window with documents within the window must train.
    model = from_config(tiny_hf_config("mistral", sliding_window=16), seed=0)
    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 16, 24, 28, 48], dtype=torch.int32)   # row 1: 4 tokens, 20 padding
    labels = ids.clone()
    labels[0, 0] = labels[0, 16] = labels[1, 0] = IGNORE_INDEX
    labels[0, 16:] = labels[1, 4:] = IGNORE_INDEX
    loss = model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels).loss
    model.args.sliding_window = None
    torch.testing.assert_close(loss, model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels).loss)
    model.args.sliding_window = 16
    labels[1, 10] = ids[1, 10]   # now the 20-token segment trains: it must fit the window
    with pytest.raises(ValueError, match="a segment of 20 tokens exceeds sliding_window=16"):
        model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels)


@pytest.mark.parametrize("overrides,message", [
    ({"model_type": "gpt2"}, r"'gpt2' is not supported; supported model types: llama, mistral"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"lacks 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads 3"),
    ({"vocab_size": None}, r"missing required key\(s\) \['vocab_size'\]"),
])
def test_unsupported_configs_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf_config(tiny_hf_config("llama3", **overrides))


def test_rope_parameters_of_transformers_5_read_like_rope_scaling():
    old = ModelArgs.from_hf_config(tiny_hf_config("llama3"))
    new_layout = tiny_hf_config("llama3")
    new_layout["rope_parameters"] = {**new_layout.pop("rope_scaling"),
                                     "rope_theta": new_layout.pop("rope_theta")}
    assert ModelArgs.from_hf_config(new_layout).rope == old.rope
    assert old.rope.rope_type == "llama3" and old.rope.theta == 500000.0
    with pytest.raises(ConfigError, match="rope_parameters.rope_type 'dynamic'"):
        ModelArgs.from_hf_config({**new_layout, "rope_parameters": {"rope_type": "dynamic"}})


def test_parameter_and_flop_counts():
    from transformers import AutoConfig, AutoModelForCausalLM
    for tied in (False, True):
        config = tiny_hf_config("llama2", tie_word_embeddings=tied)
        ours = from_config(config, device="meta")
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        assert ours.num_parameters(exclude_embeddings=False) == hf.num_parameters()
        assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(
            exclude_embeddings=True)
        # 6 x (non-embedding parameters + the LM head, which is a matmul even when tied)
        per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128  # q,o; k,v; mlp; norms
        matmul_params = 2 * per_layer + 128 + 256 * 128
        assert ours.flops_per_token() == 6 * matmul_params
    # 6 x layers x heads x head_dim x sum(len^2)
    assert ours.attention_flops([3, 5]) == 6 * 2 * 4 * 32 * (9 + 25)
    assert ours.attention_flops(torch.tensor([3, 5])) == ours.attention_flops([3, 5])
