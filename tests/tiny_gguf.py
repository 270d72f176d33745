"""A tiny Llama written to a GGUF file by the `gguf` package itself, as llama.cpp's converter lays
one out, for tests/test_convert.py: llama metadata, tensors under GGUF names with the query and
key rows reordered the way llama.cpp reorders them, and a byte-level BPE tokenizer (SmolLM2's kind:
`tokenizer.ggml.model = "gpt2"`) with merges, special tokens and a chat template.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
_MERGES = ["h e", "l l", "he ll", "o Ġ", "w o", "r l", "wo rl"]
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    """The 256 characters GPT-2's byte-level BPE spells bytes with, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def vocabulary() -> list[str]:
    """Special tokens, the byte alphabet, then one token per merge: the tiny model's vocab."""
    return [*_SPECIAL, *_byte_alphabet(), *(m.replace(" ", "") for m in _MERGES)]


def _llama_cpp_order(weight: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp stores each head's query / key rows with the two rotary halves interleaved;
    transformers undoes this when it reads a GGUF."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape).numpy())


def write_tiny_llama_gguf(path: Path, state: dict[str, torch.Tensor], config: dict, *,
                          quantize: bool = False) -> dict[str, torch.Tensor]:
    """Writes `state` (a Llama state dict in transformers' names, fp32) of `config` (its
    config.json; vocab_size must be len(vocabulary())) to the GGUF file `path`; quantize: the
    matrices in Q8_0 (blocks of 32 int8 values with an fp16 scale), as a quantized model ships.
    Returns the weights the file holds, dequantized, in transformers' names and row order."""
    import gguf
    from gguf import quants

    tokens = vocabulary()
    assert config["vocab_size"] == len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(_SPECIAL)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(_SPECIAL)))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config["num_hidden_layers"]):
        for ours, theirs in per_block.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    held = {}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, tensor in state.items():
        tensor = tensor.detach().float()
        if quantize and tensor.dim() == 2:   # blocks run along rows: reordering rows commutes
            tensor = torch.from_numpy(quants.dequantize(quants.quantize(tensor.numpy(), q8), q8))
        held[name] = tensor
        if ".q_proj." in name:
            array = _llama_cpp_order(tensor, config["num_attention_heads"])
        elif ".k_proj." in name:
            array = _llama_cpp_order(tensor, config["num_key_value_heads"])
        else:
            array = tensor.numpy()
        array = np.ascontiguousarray(array)
        if quantize and array.ndim == 2:
            writer.add_tensor(names[name], quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
