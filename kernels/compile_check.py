"""Compile rega-engine's Triton kernels for real NVIDIA chips on a machine without a GPU, and read
what ptxas says about each compiled kernel.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline down
to a cubin without a device and reports the shared memory a block needs. A kernel configuration
that would not compile, would not fit the chip's shared memory per block, or spills registers to
local memory fails the test suite (tests/test_*_compile.py) instead of failing, or running slowly,
on the user's cluster. benchmarks/ptxas_report.py tabulates the same figures.

Registers and spills are static ptxas figures: a launched kernel's metadata only carries
`n_regs`/`n_spills` after it is loaded on a device, so they are read from the `ptxas -v` log of
the compilation itself (`ptxas_usage`).

Triton decides at decoration time whether `@triton.jit` builds a compilable JITFunction or an
interpreted one (TRITON_INTERPRET=1, which the CPU test session sets), so compilation runs in a
fresh Python process without the interpreter: `compile_in_subprocess(jobs)`.

A job is a JSON-able dict: {"module", "kernel" (attribute name), "signature", "constexprs",
"arch", "num_warps", "num_stages"} plus optional "dtype" and "expect_wgmma"; the builders below
(`attention_job`, `cross_entropy_job`) make the jobs for every configuration a launch can pick.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

# Shared memory a block may use (opt-in maximum), in bytes.
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = sorted(SHARED_MEMORY_PER_BLOCK)

ATTENTION_MODULE = "rega_engine.kernels.attention"
CROSS_ENTROPY_MODULE = "rega_engine.kernels.cross_entropy"


# ----------------------------------------------------------------------------------------------
# Compiling one kernel
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# What ptxas says: registers, spills, stack
# ----------------------------------------------------------------------------------------------

# Kept next to the kernel in Triton's cache, so a cache hit does not run ptxas again.
_USAGE_FILE = "rega_ptxas_usage.json"


def parse_ptxas_log(log: str, kernel_name: str) -> dict:
    """Registers per thread, spill stores/loads, stack frame and static shared memory (bytes) of
    `kernel_name` from a `ptxas -v` log."""
    entry = log.split(f"Compiling entry function '{kernel_name}'", 1)
    if len(entry) != 2:
        raise ValueError(f"no entry function {kernel_name!r} in the ptxas log:\n{log}")
    section = entry[1].split("Compiling entry function", 1)[0]
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", section)
    registers = re.search(r"Used (\d+) registers", section)
    if not (frame and registers):
        raise ValueError(f"cannot read registers and spills of {kernel_name!r} from:\n{section}")
    static_smem = re.search(r"(\d+) bytes smem", section)
    return {"registers": int(registers[1]), "spill_stores": int(frame[2]),
            "spill_loads": int(frame[3]), "stack": int(frame[1]),
            "static_shared": int(static_smem[1]) if static_smem else 0}


def ptxas_command(arch: int) -> list[str]:
    """The ptxas Triton itself uses for sm_<arch>, with the flags that change register allocation
    (Triton 3.9's make_cubin: -lineinfo, --regAllocOptLevel=2, fp fusion on), plus -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    return [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}"]


def ptxas_version(arch: int) -> str:
    """"12.9.86"-style version of the ptxas Triton uses for sm_<arch>."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    text = get_ptxas_version(arch)
    match = re.search(r"V(\d+\.\d+\.\d+)", text)
    return match[1] if match else text.strip().splitlines()[-1]


def run_ptxas(ptx: str, arch: int) -> str:
    """The `ptxas -v` log of compiling `ptx` again (used on Triton cache hits)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([*ptxas_command(arch), src, "-o", os.path.join(tmp, "kernel.o")],
                              capture_output=True, text=True, check=True)
    return proc.stderr + proc.stdout


def ptxas_usage(compiled, arch: int, compile_log: str = "") -> dict:
    """`parse_ptxas_log` figures of a compiled kernel. `compile_log` is what Triton printed while
    compiling it with TRITON_DUMP_PTXAS_LOG (empty on a cache hit); without it, the figures come
    from the cache entry or from running ptxas on the kernel's PTX again."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    stored = cache.get_file(_USAGE_FILE)
    if stored:
        with open(stored) as f:
            return json.load(f)
    name = compiled.metadata.name
    if f"Compiling entry function '{name}'" not in compile_log:
        compile_log = run_ptxas(compiled.asm["ptx"], arch)
    usage = parse_ptxas_log(compile_log, name)
    cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
    return usage


def compile_with_usage(kernel, signature: dict, constexprs: dict, arch: int, *,
                       num_warps: int = 4, num_stages: int = 3):
    """`compile_for` and `ptxas_usage` together: (compiled kernel, usage dict)."""
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # Triton then prints its own ptxas -v log: free figures
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile_for(kernel, signature, constexprs, arch, num_warps=num_warps,
                               num_stages=num_stages)
    return compiled, ptxas_usage(compiled, arch, log.getvalue())


# ----------------------------------------------------------------------------------------------
# Jobs, compiled in a subprocess without the interpreter
# ----------------------------------------------------------------------------------------------

def compile_in_subprocess(jobs: list[dict], timeout: float = 900) -> list[dict]:
    """Compile each job in one fresh process without TRITON_INTERPRET.

    Each result is the job plus "shared" (bytes of dynamic shared memory), "wgmma" (whether the
    code uses Hopper's warpgroup MMA), and the `parse_ptxas_log` figures; or "error".
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Triton 3.10 turns fp fusion off by default; pin the behaviour the tests pin (conftest.py).
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # By module name, not file path: the package must resolve the jobs' kernel modules.
    proc = subprocess.run([sys.executable, "-m", "rega_engine.kernels.compile_check"],
                          input=json.dumps(jobs), env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_job(job: dict) -> dict:
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    compiled, usage = compile_with_usage(kernel, job["signature"], job["constexprs"], job["arch"],
                                         num_warps=job["num_warps"],
                                         num_stages=job["num_stages"])
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin produced")
    return {**job, "shared": compiled.metadata.shared, "wgmma": "wgmma" in compiled.asm["ptx"],
            **usage}


def _run_jobs(jobs: list[dict]) -> list[dict]:
    results = []
    for job in jobs:
        try:
            results.append(_run_job(job))
        except Exception as e:  # reported per job, so one bad config names itself
            results.append({**job, "error": f"{type(e).__name__}: {e}"[:2000]})
    return results


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def config_label(result: dict) -> str:
    """The configuration of a job as KNOWN_SPILLS names it: constexprs, warps, stages (not the
    dtype: the tests spread 2-byte dtypes over configs, and a listed spill covers all)."""
    parts = [f"{k}={v}" for k, v in result["constexprs"].items()]
    parts += [f"num_warps={result['num_warps']}", f"num_stages={result['num_stages']}"]
    return ",".join(parts)


def spill_key(result: dict) -> tuple[str, str, str]:
    """(kernel, "sm_<arch>", config_label): the key of a spill in a module's KNOWN_SPILLS."""
    return result["kernel"], f"sm_{result['arch']}", config_label(result)


def known_spills(module_name: str) -> dict:
    """The spills a kernel module explains (its KNOWN_SPILLS dict, key `spill_key`)."""
    return getattr(importlib.import_module(module_name), "KNOWN_SPILLS", {})


def _where(r: dict) -> str:
    return (f"{r['kernel']} sm_{r['arch']} {r['constexprs']} "
            f"warps={r['num_warps']} stages={r['num_stages']}")


def _fit_problem(r: dict) -> str | None:
    if "error" in r:
        return r["error"]
    limit = SHARED_MEMORY_PER_BLOCK[r["arch"]]
    if r["shared"] > limit:
        return (f"needs {r['shared']} B shared, sm_{r['arch']} allows {limit} B: shrink or "
                "drop the config")
    if r["arch"] >= 90 and r.get("expect_wgmma") and not r["wgmma"]:
        return "no wgmma in the sm_90 code (slow tensor-core path)"
    return None


# The Triton release whose register allocation the KNOWN_SPILLS entries describe (the figures in
# benchmarks/results/ptxas_sm90.md). Another release allocates differently (triton 3.6, the GPU
# machine's, spills a few bytes in configs 3.9 keeps clean), so there spills are reported by
# `spill_notes` rather than failed: compiling and fitting stay strict on every release.
SPILL_POLICY_TRITON = "3.9."


def spill_policy_applies() -> bool:
    import triton

    return triton.__version__.startswith(SPILL_POLICY_TRITON)


def spill_problems(results: list[dict]) -> list[str]:
    """Spills no KNOWN_SPILLS entry explains, and entries (for the kernels and chips compiled
    here) whose configuration no longer spills or is no longer compiled; on a Triton release
    other than SPILL_POLICY_TRITON's, none (see spill_notes)."""
    if not spill_policy_applies():
        return []
    problems, spilling = [], {}
    for r in results:
        if "error" not in r and (r["spill_stores"] or r["spill_loads"]):
            spilling[spill_key(r)] = r
    explained = {}
    for module in sorted({r["module"] for r in results}):
        explained.update(known_spills(module))
    for key, r in spilling.items():
        if key not in explained:
            problems.append(
                f"{_where(r)}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                f"({r['registers']} registers); change or drop the config, or explain it in "
                f"{r['module']}.KNOWN_SPILLS[{key!r}]")
    compiled_here = {(r["kernel"], f"sm_{r['arch']}") for r in results}
    for key in explained:
        if key[:2] in compiled_here and key not in spilling:
            problems.append(f"KNOWN_SPILLS[{key!r}] is stale: that configuration no longer "
                            "spills (or is no longer compiled); delete the entry")
    return problems


def spill_notes(results: list[dict]) -> list[str]:
    """Every spilling configuration, one line each (what a warning shows off the policy release)."""
    return [f"{_where(r)}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
            f"({r['registers']} registers)" for r in results
            if "error" not in r and (r["spill_stores"] or r["spill_loads"])]


def assert_all_fit(results: list[dict]) -> None:
    """Fail naming every job that did not compile, does not fit its chip, lacks wgmma where it is
    expected, or spills registers without an explanation in its module's KNOWN_SPILLS (warn
    instead of that last failure on a Triton release the spill policy does not describe)."""
    problems = [f"{_where(r)}: {p}" for r in results if (p := _fit_problem(r))]
    problems += spill_problems(results)
    assert not problems, "\n".join(problems)
    if not spill_policy_applies() and (notes := spill_notes(results)):
        import warnings

        warnings.warn("register spills under this Triton release (KNOWN_SPILLS describes "
                      f"{SPILL_POLICY_TRITON}x):\n" + "\n".join(notes), stacklevel=2)


# ----------------------------------------------------------------------------------------------
# Job builders: every configuration a launch can pick
# ----------------------------------------------------------------------------------------------

# autotune face -> @triton.jit kernel under it
ATTENTION_KERNELS = {
    "fwd": ("_attn_fwd_tuned", "_attn_fwd_kernel"),
    "dkdv": ("_attn_bwd_dkdv_tuned", "_attn_bwd_dkdv_kernel"),
    "dq": ("_attn_bwd_dq_tuned", "_attn_bwd_dq_kernel"),
}
_ATTENTION_POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "CU": "*i32", "TABLE": "*i32"}
_ATTENTION_FLOATS = {"qk_scale", "sm_scale"}


def attention_signature(kernel_name: str, dtype: str, constexprs: dict) -> dict:
    """Triton types of every argument of an attention kernel: tensors are the upper-case
    names, `dtype` ("bf16", "fp16") is the type of q, k, v and their gradients."""
    attn = importlib.import_module(ATTENTION_MODULE)
    signature = {}
    # .arg_names, not jit_function(): the test process imports the kernels interpreted
    for name in getattr(attn, kernel_name).arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _ATTENTION_FLOATS:
            signature[name] = "fp32"
        elif name.isupper():
            signature[name] = _ATTENTION_POINTERS.get(name, "*" + dtype)
        else:
            signature[name] = "i32"
    return signature


def attention_configs(name: str, head_dim: int) -> list:
    """The configs the autotuner of kernel `name` benchmarks for `head_dim`, through its own
    pruning."""
    attn = importlib.import_module(ATTENTION_MODULE)
    tuned = getattr(attn, ATTENTION_KERNELS[name][0])
    return tuned.early_config_prune(autotune_configs(tuned), {}, HEAD_DIM=head_dim)


def attention_job(name: str, config, head_dim: int, arch: int, dtype: str,
                  causal: bool = True) -> dict:
    """The job compiling attention kernel `name` ("fwd", "dkdv", "dq") in one autotune config."""
    kernel = ATTENTION_KERNELS[name][1]
    constexprs = dict(HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION="tf32", **config.kwargs)
    return {"module": ATTENTION_MODULE, "kernel": kernel, "dtype": dtype, "arch": arch,
            "signature": attention_signature(kernel, dtype, constexprs), "constexprs": constexprs,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "expect_wgmma": True}


def attention_delta_job(head_dim: int, arch: int, dtype: str) -> dict:
    """The job compiling the backward's delta = rowsum(dO * O) kernel (no autotuning)."""
    attn = importlib.import_module(ATTENTION_MODULE)
    kernel = "_attn_bwd_delta_kernel"
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_T=attn._DELTA_BLOCK_T)
    return {"module": ATTENTION_MODULE, "kernel": kernel, "dtype": dtype, "arch": arch,
            "signature": attention_signature(kernel, dtype, constexprs), "constexprs": constexprs,
            "num_warps": 4, "num_stages": 3, "expect_wgmma": False}


# (COMPUTE_GRAD, LSE_GIVEN) as launched: forward without gradients, fused forward + gradient,
# backward recompute for reduction="none"
CROSS_ENTROPY_MODES = [(False, False), (True, False), (True, True)]


def cross_entropy_signature(logits_dtype: str) -> dict:
    return {
        "logits_ptr": "*" + logits_dtype, "stride_row": "i32", "labels_ptr": "*i64",
        "grad_scale_ptr": "*fp32", "lse_ptr": "*fp32", "ce_ptr": "*fp32", "n_cols": "i32",
        "ignore_index": "i32", "softcap": "fp32", "z_loss": "fp32", "label_smoothing": "fp32",
        "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr", "COMPUTE_GRAD": "constexpr",
        "LSE_GIVEN": "constexpr", "HAS_SMOOTHING": "constexpr",
    }


def cross_entropy_job(block_v: int, num_warps: int, arch: int, logits_dtype: str, *,
                      compute_grad: bool, lse_given: bool, softcap: bool,
                      smoothing: bool = False) -> dict:
    """The job compiling the cross-entropy row kernel in one (BLOCK_V, num_warps) config."""
    return {"module": CROSS_ENTROPY_MODULE, "kernel": "_ce_rows_kernel", "dtype": logits_dtype,
            "signature": cross_entropy_signature(logits_dtype), "arch": arch,
            "constexprs": {"BLOCK_V": block_v, "HAS_SOFTCAP": softcap,
                           "COMPUTE_GRAD": compute_grad, "LSE_GIVEN": lse_given,
                           "HAS_SMOOTHING": smoothing},
            "num_warps": num_warps, "num_stages": 3}


if __name__ == "__main__":
    print(json.dumps(_run_jobs(json.loads(sys.stdin.read()))))
