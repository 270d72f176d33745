"""Compile Triton kernels for real NVIDIA chips on a machine without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline down
to a cubin without a device and reports the shared memory a block needs. A kernel configuration
that would not compile, or not fit the chip's shared memory per block, fails the test suite here
instead of failing at launch on the user's cluster.

Triton decides at decoration time whether `@triton.jit` builds a compilable JITFunction or an
interpreted one (TRITON_INTERPRET=1, which the CPU test session sets), so the compilation runs in
a fresh Python process without the interpreter: `compile_in_subprocess(jobs)`.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

# Shared memory a block may use (opt-in maximum), in bytes.
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = sorted(SHARED_MEMORY_PER_BLOCK)


def jit_function(kernel):
    """The @triton.jit function under any @triton.autotune / @triton.heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel!r} is not a compilable Triton kernel (interpreter mode?)")
        kernel = kernel.fn
    return kernel


def autotune_configs(kernel) -> list:
    """Every triton.Config an autotuned kernel may pick (an empty list if not autotuned)."""
    return list(getattr(kernel, "configs", []) or [])


def launch_hints(kernel, signature: dict) -> dict:
    """The specialisation a real launch with torch tensors gets: pointers and `stride*` integers
    divisible by 16. Without it Triton cannot vectorise tile loads, skips software pipelining and
    reports well under half the shared memory the launch will really ask for."""
    names = jit_function(kernel).arg_names
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
            if signature.get(name, "").startswith("*")
            or (name.startswith("stride") and signature.get(name) == "i32")}


def compile_for(kernel, signature: dict, constexprs: dict, arch: int, *, num_warps: int = 4,
                num_stages: int = 3):
    """Compile `kernel` for sm_<arch>, specialised as a launch would be (`launch_hints`);
    `signature` maps every argument to a Triton type string ("*fp16", "i32", "fp32", ...) or
    "constexpr", and `constexprs` gives the constexpr values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=jit_function(kernel), signature=signature, constexprs=constexprs,
                    attrs=launch_hints(kernel, signature))
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


def compile_in_subprocess(jobs: list[dict], timeout: float = 900) -> list[dict]:
    """Compile each job in one fresh process without TRITON_INTERPRET.

    A job is {"module", "kernel" (attribute name), "signature", "constexprs" (JSON values),
    "arch", "num_warps", "num_stages"}; each result is the job plus "shared" (bytes) and
    "wgmma" (whether the sm_90 code uses Hopper's warpgroup MMA), or "error".
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_jobs(jobs: list[dict]) -> list[dict]:
    results = []
    for job in jobs:
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        try:
            compiled = compile_for(kernel, job["signature"], job["constexprs"], job["arch"],
                                   num_warps=job["num_warps"], num_stages=job["num_stages"])
            if not compiled.asm.get("cubin"):
                raise RuntimeError("no cubin produced")
            results.append({**job, "shared": compiled.metadata.shared,
                            "wgmma": "wgmma" in compiled.asm["ptx"]})
        except Exception as e:  # reported per job, so one bad config names itself
            results.append({**job, "error": f"{type(e).__name__}: {e}"[:2000]})
    return results


def assert_all_fit(results: list[dict]) -> None:
    """Fail naming every job that did not compile or does not fit its chip."""
    problems = []
    for r in results:
        where = (f"{r['kernel']} sm_{r['arch']} {r['constexprs']} "
                 f"warps={r['num_warps']} stages={r['num_stages']}")
        if "error" in r:
            problems.append(f"{where}: {r['error']}")
        elif r["shared"] > SHARED_MEMORY_PER_BLOCK[r["arch"]]:
            problems.append(f"{where}: needs {r['shared']} B shared, sm_{r['arch']} allows "
                            f"{SHARED_MEMORY_PER_BLOCK[r['arch']]} B: shrink or drop the config")
        elif r["arch"] >= 90 and r.get("expect_wgmma") and not r["wgmma"]:
            problems.append(f"{where}: no wgmma in the sm_90 code (slow tensor-core path)")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    print(json.dumps(_run_jobs(json.loads(sys.stdin.read()))))
