"""model.compile = true: torch.compile per decoder block (train/parallel.py compile_block) around
the Triton attention, which must stay one opaque call for Dynamo rather than be traced into.

On CPU the kernels run in the Triton interpreter (set before triton is imported); one tiny
forward and backward, compiled against eager, in about 15 s.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from rega_engine.kernels import attention as attn  # noqa: E402
from tiny_models import tiny_hf_config  # noqa: E402

from rega_engine.batch import IGNORE_INDEX  # noqa: E402
from rega_engine.model import from_config  # noqa: E402
from rega_engine.train.parallel import compile_block  # noqa: E402

DEVICE = "cpu" if attn.INTERPRETED else "cuda"


@pytest.mark.skipif(not attn.INTERPRETED and not torch.cuda.is_available(),
                    reason="kernels were compiled (TRITON_INTERPRET unset) but there is no CUDA "
                           "device")
def test_compiled_blocks_match_eager_with_the_triton_attention():
    torch.manual_seed(0)
    eager = from_config(tiny_hf_config("llama2", num_hidden_layers=1), seed=0).to(DEVICE)
    compiled = from_config(tiny_hf_config("llama2", num_hidden_layers=1), seed=0).to(DEVICE)
    for model in (eager, compiled):
        model.attention_backend = "triton"
    for block in compiled.model.layers:
        compile_block(block)
    ids = torch.randint(4, 256, (2, 32), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cu = torch.tensor([0, 10, 32, 50, 64], dtype=torch.int32, device=DEVICE)
    labels = ids.clone()
    labels[0, 0] = labels[0, 10] = labels[1, 0] = labels[1, 18] = IGNORE_INDEX
    losses = []
    for model in (eager, compiled):
        loss = model(ids, cu_seqlens=cu, max_seqlen=22, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
