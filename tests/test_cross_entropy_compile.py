"""Compile the cross-entropy kernels for sm_80 and sm_90 without a GPU: every (BLOCK_V, num_warps)
the launcher can pick, every flag combination it launches, each input dtype, and check that each
block fits the chip's shared memory. Compilation runs in a subprocess without the interpreter
(tests/kernel_compile.py)."""
import itertools

from kernel_compile import ARCHS, assert_all_fit, compile_in_subprocess

from rega_engine.kernels import cross_entropy as ce

# (COMPUTE_GRAD, LSE_GIVEN) as launched: forward without gradients, fused forward + gradient,
# backward recompute for reduction="none"
LAUNCHED_MODES = [(False, False), (True, False), (True, True)]
LOGITS_TYPES = ("*bf16", "*fp16", "*fp32")


def _signature(logits_type):
    return {
        "logits_ptr": logits_type, "stride_row": "i32", "labels_ptr": "*i64",
        "grad_scale_ptr": "*fp32", "lse_ptr": "*fp32", "ce_ptr": "*fp32", "n_cols": "i32",
        "ignore_index": "i32", "softcap": "fp32", "z_loss": "fp32", "BLOCK_V": "constexpr",
        "HAS_SOFTCAP": "constexpr", "COMPUTE_GRAD": "constexpr", "LSE_GIVEN": "constexpr",
    }


def test_launcher_only_picks_listed_configs():
    for n_cols in (1, 100, 2048, 2049, 32000, 128256, 256000):
        assert ce._row_kernel_config(n_cols) in ce.ROW_KERNEL_CONFIGS


def test_row_kernel_compiles_and_fits_sm80_sm90():
    # every mode and softcap flag in bf16 (the training dtype); fp16 and fp32 only differ in the
    # element type of loads and stores, so they compile the heaviest mode (fused, softcap)
    variants = [("*bf16", mode, softcap)
                for mode, softcap in itertools.product(LAUNCHED_MODES, (False, True))]
    variants += [(logits_type, (True, False), True) for logits_type in LOGITS_TYPES[1:]]
    jobs = [
        {"module": "rega_engine.kernels.cross_entropy", "kernel": "_ce_rows_kernel",
         "signature": _signature(logits_type),
         "constexprs": {"BLOCK_V": block, "HAS_SOFTCAP": softcap, "COMPUTE_GRAD": grad,
                        "LSE_GIVEN": lse_given},
         "arch": arch, "num_warps": num_warps, "num_stages": 3}
        for arch, (block, num_warps), (logits_type, (grad, lse_given), softcap)
        in itertools.product(ARCHS, ce.ROW_KERNEL_CONFIGS, variants)
    ]
    results = compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    assert_all_fit(results)
