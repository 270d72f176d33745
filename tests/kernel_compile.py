"""Compile Triton kernels for real NVIDIA chips on a machine without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline down
to a cubin without a device and reports the shared memory a block needs. A kernel configuration
that would not compile, or not fit the chip's shared memory per block, fails the test suite here
instead of failing at launch on the user's cluster.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Shared memory a block may use (opt-in maximum), in bytes.
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = sorted(SHARED_MEMORY_PER_BLOCK)


def jit_function(kernel):
    """The @triton.jit function under any @triton.autotune / @triton.heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def autotune_configs(kernel) -> list:
    """Every triton.Config an autotuned kernel may pick (an empty list if not autotuned)."""
    return list(getattr(kernel, "configs", []) or [])


def compile_for(kernel, signature: dict, constexprs: dict, arch: int, *, num_warps: int = 4,
                num_stages: int = 3):
    """Compile `kernel` for sm_<arch>; `signature` maps every argument to a Triton type string
    ("*fp16", "i32", "fp32", ...) or "constexpr", and `constexprs` gives the constexpr values."""
    src = ASTSource(fn=jit_function(kernel), signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def assert_compiles_and_fits(kernel, signature: dict, constexprs: dict, arch: int, *,
                             num_warps: int = 4, num_stages: int = 3) -> int:
    """Compile for sm_<arch>, check a cubin came out and the block fits; return shared bytes."""
    compiled = compile_for(kernel, signature, constexprs, arch, num_warps=num_warps,
                           num_stages=num_stages)
    assert compiled.asm.get("cubin"), f"no cubin for sm_{arch} with {constexprs}"
    shared = compiled.metadata.shared
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    assert shared <= limit, (
        f"{jit_function(kernel).__name__} with {constexprs}, num_warps={num_warps}, "
        f"num_stages={num_stages} needs {shared} B of shared memory; sm_{arch} allows {limit} B")
    return shared
