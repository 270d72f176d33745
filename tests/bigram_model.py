"""A tiny Llama checkpoint that is exactly a bigram model, for tests that must predict what a
model generates and how likely it finds an answer.

Every decoder block's output projections (attention o_proj, MLP down_proj) are zero, so the
residual stream at a position is the embedding of that position's token alone. Each token named
in the table gets its own embedding axis (the rest share axis 0); after the final RMSNorm a unit
axis becomes sqrt(hidden) times itself, so column k of the LM head, scaled by 1/sqrt(hidden), is
the vector of next-token logits after the tokens on axis k. Logits are log-probabilities, so
P(next | previous) is what the table says (unlisted tokens get e^-30, negligible).
"""
from __future__ import annotations

import math

import torch

UNLISTED_LOGIT = -30.0


def make_bigram_checkpoint(path, vocab_size: int, table: dict, default: dict, *,
                           eos_token_id: int = 2,
                           pad_token_id: int = 3) -> str:
    """table: previous token -> {next token: probability}; default: the same for every other
    previous token. Saves a transformers LlamaForCausalLM (safetensors) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 64
    if len(table) + 1 > hidden:
        raise ValueError("at most 63 listed tokens")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config)
    axes = {token: k + 1 for k, token in enumerate(table)}
    scale = math.sqrt(hidden)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = torch.zeros(vocab_size, hidden)
        embed[:, 0] = 1.0
        for token, k in axes.items():
            embed[token] = 0.0
            embed[token, k] = 1.0
        model.model.embed_tokens.weight.copy_(embed)
        head = torch.full((vocab_size, hidden), UNLISTED_LOGIT / scale)
        for k, probs in [(0, default), *((axes[t], p) for t, p in table.items())]:
            for token, p in probs.items():
                head[token, k] = math.log(p) / scale
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    return str(path)
