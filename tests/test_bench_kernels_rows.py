"""The kernel benchmarks hand over each row the moment it is measured (gpu-check saves it then),
and an implementation that fails with any exception, Triton's compile and out-of-resources
errors included (they are not RuntimeErrors), becomes that row's error while the other rows are
still measured."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _bench_cross_entropy  # noqa: E402
import bench_kernels  # noqa: E402


def test_an_out_of_resources_error_is_its_rows_error(monkeypatch):
    from triton.runtime.errors import OutOfResources

    real = bench_kernels._attention_impls

    def impls(device):
        def rega(*args):
            raise OutOfResources(232448, 227328, "shared memory")
        return {"rega": rega, "sdpa-math": real(device)["sdpa-math"]}

    monkeypatch.setattr(bench_kernels, "_attention_impls", impls)
    seen = []
    rows = bench_kernels.bench_attention(tokens=(64,), doc_lens=(32,), head_dims=(16,),
                                         num_heads=2, num_kv_heads=1, dtype=torch.float32,
                                         warmup=1, reps=1, device="cpu", on_row=seen.append)
    status = {(r["impl"], r["mode"]): r["status"] for r in rows}
    assert status[("rega", "fwd")].startswith("failed: OutOfResources")
    assert status[("rega", "fwd+bwd")].startswith("failed: OutOfResources")
    assert status[("sdpa-math", "fwd")] == status[("sdpa-math", "fwd+bwd")] == "ok"
    assert [r["impl"] for r in seen] == ["rega", "rega", "sdpa-math", "sdpa-math"]


def test_a_cross_entropy_row_that_raises_anything_is_recorded(monkeypatch):
    class CompileFailed(Exception):   # as triton.compiler.errors.CompilationError: no RuntimeError
        pass

    real = _bench_cross_entropy._implementations

    def impls(device, include_compile=True):
        found = real(device, include_compile)

        def broken(hidden, weight, labels):
            raise CompileFailed("at 12:8: dot shape mismatch")
        return {"eager": found["eager"], "rega_fused": broken}

    monkeypatch.setattr(_bench_cross_entropy, "_implementations", impls)
    seen = []
    rows = _bench_cross_entropy.bench_cross_entropy(
        tokens=(16,), hidden_size=8, vocab=32, dtype=torch.float32, warmup=1, reps=1,
        include_compile=False, device="cpu", on_row=seen.append)
    assert [(r["impl"], r["status"][:20]) for r in rows] == [
        ("eager", "ok"), ("rega_fused", "failed: CompileFaile")]
    assert "dot shape mismatch" in rows[1]["status"] and seen == rows


def test_the_report_says_which_weight_gradient_path_the_fused_loss_took(monkeypatch):
    import _gpu_check_kernels
    from rega_engine.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "_FP32_OUT_ADDMM", {})
    path = _gpu_check_kernels.cross_entropy_weight_grad_path
    assert path("cuda").startswith("not reached")
    ce._FP32_OUT_ADDMM["cuda"] = True
    assert path("cuda").startswith("torch.addmm(out_dtype=torch.float32) straight into")
    ce._FP32_OUT_ADDMM["cuda"] = False
    assert path("cuda").startswith(f"fallback: torch {torch.__version__} refused")
    assert path("cpu").startswith("PyTorch backend on CPU")
    assert _gpu_check_kernels.bench_cross_entropy_fallback_path(device="cpu") == []
