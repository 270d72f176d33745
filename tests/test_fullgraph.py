"""torch.compile sees through every kernel: a decoder block, and the whole model's forward and
backward (CausalLM with labels -> loss), compile with fullgraph=True into one graph, give the
eager results, and a batch with other document lengths and another document count runs the
same graph (no recompile). Plus torch.library.opcheck of the attention and cross-entropy ops.

The compile tests run AOTAutograd with the eager backend ("aot_eager"): it traces forward and
backward through the fake implementations and the registered autograd exactly as Inductor
would receive them, without spending the suite's minutes on C++ code generation
(benchmarks/bench_train.py --systems rega-fullgraph runs the Inductor build). They use the
"torch" backend, whose ops are the same custom ops; tests/test_compile_block.py compiles a
block around the Triton kernels (interpreter on CPU).

Tolerances: the compiled graph runs the same ops as eager in the same order, so fp32 results
agree to 1e-5 (losses) and 1e-4 relative (gradients).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(__file__))
from rega_engine.kernels import attention as attn
from rega_engine.kernels import cross_entropy as ce
from tiny_models import tiny_hf_config

from rega_engine.batch import IGNORE_INDEX
from rega_engine.model import from_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = attn.INTERPRETED or torch.cuda.is_available()
# Two batches of two rows of 32 tokens: 4 segments, then 6 of other lengths.
SEGMENTS = ([0, 10, 32, 50, 64], [0, 5, 9, 20, 32, 40, 47, 64])


def make_batch(offsets, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 256, (2, 32), generator=generator)
    labels = ids.clone()
    for start in offsets[:-1]:   # each document's first token has no label (batch.py)
        labels.view(-1)[start] = IGNORE_INDEX
    weights = torch.rand(2, 32, generator=generator) + 0.5
    cu = torch.tensor(offsets, dtype=torch.int32)
    return ids.to(DEVICE), cu.to(DEVICE), labels.to(DEVICE), weights.to(DEVICE)


def loss_and_grads(model, batch, module=None):
    """(loss, gradients by parameter name) of one step; `module` owns the parameters when
    `model` is its torch.compile wrapper."""
    module = module if module is not None else model
    ids, cu, labels, weights = batch
    # max_seqlen as the training loop passes it: a Python int that changes with the batch
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    loss = model(ids, cu_seqlens=cu, max_seqlen=max_seqlen, labels=labels,
                 loss_weights=weights).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def tiny_pair(family, layers):
    config = tiny_hf_config(family, num_hidden_layers=layers)
    eager, compiled = (from_config(config, seed=0).to(DEVICE) for _ in range(2))
    for model in (eager, compiled):
        model.kernel_backend = "torch"
    return eager, compiled


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_block_is_one_graph_for_every_document_layout():
    eager, compiled = tiny_pair("llama2", layers=1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.model.layers[0].compile(backend=counter, fullgraph=True)
    for seed, offsets in enumerate(SEGMENTS):
        batch = make_batch(offsets, seed)
        assert_same(loss_and_grads(compiled, batch), loss_and_grads(eager, batch))
    # one frame for both batches: 4 then 7 segments (cu_seqlens of 5 then 8 entries), other
    # lengths; CausalLM.forward marks cu_seqlens dynamic for compiled blocks
    assert counter.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_model_forward_backward_is_one_graph_without_recompiles():
    # llama3: rope scaling; two blocks, the LM head and the loss in the one graph
    eager, compiled = tiny_pair("llama3", layers=2)
    counter = CompileCounterWithBackend("aot_eager")
    model = torch.compile(compiled, backend=counter, fullgraph=True)
    for seed, offsets in enumerate(SEGMENTS):
        batch = make_batch(offsets, seed)
        torch._dynamo.mark_dynamic(batch[1], 0)   # the caller's part: any document count
        assert_same(loss_and_grads(model, batch, compiled), loss_and_grads(eager, batch))
    assert counter.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    # both custom ops are nodes of the one graph, not opaque calls around it
    assert counter.op_count > 0


def test_explain_finds_no_graph_break_in_the_model():
    eager, _ = tiny_pair("llama2", layers=1)
    ids, cu, labels, weights = make_batch(SEGMENTS[0], 0)
    explanation = torch._dynamo.explain(eager)(ids, cu_seqlens=cu, labels=labels,
                                               loss_weights=weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --- opcheck: schema, fake implementation, autograd registration, AOT dispatch ----------------

def _attention_inputs(lengths, tail, heads, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths) + tail
    q = torch.randn(total, heads[0], 32, generator=generator).to(DEVICE).requires_grad_()
    k, v = (torch.randn(total, heads[1], 32, generator=generator).to(DEVICE).requires_grad_()
            for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_varlen_attention(backend):
    if backend == "triton" and not TRITON_HERE:
        pytest.skip("no CUDA device and the kernels were not built for the interpreter")
    # grouped short documents, a long one alone, an empty one, a tail; GQA
    q, k, v, cu = _attention_inputs([3, 0, 5, 9] if backend == "triton" else [3, 0, 5, 140],
                                    tail=2, heads=(4, 2))
    torch.library.opcheck(attn._varlen_attention_op, (q, k, v, cu, 9, True, 0.2, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_fused_linear_cross_entropy(backend, reduction):
    if backend == "triton" and not TRITON_HERE:
        pytest.skip("no CUDA device and the kernels were not built for the interpreter")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(40, 16, generator=generator).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 40, (12,), generator=generator).to(DEVICE)
    labels[::4] = -100
    weights, scale = ce._token_weights_and_scale(labels, None, -100, reduction)
    args = (hidden, weight, labels, weights, scale, -100, reduction, 0.1, 1e-3, 30.0, True, True,
            5, None, backend)
    torch.library.opcheck(ce._fused_op, args)
