"""What ptxas says about every autotune configuration of every Triton kernel, without a GPU.

Compiles each configuration a launch can pick (attention forward, dK/dV, dQ and delta for the
head dims the models use; the cross-entropy row kernel in every mode it is launched in), in bf16,
for sm_90 and sm_80, and tabulates per compiled kernel: registers per thread, spill stores and
loads, stack frame, shared memory per block, whether the code uses wgmma, and the blocks per SM
that registers, shared memory and threads each allow (H100 / A100 limits below).

These are static ptxas figures: they say what can be resident at once, not how fast anything
runs. A spilling or low-occupancy configuration only costs time if the autotuner picks it, and the
autotuner measures; until a GPU runs the kernels this is the closest look at their speed.

    python benchmarks/ptxas_report.py        # writes benchmarks/results/ptxas_sm90.{md,json}
    python benchmarks/ptxas_report.py --archs 90 --head-dims 128 --out /tmp

`ptxas_table(archs, head_dims)` returns the rows, for drivers such as `make gpu-check`.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from rega_engine.kernels.compile_check import (
    ATTENTION_KERNELS,
    CROSS_ENTROPY_MODES,
    attention_configs,
    attention_delta_job,
    attention_job,
    compile_in_subprocess,
    cross_entropy_job,
    known_spills,
    ptxas_version,
    spill_key,
)
from rega_engine.kernels.cross_entropy import ROW_KERNEL_CONFIGS

RESULTS = Path(__file__).resolve().parent / "results"

# Per-SM resources of the chip each arch is reported for. CUDA reserves 1 KiB of shared memory
# per resident block; registers are allocated per warp in units of 256, from four SM
# sub-partitions of 16384 registers each.
SM_LIMITS = {
    90: {"chip": "H100", "registers": 65536, "shared": 228 * 1024, "threads": 2048, "blocks": 32},
    80: {"chip": "A100", "registers": 65536, "shared": 164 * 1024, "threads": 2048, "blocks": 32},
}
_SHARED_RESERVED_PER_BLOCK = 1024
_REGISTER_UNIT = 256
_SUB_PARTITIONS = 4
_WARP_SIZE = 32


def blocks_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> dict:
    """Resident blocks per SM as registers, shared memory and threads each allow, and the
    resulting bound (the minimum, capped by the chip's block limit)."""
    limits = SM_LIMITS[arch]
    per_warp = -(-registers * _WARP_SIZE // _REGISTER_UNIT) * _REGISTER_UNIT
    per_partition = limits["registers"] // _SUB_PARTITIONS
    by_registers = _SUB_PARTITIONS * (per_partition // per_warp) // num_warps
    by_shared = limits["shared"] // (shared + _SHARED_RESERVED_PER_BLOCK)
    by_threads = limits["threads"] // (num_warps * _WARP_SIZE)
    blocks = min(by_registers, by_shared, by_threads, limits["blocks"])
    return {"blocks_by_registers": by_registers, "blocks_by_shared": by_shared,
            "blocks_by_threads": by_threads, "blocks_per_sm": blocks,
            "warps_per_sm": blocks * num_warps}


def _jobs(archs, head_dims) -> list[dict]:
    jobs = []
    for arch in archs:
        for name, head_dim in itertools.product(ATTENTION_KERNELS, head_dims):
            jobs += [attention_job(name, config, head_dim, arch, "bf16")
                     for config in attention_configs(name, head_dim)]
        jobs += [attention_delta_job(head_dim, arch, "bf16") for head_dim in head_dims]
        jobs += [cross_entropy_job(block, warps, arch, "bf16", compute_grad=grad,
                                   lse_given=lse_given, softcap=softcap)
                 for (block, warps), (grad, lse_given), softcap
                 in itertools.product(ROW_KERNEL_CONFIGS, CROSS_ENTROPY_MODES, (False, True))]
    return jobs


_BLOCK_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_T", "BLOCK_V")


def _row(result: dict) -> dict:
    constexprs = result["constexprs"]
    blocks = {k: v for k, v in constexprs.items() if k in _BLOCK_NAMES}
    flags = {k: v for k, v in constexprs.items() if k not in _BLOCK_NAMES}
    row = {"kernel": result["kernel"], "arch": result["arch"], "dtype": result["dtype"],
           "blocks": blocks, "flags": flags, "num_warps": result["num_warps"],
           "num_stages": result["num_stages"]}
    if "error" in result:
        return {**row, "error": result["error"]}
    shared = result["shared"] + result["static_shared"]
    row.update(registers=result["registers"], spill_stores=result["spill_stores"],
               spill_loads=result["spill_loads"], stack=result["stack"], shared=shared,
               wgmma=result["wgmma"],
               **blocks_per_sm(result["arch"], result["registers"], shared, result["num_warps"]))
    row["known_spill"] = known_spills(result["module"]).get(spill_key(result))
    return row


def ptxas_table(archs=(90,), head_dims=(64, 128)) -> list[dict]:
    """One row per compiled (kernel, configuration, head dim or flags, arch): the static ptxas
    figures and the blocks per SM they allow (see the module docstring)."""
    return [_row(r) for r in compile_in_subprocess(_jobs(archs, head_dims))]


def versions(archs) -> dict:
    import triton

    return {"triton": triton.__version__,
            "ptxas": {f"sm_{arch}": ptxas_version(arch) for arch in archs}}


# The cross-entropy row kernel's launch modes, by (COMPUTE_GRAD, LSE_GIVEN).
_CE_MODES = {(False, False): "loss only", (True, False): "loss + grad",
             (True, True): "grad recompute"}


def _cell_flags(row: dict) -> str:
    flags = row["flags"]
    if "HEAD_DIM" in flags:  # attention: causal and tf32 in every row
        return f"d={flags['HEAD_DIM']}"
    mode = _CE_MODES[(flags["COMPUTE_GRAD"], flags["LSE_GIVEN"])]
    return mode + (", softcap" if flags["HAS_SOFTCAP"] else "")


def _cell_blocks(row: dict) -> str:
    return " ".join(f"{k[len('BLOCK_'):]}={v}" for k, v in row["blocks"].items())


def _markdown_rows(rows: list[dict]) -> list[str]:
    lines = ["| kernel | flags | blocks | warps | stages | regs | spill st/ld B | stack B "
             "| smem KiB | wgmma | blocks/SM by regs / smem / threads | blocks/SM | warps/SM |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|:-:|:-:|--:|--:|"]
    for r in rows:
        head = (f"| {r['kernel']} | {_cell_flags(r)} | {_cell_blocks(r)} | {r['num_warps']} "
                f"| {r['num_stages']} ")
        if "error" in r:
            lines.append(head + f"| error: {r['error'][:80]} |" + " |" * 8)
            continue
        spill = f"{r['spill_stores']} / {r['spill_loads']}"
        if r["spill_stores"] or r["spill_loads"]:
            spill = f"**{spill}**" + (" (known)" if r["known_spill"] else "")
        lines.append(
            head + f"| {r['registers']} | {spill} | {r['stack']} | {r['shared'] / 1024:.1f} "
            f"| {'yes' if r['wgmma'] else 'no'} "
            f"| {r['blocks_by_registers']} / {r['blocks_by_shared']} / {r['blocks_by_threads']} "
            f"| {r['blocks_per_sm']} | {r['warps_per_sm']} |")
    return lines


def markdown(rows: list[dict], info: dict) -> str:
    archs = sorted({r["arch"] for r in rows}, reverse=True)
    ptxas = ", ".join(f"{arch} ptxas {v}" for arch, v in info["ptxas"].items())
    out = ["# ptxas figures per autotune configuration",
           "",
           "Static figures from `ptxas -v` on the code Triton compiles (no GPU ran anything): "
           "registers per thread, spilled bytes, stack frame and shared memory per block, and "
           "the blocks per SM those allow. They bound occupancy; they are not timings.",
           "",
           f"Triton {info['triton']}; {ptxas}. bf16, causal, tf32 dot precision. "
           "Regenerate with `python benchmarks/ptxas_report.py`.",
           ""]
    for arch in archs:
        limits = SM_LIMITS[arch]
        out += [f"## sm_{arch} ({limits['chip']}: {limits['registers']} registers, "
                f"{limits['shared'] // 1024} KiB shared memory, {limits['threads']} threads "
                "per SM)", ""]
        out += _markdown_rows([r for r in rows if r["arch"] == arch])
        out.append("")
    explained = [r for r in rows if r.get("known_spill")]
    if explained:
        out += ["## Known spills (KNOWN_SPILLS in the kernel modules)", ""]
        out += [f"- `{r['kernel']}` sm_{r['arch']} {_cell_flags(r)} {_cell_blocks(r)} "
                f"warps={r['num_warps']} stages={r['num_stages']}: {r['known_spill']}"
                for r in explained]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = ptxas_table(tuple(args.archs), tuple(args.head_dims))
    info = versions(args.archs)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, info)
    (args.out / "ptxas_sm90.md").write_text(text)
    payload = {"what": "static ptxas -v figures per compiled kernel configuration; no timings",
               **info, "sm_limits": SM_LIMITS, "rows": rows}
    (args.out / "ptxas_sm90.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
