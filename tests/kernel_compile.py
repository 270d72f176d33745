"""The compile-check helpers the kernel compile tests use: each job runs
`triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 80 or 90, 32))`
in a fresh process, without a GPU, and reads back shared memory and ptxas's register and spill
figures. They live in the package (rega_engine.kernels.compile_check) so that
benchmarks/ptxas_report.py shares them."""
from rega_engine.kernels.compile_check import (  # noqa: F401
    ARCHS,
    ATTENTION_KERNELS,
    CROSS_ENTROPY_MODES,
    SHARED_MEMORY_PER_BLOCK,
    assert_all_fit,
    attention_configs,
    attention_delta_job,
    attention_job,
    autotune_configs,
    compile_in_subprocess,
    cross_entropy_job,
    parse_ptxas_log,
    spill_key,
    spill_problems,
)
