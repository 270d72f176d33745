"""A clean run prints only our own lines: no torchao "Failed to load ..._C_*.so" lines (transformers
imports torchao, where installed, with its model code), no torch pytree deprecation warnings from
that import, and no transformers `past_key_values`/`cache_params` deprecation from our patched
forward. In a fresh process, as each of those is printed once per process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json
import sys
import torch
from rega_engine.cli import main

distill, evaluate, model_dir = json.loads(sys.argv[1])
codes = [main(distill), main(evaluate)]
# our patched forward as the HF Trainer runs it: train mode with labels, eval mode with a cache
from transformers import DynamicCache
from rega_engine.generation import load_model
from rega_engine.integrations.hf import apply_rega_kernels

model = apply_rega_kernels(load_model(model_dir, device="cpu"), backend="torch")
ids = torch.tensor([[1, 5, 6, 7]])
model.train()
model(input_ids=ids, labels=ids).loss.backward()
model.eval()
model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
sys.exit(max(codes))
"""


def test_distill_eval_and_the_patched_forward_print_only_our_lines(tmp_path):
    from bigram_model import make_bigram_checkpoint
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tmp_path / "model"
    make_bigram_checkpoint(model, len(tok), {}, {tok.eos_token_id: 1.0},
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(model)
    question = [{"role": "user", "content": "q"}]
    (tmp_path / "instructions.jsonl").write_text(json.dumps({"messages": question}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps(
        {"messages": [*question, {"role": "assistant", "content": "a"}]}) + "\n")
    distill = ["distill", f"--distill.instructions={tmp_path / 'instructions.jsonl'}",
               f"--distill.model={model}", f"--distill.output={tmp_path / 'distilled.jsonl'}"]
    evaluate = ["eval", f"--eval.checkpoint={model}", f"--eval.general={tmp_path / 'eval.jsonl'}",
                f"--eval.output={tmp_path / 'eval.json'}", "--eval.max_new_tokens=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([distill, evaluate,
                                                                      str(model)])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines, "distill and eval say what they did"
    others = [line for line in lines if not line.startswith(("distill", "eval"))]
    assert not others, "\n".join(others)
    assert Path(tmp_path / "eval.json").is_file()
