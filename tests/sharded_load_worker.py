"""torchrun worker for tests/test_sharded_load.py: builds models through train/parallel.py's
build_model on a dp_replicate x dp_shard mesh of gloo processes and writes, per rank, to
<out_dir>/<tag>_rank<r>.json what the test checks:

  {case: {"mismatches": [...], "get_tensor": [...], "read_elements": n, "local_elements": m,
          "full_elements": f, "compared": c}}

  load_llama3        model.path = <data>/llama3 (bf16 safetensors in several files, vocab 257)
                     against the single-process from_pretrained(..., dtype=float32); the reads
                     of hf_io's safetensors handles are spied on: which names went through
                     get_tensor, how many elements the slices returned;
  init_qwen2_tied    model.init_config (tied embeddings, q/k/v biases, vocab 257) against
                     from_config(..., seed=5);
  init_llama3_lora   the same with [lora] rank 4 against from_config + apply_lora +
                     init_lora_weights in one process (base weights and adapters);
  init_llama3_fp8    train.precision = "fp8" (torchao Float8Linear, FP8 all-gather wrappers)
                     against from_config (skipped without torchao);
  empty_shard        (4 processes) a module with a (3, 5) and a (2,) parameter fully_shard-ed
                     over all 4 ranks (the last shards empty) loaded from <data>/small.

Every comparison is exact (torch.equal) on full tensors (DTensor.full_tensor()).

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/sharded_load_worker.py \
        OUT_DIR DATA_DIR TAG DP_REPLICATE DP_SHARD CASE[,CASE...]
"""
from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

# The benchmarks' own read counter: what the test checks is what the benchmark reports.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from _safetensors_reads import SafetensorsReads  # noqa: E402

SEEDS = {"init_qwen2_tied": 5, "init_llama3_lora": 7, "init_llama3_fp8": 9}


def full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> full tensor (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    from rega_engine.model.hf_io import canonical_name
    from rega_engine.train.fp8 import plain_tensor
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[canonical_name(name)] = plain_tensor(value).detach().to("cpu")
    return out


def local_elements(model: nn.Module) -> int:
    from torch.distributed.tensor import DTensor
    return sum(t.to_local().numel() for t in model.state_dict(keep_vars=True).values()
               if isinstance(t, DTensor))


def compare(got: dict, want: dict) -> list[str]:
    problems = [f"names: got {sorted(set(got) - set(want))}, want {sorted(set(want) - set(got))}"
                ] if set(got) != set(want) else []
    for name in sorted(set(got) & set(want)):
        a, b = got[name], want[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(a, b):
            problems.append(f"{name}: max diff {(a.float() - b.float()).abs().max().item()}")
    return problems


def run_case(case: str, data: str, runtime) -> dict:
    from rega_engine.config import LoRAConfig, ModelConfig
    from rega_engine.model import from_config, from_pretrained
    from rega_engine.train.parallel import build_model

    if case == "empty_shard":
        return empty_shard(data)
    lora = None
    precision = "fp32"
    if case == "load_llama3":
        config = ModelConfig(path=os.path.join(data, "llama3"))
    elif case == "init_qwen2_tied":
        config = ModelConfig(init_config=os.path.join(data, "qwen2_tied.json"))
    else:
        config = ModelConfig(init_config=os.path.join(data, "llama3.json"))
        if case == "init_llama3_lora":
            lora = LoRAConfig(rank=4)
        elif case == "init_llama3_fp8":
            try:
                import torchao.float8  # noqa: F401
            except ImportError:
                return {"skipped": "no torchao"}
            precision = "fp8"
    seed = SEEDS.get(case, 0)
    with SafetensorsReads() as spy:
        model, _ = build_model(config, runtime, seed=seed, precision=precision, lora=lora)
    got = full_tensors(model)
    if config.path:
        reference = from_pretrained(config.path, dtype=torch.float32)
    else:
        reference = from_config(config.init_config, dtype=torch.float32, device="cpu", seed=seed)
        if lora is not None:
            from rega_engine.model.lora import LoRASettings, apply_lora, init_lora_weights
            apply_lora(reference, LoRASettings.from_config(lora))
            init_lora_weights(reference, seed)
    want = {name: t.detach() for name, t in reference.state_dict().items()}
    return {"mismatches": compare(got, want), "get_tensor": spy.get_tensor,
            "read_elements": spy.elements, "local_elements": local_elements(model),
            "full_elements": sum(t.numel() for t in want.values()), "compared": len(got)}


def empty_shard(data: str) -> dict:
    """Shards of 1, 1, 1, 0 rows (and 1, 1, 0, 0 elements) over a 1-D mesh of the 4 ranks."""
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rega_engine.model.hf_io import load_state_dict_into

    module = nn.Module()
    module.a = nn.Parameter(torch.full((3, 5), float("nan")))
    module.b = nn.Parameter(torch.full((2,), float("nan")))
    fully_shard(module, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    with SafetensorsReads() as spy:
        load_state_dict_into(module, os.path.join(data, "small"))
    got = full_tensors(module)
    want = load_file(os.path.join(data, "small", "model.safetensors"))
    return {"mismatches": compare(got, want), "get_tensor": spy.get_tensor,
            "read_elements": spy.elements, "local_elements": local_elements(module),
            "full_elements": sum(t.numel() for t in want.values()), "compared": len(got),
            "local_shapes": {name: list(t.to_local().shape)
                             for name, t in module.state_dict(keep_vars=True).items()}}


def main(out_dir: str, data: str, tag: str, replicate: int, shard: int, cases: list[str]) -> None:
    from rega_engine.config import ParallelConfig
    from rega_engine.train.parallel import setup_runtime, teardown_runtime

    torch.set_num_threads(1)
    runtime = setup_runtime(device="cpu", dtype="fp32",
                            parallel=ParallelConfig(dp_replicate=replicate, dp_shard=shard))
    results = {case: run_case(case, data, runtime) for case in cases}
    with open(os.path.join(out_dir, f"{tag}_rank{runtime.rank}.json"), "w") as f:
        json.dump(results, f)
    teardown_runtime(runtime, finished=True)


if __name__ == "__main__":
    out, data_dir, run_tag, rep, sh, names = sys.argv[1:7]
    main(out, data_dir, run_tag, int(rep), int(sh), names.split(","))
