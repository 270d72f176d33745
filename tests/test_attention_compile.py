"""Every Triton kernel of kernels/attention.py, in every autotune config it can pick, compiles for
sm_80 and sm_90, fits the chip's shared memory and spills no registers (unless
attention.KNOWN_SPILLS explains that exact config), without a GPU.

Compilation runs in a fresh process without TRITON_INTERPRET, specialised as a real launch is
(rega_engine.kernels.compile_check): without the divisibility hints the head-dim-128 forward
reports 48 KiB of shared memory instead of the 131 KiB a launch really needs.

Cost control: each (kernel, config, head dim, chip) compiles once, in fp16 or bf16 alternately,
so that every config meets both dtypes across the two chips; both are 2-byte types, so the dtype
changes no tile or shared-memory size, only the conversion instructions.
"""
import pytest
from kernel_compile import (
    ARCHS,
    ATTENTION_KERNELS,
    assert_all_fit,
    attention_configs,
    attention_delta_job,
    attention_job,
    compile_in_subprocess,
    parse_ptxas_log,
    spill_key,
    spill_problems,
)

KERNELS = ("fwd", "dkdv", "dq")


def compile_and_check(jobs):
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)


def _dtype_for(arch, head_dim):
    return "fp16" if (arch == ARCHS[0]) == (head_dim == 64) else "bf16"


@pytest.mark.parametrize("name", KERNELS)
def test_every_autotune_config_compiles_and_fits(name):
    jobs = [attention_job(name, config, head_dim, arch, _dtype_for(arch, head_dim))
            for head_dim in (64, 128)
            for config in attention_configs(name, head_dim)
            for arch in ARCHS]
    # Non-causal and head dim 32 take other code paths and the smaller-head-dim configs.
    jobs += [attention_job(name, attention_configs(name, 128)[0], 128, ARCHS[-1], "bf16",
                           causal=False),
             attention_job(name, attention_configs(name, 32)[0], 32, ARCHS[-1], "bf16")]
    compile_and_check(jobs)


def test_delta_kernel_compiles_and_fits():
    compile_and_check([attention_delta_job(head_dim, arch, _dtype_for(arch, head_dim))
                       for head_dim in (64, 128) for arch in ARCHS])


# -- the spill check itself, on made-up compile results (no compilation) ----------------------

def _result(kernel="_attn_fwd_kernel", arch=80, spill=0, num_warps=8, num_stages=3,
            **constexprs):
    constexprs = constexprs or dict(HEAD_DIM=128, CAUSAL=True, DOT_PRECISION="tf32",
                                    BLOCK_M=128, BLOCK_N=64)
    return {"module": "rega_engine.kernels.attention", "kernel": kernel, "arch": arch,
            "constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages,
            "registers": 255, "spill_stores": spill, "spill_loads": spill, "shared": 0}


def test_spill_check_names_an_unexplained_spill_and_a_stale_explanation(monkeypatch):
    from rega_engine.kernels import attention as attn
    from rega_engine.kernels import compile_check

    # the mechanism itself, whichever Triton release runs the suite
    monkeypatch.setattr(compile_check, "spill_policy_applies", lambda: True)

    listed = _result(spill=80)
    assert spill_key(listed) in attn.KNOWN_SPILLS  # the sm_80 forward entry
    unlisted = _result(arch=90, spill=12)
    problems = spill_problems([listed, unlisted])
    assert len(problems) == 1 and "sm_90" in problems[0] and "spills 12 B stores" in problems[0]
    assert "num_warps=8,num_stages=3" in problems[0]  # the key to add, spelled out

    stale = spill_problems([_result(spill=0)])
    assert len(stale) == 1 and "stale" in stale[0] and "BLOCK_M=128,BLOCK_N=64" in stale[0]


def test_every_known_spill_names_a_config_the_autotuner_can_pick():
    from rega_engine.kernels import attention as attn

    pickable = {spill_key(_result(kernel, arch, 1, c.num_warps, c.num_stages, HEAD_DIM=head_dim,
                                  CAUSAL=True, DOT_PRECISION="tf32", **c.kwargs))
                for name, (_, kernel) in ATTENTION_KERNELS.items() for head_dim in (64, 128)
                for c in attention_configs(name, head_dim) for arch in ARCHS}
    assert set(attn.KNOWN_SPILLS) <= pickable


def test_ptxas_log_parsing():
    log = """ptxas info    : 11 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function '_attn_bwd_dq_kernel' for 'sm_80'
ptxas info    : Function properties for _attn_bwd_dq_kernel
    88 bytes stack frame, 84 bytes spill stores, 80 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 88 bytes cumulative stack size
"""
    assert parse_ptxas_log(log, "_attn_bwd_dq_kernel") == {
        "registers": 255, "spill_stores": 84, "spill_loads": 80, "stack": 88, "static_shared": 0}
    with pytest.raises(ValueError, match="no entry function"):
        parse_ptxas_log(log, "_attn_fwd_kernel")
