"""The Triton kernels of kernels/rms_norm.py, rope.py and swiglu.py compile for sm_80 and sm_90 in
the configurations their launchers pick for real model shapes, fit the chip's shared memory and
spill no registers (unless the module's KNOWN_SPILLS explains that exact config), without a GPU.

Compilation runs in a fresh process without TRITON_INTERPRET, specialised as a real launch is
(rega_engine.kernels.compile_check). Each (kernel, config, chip) compiles once, in bf16 or fp16
alternately, so that every kernel meets both 2-byte dtypes on both chips; the dtype changes no
tile size, only the conversion instructions.
"""
import importlib

import pytest
from kernel_compile import ARCHS, assert_all_fit, compile_in_subprocess

MODULE = "rega_engine.kernels.{}"
rms = importlib.import_module(MODULE.format("rms_norm"))
rope = importlib.import_module(MODULE.format("rope"))
swiglu = importlib.import_module(MODULE.format("swiglu"))

# Hidden sizes of the models we train (Qwen2.5 0.5B/7B, Llama 3.2 1B, Llama 3 8B, Llama 2 13B,
# Llama 3 70B, Llama 3 405B); the launcher's block depends only on the next power of two.
HIDDEN_SIZES = (896, 2048, 3584, 4096, 5120, 8192, 16384)
# (head_dim, query heads, key/value heads): Llama 3 8B, Llama 3 70B, Qwen2.5 7B, Qwen2.5 0.5B,
# Llama 3.2 1B, and a non-power-of-two head dim (phi-2 style).
ROPE_SHAPES = ((128, 32, 8), (128, 64, 8), (128, 28, 4), (64, 14, 2), (64, 32, 8), (80, 32, 32))


def _job(module, kernel, signature, constexprs, arch, dtype, num_warps, num_stages=3):
    # num_stages=3 is what a launch without the argument gets on CUDA
    return {"module": MODULE.format(module), "kernel": kernel, "dtype": dtype, "arch": arch,
            "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "num_stages": num_stages}


def _signature(kernel, pointers: dict, floats=(), constexprs=()):
    """Triton types of every argument: upper-case names are pointers (`pointers` maps each to
    its type), names in `floats` are fp32, constexprs as such, everything else i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _dtypes():
    """bf16 and fp16 in turn, starting differently per chip."""
    while True:
        yield "bf16"
        yield "fp16"


def rms_norm_jobs():
    widths = sorted({rms.row_kernel_config(h)[0]: h for h in HIDDEN_SIZES}.values())
    jobs = []
    for arch in ARCHS:
        dtypes = _dtypes()
        if arch == ARCHS[-1]:
            next(dtypes)
        for h in widths:
            for flag in (False, True):
                dtype = next(dtypes)
                t = "*" + dtype
                block, num_warps = rms.row_kernel_config(h)
                fwd = {"BLOCK": block, "HAS_RESIDUAL": flag}
                jobs.append(_job("rms_norm", "_rms_norm_fwd_kernel", _signature(
                    rms._rms_norm_fwd_kernel,
                    {"X": t, "RES": t, "W": t, "Y": t, "RES_OUT": t, "RSTD": "*fp32"},
                    floats=("eps",), constexprs=fwd), fwd, arch, dtype, num_warps))
                block, num_warps = rms.bwd_kernel_config(h)
                bwd = {"BLOCK": block, "HAS_DRES": flag, "RELOAD_W": block > 8192}
                jobs.append(_job("rms_norm", "_rms_norm_bwd_kernel", _signature(
                    rms._rms_norm_bwd_kernel,
                    {"DY": t, "R": t, "W": t, "RSTD": "*fp32", "DRES": t, "DX": t,
                     "DW_PARTIAL": "*fp32"}, constexprs=bwd), bwd, arch, dtype, num_warps))
    return jobs


def rope_jobs():
    jobs = []
    for arch in ARCHS:
        dtypes = _dtypes()
        if arch == ARCHS[-1]:
            next(dtypes)
        for head_dim, hq, hk in ROPE_SHAPES:
            for inverse in (False, True):
                dtype = next(dtypes)
                t = "*" + dtype
                constexprs = {**rope.kernel_config(head_dim, hq, hk), "INVERSE": inverse}
                jobs.append(_job("rope", "_rope_kernel", _signature(
                    rope._rope_kernel,
                    {"Q": t, "K": t, "Q_OUT": t, "K_OUT": t, "POS": "*i64", "INV_FREQ": "*fp32"},
                    constexprs=constexprs), constexprs, arch, dtype, rope.NUM_WARPS))
    # int32 positions take another load type
    constexprs = {**rope.kernel_config(128, 32, 8), "INVERSE": False}
    jobs.append(_job("rope", "_rope_kernel", _signature(
        rope._rope_kernel, {"Q": "*bf16", "K": "*bf16", "Q_OUT": "*bf16", "K_OUT": "*bf16",
                            "POS": "*i32", "INV_FREQ": "*fp32"}, constexprs=constexprs),
        constexprs, ARCHS[-1], "bf16", rope.NUM_WARPS))
    return jobs


def swiglu_jobs():
    constexprs = {"BLOCK": swiglu.BLOCK}
    jobs = []
    for arch in ARCHS:
        for dtype in ("bf16", "fp16"):
            t = "*" + dtype
            jobs.append(_job("swiglu", "_swiglu_fwd_kernel", _signature(
                swiglu._swiglu_fwd_kernel, {"GATE": t, "UP": t, "Y": t}, constexprs=constexprs),
                constexprs, arch, dtype, swiglu.NUM_WARPS))
            jobs.append(_job("swiglu", "_swiglu_bwd_kernel", _signature(
                swiglu._swiglu_bwd_kernel, {"DY": t, "GATE": t, "UP": t, "DGATE": t, "DUP": t},
                constexprs=constexprs), constexprs, arch, dtype, swiglu.NUM_WARPS))
    return jobs


def test_rms_norm_launcher_covers_every_hidden_size_up_to_the_limit():
    for h in (1, 100, 896, 1000, 2048, 2049, 8192, rms.MAX_TRITON_COLS):
        block, num_warps = rms.row_kernel_config(h)
        assert block >= h and block < 2 * h + 1 and num_warps in (4, 8, 16)
    # the compile checks below cover every block a launch up to MAX_TRITON_COLS can pick
    compiled = {rms.row_kernel_config(h) for h in HIDDEN_SIZES}
    launched = {rms.row_kernel_config(h) for h in range(1025, rms.MAX_TRITON_COLS + 1, 512)}
    assert launched <= compiled


@pytest.mark.parametrize("builder", [rms_norm_jobs, rope_jobs, swiglu_jobs],
                         ids=["rms_norm", "rope", "swiglu"])
def test_kernels_compile_and_fit_sm80_sm90(builder):
    jobs = builder()
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)
