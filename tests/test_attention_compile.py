"""Every Triton kernel of kernels/attention.py, in every autotune config it can pick, compiles for
sm_80 and sm_90 and fits the chip's shared memory, without a GPU.

Compilation runs in a fresh process without TRITON_INTERPRET, specialised as a real launch is
(tests/kernel_compile.py): without the divisibility hints the head-dim-128 forward reports 48 KiB
of shared memory instead of the 131 KiB a launch really needs.

Cost control: each (kernel, config, head dim, chip) compiles once, in fp16 or bf16 alternately,
so that every config meets both dtypes across the two chips; both are 2-byte types, so the dtype
changes no tile or shared-memory size, only the conversion instructions.
"""
import pytest

from kernel_compile import ARCHS, assert_all_fit, autotune_configs, compile_in_subprocess

MODULE = "rega_engine.kernels.attention"
POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "CU": "*i32", "TABLE": "*i32"}
FLOAT_ARGS = {"qk_scale", "sm_scale"}
KERNELS = {  # autotuned face -> the @triton.jit kernel under it
    "fwd": ("_attn_fwd_tuned", "_attn_fwd_kernel"),
    "dkdv": ("_attn_bwd_dkdv_tuned", "_attn_bwd_dkdv_kernel"),
    "dq": ("_attn_bwd_dq_tuned", "_attn_bwd_dq_kernel"),
}


def _signature(kernel_name, dtype, constexprs):
    """Triton types of every argument: tensors are the upper-case names."""
    from rega_engine.kernels import attention as attn

    signature = {}
    for name in getattr(attn, kernel_name).arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.isupper():
            signature[name] = POINTER_TYPES.get(name, "*" + dtype)
        else:
            signature[name] = "i32"
    return signature


def compile_and_check(jobs):
    for job in jobs:
        job.update(module=MODULE, signature=_signature(job["kernel"], job["dtype"], job["constexprs"]))
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)


def _dtype_for(arch, head_dim):
    return "fp16" if (arch == ARCHS[0]) == (head_dim == 64) else "bf16"


def _pickable_configs(attn, name, head_dim):
    """The configs the autotuner benchmarks for this head dim, through its own pruning."""
    tuned = getattr(attn, KERNELS[name][0])
    return tuned.early_config_prune(autotune_configs(tuned), {}, HEAD_DIM=head_dim)


def _job(name, config, head_dim, arch, dtype, causal=True):
    return {"kernel": KERNELS[name][1], "dtype": dtype, "arch": arch,
            "constexprs": dict(HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION="tf32",
                               **config.kwargs),
            "num_warps": config.num_warps, "num_stages": config.num_stages, "expect_wgmma": True}


@pytest.mark.parametrize("name", list(KERNELS))
def test_every_autotune_config_compiles_and_fits(name):
    from rega_engine.kernels import attention as attn

    jobs = [_job(name, config, head_dim, arch, _dtype_for(arch, head_dim))
            for head_dim in (64, 128)
            for config in _pickable_configs(attn, name, head_dim)
            for arch in ARCHS]
    # Non-causal and head dim 32 take other code paths and the smaller-head-dim configs.
    jobs += [_job(name, _pickable_configs(attn, name, 128)[0], 128, ARCHS[-1], "bf16", False),
             _job(name, _pickable_configs(attn, name, 32)[0], 32, ARCHS[-1], "bf16")]
    compile_and_check(jobs)


def test_delta_kernel_compiles_and_fits():
    from rega_engine.kernels import attention as attn

    compile_and_check([
        {"kernel": "_attn_bwd_delta_kernel", "dtype": _dtype_for(arch, head_dim), "arch": arch,
         "constexprs": dict(HEAD_DIM=head_dim, BLOCK_T=attn._DELTA_BLOCK_T),
         "num_warps": 4, "num_stages": 3, "expect_wgmma": False}
        for head_dim in (64, 128) for arch in ARCHS])

