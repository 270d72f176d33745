"""Compile the cross-entropy kernels for sm_80 and sm_90 without a GPU: every (BLOCK_V, num_warps)
the launcher can pick, every flag combination it launches, each input dtype, and check that each
block fits the chip's shared memory and spills no registers (unless cross_entropy.KNOWN_SPILLS
explains that exact config). Compilation runs in a subprocess without the interpreter
(rega_engine.kernels.compile_check)."""
import itertools

from kernel_compile import (
    ARCHS,
    CROSS_ENTROPY_MODES,
    assert_all_fit,
    compile_in_subprocess,
    cross_entropy_job,
)
from rega_engine.kernels import cross_entropy as ce

LOGITS_DTYPES = ("bf16", "fp16", "fp32")


def test_launcher_only_picks_listed_configs():
    for n_cols in (1, 100, 2048, 2049, 32000, 128256, 256000):
        assert ce._row_kernel_config(n_cols) in ce.ROW_KERNEL_CONFIGS


def test_row_kernel_compiles_and_fits_sm80_sm90():
    # every mode and softcap flag in bf16 (the training dtype); fp16 and fp32 only differ in the
    # element type of loads and stores, so they compile the heaviest mode (fused, softcap)
    variants = [("bf16", mode, softcap)
                for mode, softcap in itertools.product(CROSS_ENTROPY_MODES, (False, True))]
    variants += [(dtype, (True, False), True) for dtype in LOGITS_DTYPES[1:]]
    jobs = [cross_entropy_job(block, num_warps, arch, dtype, compute_grad=grad,
                              lse_given=lse_given, softcap=softcap)
            for arch, (block, num_warps), (dtype, (grad, lse_given), softcap)
            in itertools.product(ARCHS, ce.ROW_KERNEL_CONFIGS, variants)]
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)
