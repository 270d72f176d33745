"""`rega-engine convert --gguf` (issue 26, part 1): a tiny Llama written to GGUF by the gguf
package (tests/tiny_gguf.py: llama.cpp's names and row order, a byte-level BPE tokenizer with a
chat template) becomes a Hugging Face folder that rega-engine and transformers load with the
original's logits, in fp32 and from Q8_0-quantized weights; bad input is one line."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("gguf")
sys.path.insert(0, os.path.dirname(__file__))
from tiny_gguf import CHAT_TEMPLATE, vocabulary, write_tiny_llama_gguf  # noqa: E402
from tiny_models import tiny_hf_config  # noqa: E402

from rega_engine.cli import main  # noqa: E402
from rega_engine.model import from_config, from_pretrained  # noqa: E402
from rega_engine.model.hf_io import load_transformers_model  # noqa: E402

PROBE = torch.arange(3, 60).unsqueeze(0)
# Our reference backend against transformers' eager layers, both fp32 on the CPU.
TRANSFORMERS_ATOL = 1e-4


@pytest.fixture(scope="module")
def original():
    config = tiny_hf_config("llama2", vocab_size=len(vocabulary()))
    return config, from_config(config, dtype=torch.float32, device="cpu", seed=0).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "q8_0"])
def test_a_gguf_converts_to_a_folder_both_libraries_load_with_its_logits(tmp_path, original,
                                                                          quantize, capsys):
    config, model = original
    held = write_tiny_llama_gguf(tmp_path / "tiny.gguf", model.state_dict(), config,
                                 quantize=quantize)
    out = tmp_path / "hf"
    assert main(["convert", "--gguf", str(tmp_path / "tiny.gguf"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "max |difference| 0.00e+00" in err
    assert "de-quantizing" not in err   # transformers' own bar is kept quiet: one line is ours
    # The weights are the file's, dequantized, in transformers' names and row order.
    written = load_file(out / "model.safetensors")
    assert written.keys() == held.keys()
    for name, tensor in held.items():
        assert torch.equal(written[name], tensor), name
    converted = from_pretrained(out, dtype=torch.float32, device="cpu").eval()
    if not quantize:   # lossless: the very model that was written
        assert torch.equal(_logits(converted), _logits(model))
    theirs = load_transformers_model(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(theirs), _logits(converted), atol=TRANSFORMERS_ATOL, rtol=0)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world").input_ids
    assert tokenizer.decode(ids) == "hello world" and len(ids) < len("hello world")   # merges
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # The special tokens the file names by id (bos 1, eos 2), whatever transformers' GGUF reader
    # made of them.
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_bf16_and_bad_input(tmp_path, original, capsys, monkeypatch):
    config, model = original
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", model.state_dict(), config)
    out = tmp_path / "hf"
    assert main(["convert", "--gguf", str(tmp_path / "tiny.gguf"), "--out", str(out),
                 "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    capsys.readouterr()
    # --out is not replaced unless asked to.
    assert main(["convert", "--gguf", str(tmp_path / "tiny.gguf"), "--out", str(out)]) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    # A file that is not a GGUF, and one that is not there: one line naming it.
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    assert main(["convert", "--gguf", str(tmp_path / "bad.gguf"), "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rega-engine convert: --gguf {tmp_path / 'bad.gguf'}") and \
        err.count("\n") == 1, err
    assert main(["convert", "--gguf", str(tmp_path / "none.gguf"), "--out", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    # Without the optional gguf package: what to install.
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["convert", "--gguf", str(tmp_path / "tiny.gguf"), "--out",
                 str(tmp_path / "y")]) == 2
    assert "pip install 'rega-engine[gguf]'" in capsys.readouterr().err
