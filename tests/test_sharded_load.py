"""No rank holds the whole model: under FSDP2 (train/parallel.py build_model) a model loaded from
safetensors reads only each rank's rows (hf_io.load_state_dict_into with get_slice), and a random
init draws one full tensor at a time and keeps each rank's shard (_sharded_random_init), with
exactly the single process's values, on a 1 x 2 and a 2 x 2 (HSDP) mesh of gloo processes.

tests/sharded_load_worker.py runs the cases under torchrun and writes what each rank saw; the
vocabularies (257) split unevenly, and a 4-rank case has empty shards. The shard arithmetic
(hf_io.shard_region) and the init order (llama.init_order) are checked in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_hf_config  # noqa: E402

from rega_engine.model import from_config, save_pretrained  # noqa: E402
from rega_engine.model.hf_io import shard_region  # noqa: E402
from rega_engine.model.llama import RMSNorm, init_order  # noqa: E402

WORKER = Path(__file__).with_name("sharded_load_worker.py")
CASES = ("load_llama3", "init_qwen2_tied", "init_llama3_lora", "init_llama3_fp8")
# name: (processes, dp_replicate, dp_shard, extra cases)
MESHES = {"1x2": (2, 1, 2, ()), "2x2": (4, 2, 2, ("empty_shard",))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("sharded_load")
    llama3 = tiny_hf_config("llama3", vocab_size=257)
    (data / "llama3.json").write_text(json.dumps(llama3))
    (data / "qwen2_tied.json").write_text(json.dumps(tiny_hf_config(
        "qwen2", vocab_size=257, tie_word_embeddings=True)))
    # bf16 on disk (cast to the fp32 master weights on load), split over several files + index
    model = from_config(llama3, dtype=torch.float32, seed=11)
    save_pretrained(model, data / "llama3", dtype=torch.bfloat16, max_shard_size="200KB")
    assert (data / "llama3" / "model.safetensors.index.json").is_file()
    (data / "small").mkdir()
    save_file({"a": torch.arange(15.0).view(3, 5), "b": torch.tensor([7.0, 8.0])},
              data / "small" / "model.safetensors")
    return data


def _launch(data: Path, out: Path, mesh: str) -> dict[int, dict]:
    processes, replicate, shard, extra = MESHES[mesh]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(WORKER), str(out), str(data), mesh,
               str(replicate), str(shard), ",".join((*CASES, *extra))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {rank: json.loads((out / f"{mesh}_rank{rank}.json").read_text())
            for rank in range(processes)}


@pytest.fixture(scope="module")
def launched(data_dir, tmp_path_factory):
    """mesh name -> {rank: {case: what the rank saw}}, each mesh launched once, when first asked."""
    cache = {}

    def get(mesh: str) -> dict[int, dict]:
        if mesh not in cache:
            cache[mesh] = _launch(data_dir, tmp_path_factory.mktemp(mesh), mesh)
        return cache[mesh]
    return get


@pytest.fixture(params=list(MESHES))
def run(request, launched):
    """(mesh name, {rank: {case: what the rank saw}})."""
    return request.param, launched(request.param)


@pytest.mark.multiprocess
def test_safetensors_load_reads_only_each_ranks_rows_and_equals_one_process(run):
    mesh, ranks = run
    shard = MESHES[mesh][2]
    for rank, cases in ranks.items():
        seen = cases["load_llama3"]
        assert seen["mismatches"] == [], (mesh, rank)
        assert seen["compared"] == 21   # 2 layers x 9, embed, norm, lm_head
        assert seen["get_tensor"] == [], (mesh, rank)
        # every element read lands in this rank's shards: a 1/dp_shard of the model each
        assert seen["read_elements"] == seen["local_elements"]
        assert abs(seen["read_elements"] - seen["full_elements"] / shard) < 0.01 * seen[
            "full_elements"]
    # the replicas of a shard read the same rows, the shards of a replica all of them once
    assert sum(ranks[r]["load_llama3"]["read_elements"] for r in range(shard)) == \
        ranks[0]["load_llama3"]["full_elements"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("init_")])
def test_sharded_random_init_equals_from_config(run, case):
    mesh, ranks = run
    for rank, cases in ranks.items():
        seen = cases[case]
        if "skipped" in seen:
            pytest.skip(seen["skipped"])
        assert seen["mismatches"] == [], (mesh, rank)
        assert seen["compared"] == {"init_qwen2_tied": 26, "init_llama3_lora": 21 + 2 * 14,
                                    "init_llama3_fp8": 21}[case]


@pytest.mark.multiprocess
def test_empty_shards_load(launched):
    ranks = launched("2x2")
    shapes = [ranks[r]["empty_shard"]["local_shapes"] for r in range(4)]
    assert [s["a"] for s in shapes] == [[1, 5], [1, 5], [1, 5], [0, 5]]
    assert [s["b"] for s in shapes] == [[1], [1], [0], [0]]
    for rank in range(4):
        seen = ranks[rank]["empty_shard"]
        assert seen["mismatches"] == [] and seen["get_tensor"] == []
        assert seen["read_elements"] == seen["local_elements"] == [6, 6, 5, 0][rank]


def _shard(dim: int):
    from torch.distributed.tensor import Shard
    return Shard(dim)


def _replicate():
    from torch.distributed.tensor import Replicate
    return Replicate()


def _boxes(shape, placements, mesh_shape):
    """shard_region for every coordinate of the mesh, row-major."""
    import itertools
    return [shard_region(shape, placements, mesh_shape, list(coordinate))
            for coordinate in itertools.product(*(range(n) for n in mesh_shape))]


def test_shard_region_follows_torch_chunk_with_uneven_and_empty_shards():
    rows = lambda boxes: [(b[0].start, b[0].stop) for b in boxes]  # noqa: E731
    # 10 rows over 4: ceil = 3 -> 3, 3, 3, 1
    assert rows(_boxes((10, 6), [_shard(0)], (4,))) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    # 5 over 4 (torch.chunk makes 3 pieces: 2, 2, 1) and 3 over 4: the last shards are empty,
    # starting at the end of the tensor
    assert rows(_boxes((5, 6), [_shard(0)], (4,))) == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert rows(_boxes((3,), [_shard(0)], (4,))) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert rows(_boxes((0, 2), [_shard(0)], (2,))) == [(0, 0), (0, 0)]
    for shape, mesh in (((10, 6), (4,)), ((5, 6), (4,)), ((3,), (4,)), ((257, 8), (3,))):
        for box in _boxes(shape, [_shard(0)], mesh):
            assert box[1:] == tuple(slice(0, n) for n in shape[1:])
        pieces = torch.arange(shape[0]).chunk(mesh[0])
        sizes = [b[0].stop - b[0].start for b in _boxes(shape, [_shard(0)], mesh)]
        assert sizes == [len(p) for p in pieces] + [0] * (mesh[0] - len(pieces))
    # HSDP: Replicate over dp_replicate, Shard(0) over dp_shard (coordinates row-major)
    assert rows(_boxes((7, 2), [_replicate(), _shard(0)], (2, 2))) == [(0, 4), (4, 7)] * 2
    # a second Shard of the same dim splits what the first left: 7 -> (0..4, 4..7) -> halves
    assert rows(_boxes((7, 2), [_shard(0), _shard(0)], (2, 2))) == [(0, 2), (2, 4), (4, 6),
                                                                     (6, 7)]
    box = shard_region((6, 9), [_shard(1), _shard(0)], (2, 4), [1, 3])
    assert box == (slice(6, 6), slice(5, 9))   # rows 6 over 4: 2, 2, 2, none
    # anything but Shard / Replicate: None (the general path)
    from torch.distributed.tensor import Partial
    assert shard_region((4, 4), [Partial()], (2,), [0]) is None


def test_shard_region_agrees_with_torchs_private_helper_where_present():
    try:
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    except ImportError:
        pytest.skip("this torch has no _compute_local_shape_and_global_offset")
    import itertools
    cases = [((10, 6), [_shard(0)], (4,)), ((5, 6), [_shard(0)], (4,)), ((3,), [_shard(0)], (4,)),
             ((257, 8), [_replicate(), _shard(0)], (2, 3)),
             ((7, 2), [_shard(0), _shard(0)], (2, 2)), ((6, 9), [_shard(1), _shard(0)], (2, 4))]
    for shape, placements, mesh in cases:
        for coordinate in itertools.product(*(range(n) for n in mesh)):
            box = shard_region(shape, placements, mesh, list(coordinate))
            try:
                local, offset = _compute_local_shape_and_global_offset(
                    shape, mesh, list(coordinate), placements)
            except TypeError as error:   # private: another torch may take other arguments
                pytest.skip(f"_compute_local_shape_and_global_offset: {error}")
            assert tuple(s.stop - s.start for s in box) == tuple(local), (shape, coordinate)
            if all(local):   # where an empty shard starts differs between torch releases
                assert tuple(s.start for s in box) == tuple(offset), (shape, coordinate)


def _init_weights_as_before(model: nn.Module, seed: int) -> None:
    """CausalLM.init_weights as it was written before init_order: the values it must keep."""
    generator = torch.Generator().manual_seed(seed)
    std = model.args.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()


@pytest.mark.parametrize("family,overrides", [("llama3", {}), ("qwen2",
                                                               {"tie_word_embeddings": True})])
def test_init_order_covers_every_parameter_and_keeps_init_weights_values(family, overrides):
    config = tiny_hf_config(family, vocab_size=257, **overrides)
    model = from_config(config, dtype=torch.float32, seed=3)
    order = list(init_order(model))
    assert [name for name, _ in order] == [name for name, _ in model.named_parameters()]
    assert {how for name, how in order if name.endswith("bias")} <= {"zeros"}
    before = from_config(config, dtype=torch.float32, device="meta")
    before.to_empty(device="cpu")
    _init_weights_as_before(before, 3)
    for (name, got), want in zip(model.state_dict().items(), before.state_dict().values()):
        assert torch.equal(got, want), name
