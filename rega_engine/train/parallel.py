"""Where the model runs: device and process-group set-up, then the model built for it.

The model code (rega_engine/model) is single-device; everything parallel is applied here, from the
outside, one decoder block at a time (as torchtitan separates model.py from parallelize.py):
FP8 linear layers (train.precision = "fp8", train/fp8.py), then activation checkpointing, then
torch.compile, then FSDP2 `fully_shard` per block and at the root.

The mesh (built once, in setup_runtime): parallel.dp_replicate x parallel.dp_shard processes, dims
("dp_replicate", "dp_shard"), rank = replicate index * dp_shard + shard index (init_device_mesh's
row-major order), which is also the data-parallel rank the loader deals rows by. FSDP2 shards over
"dp_shard" and, given both dims, replicates over "dp_replicate" (HSDP: a reduce-scatter within
the group, then an all-reduce of the shards across groups). With dp_replicate = 1 FSDP2 gets the
"dp_shard" dim alone: plain FSDP, no all-reduce over a group of one.

With context parallelism (parallel.cp > 1) the mesh gains a third, innermost dim "cp" (so a row's
ranks are neighbours, on one node): dims ("dp_replicate", "dp_shard", "cp"), rank = (replicate
index * dp_shard + shard index) * cp + cp index. The cp ranks of a group read the same rows and
split each one (train/context_parallel.py); FSDP2 shards over dp_shard and cp flattened into one
dim, "dp_shard_cp" (as torchtitan does), since those ranks hold the same parameters too. With
tensor parallelism (parallel.tp > 1) an innermost "tp" dim follows: each block's matmuls are split
over it (train/tensor_parallel.py), its ranks read the same rows, and FSDP2 shards each tensor-
parallel piece over the data-parallel dims only (2-D FSDP + TP).

When FSDP is used: whenever the run is launched by torchrun, and whenever the compute dtype is
not fp32 (always on CUDA, where it is bf16), even in one process (then with a process group of
one). FSDP2's MixedPrecisionPolicy is what gives fp32 master weights and optimizer state with bf16
compute and fp32 gradient reduction; a plain model would have to train in bf16 or rely on
autocast, which our fused kernels do not follow. A single fp32 CPU process runs the plain model.

Large models are built on the meta device, sharded, materialised with `to_empty` (each rank
allocating only its shards) and then filled without any rank holding the whole model: from
safetensors, each rank reading only the rows of its shards (hf_io.load_state_dict_into), or, for a
random init, each rank drawing the single process's tensors one at a time and keeping its shard
(_sharded_random_init), so that one process and N processes, on any mesh, start from
bit-identical weights for a given seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rega_engine.config import ALTERNATIVES, ConfigError, ModelConfig, ParallelConfig
from rega_engine.distributed import launched_by_torchrun
from rega_engine.log import get_logger

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
log = get_logger(__name__)


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype            # compute dtype (model.dtype resolved for the device)
    rank: int
    world_size: int
    local_rank: int
    use_fsdp: bool
    mesh: object = None           # DeviceMesh ("dp_replicate", "dp_shard"[, "cp"][, "tp"])
    owns_process_group: bool = False
    dp_replicate: int = 1         # the mesh's shape (parallel.dp_replicate x parallel.dp_shard
    dp_shard: int = 1             # x parallel.cp x parallel.tp)
    cp: int = 1
    tp: int = 1
    sequence_parallel: bool = True   # parallel.sequence_parallel (with tp > 1)

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: the ranks that read different rows (all of them while there is
        no CP or TP)."""
        return self.dp_replicate * self.dp_shard

    @property
    def grad_ranks(self) -> int:
        """The ranks whose gradients FSDP2 averages: the data-parallel ranks and their cp
        ranks."""
        return self.dp_size * self.cp

    @property
    def tp_mesh(self):
        """The 1-D mesh of the ranks that split this rank's blocks (None without TP)."""
        return self.mesh["tp"] if self.tp > 1 else None

    @property
    def tp_rank(self) -> int:
        """This rank's place in its tp group (0 without tensor parallelism)."""
        return self.mesh.get_local_rank("tp") if self.tp > 1 else 0

    @property
    def counts_batch(self) -> bool:
        """Whether this rank counts its micro-batches' tokens and FLOPs in the metrics: the ranks
        of a cp or tp group share them, and one of each group counts."""
        return self.cp_rank == 0 and self.tp_rank == 0

    @property
    def cp_rank(self) -> int:
        """This rank's place in its row's cp group (0 without context parallelism)."""
        return self.mesh.get_local_rank("cp") if self.cp > 1 else 0

    @property
    def cp_group(self):
        """The process group of the ranks that split this rank's rows (None without CP)."""
        return self.mesh.get_group("cp") if self.cp > 1 else None

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate, replicate index * dp_shard + shard index: the
        deal of rows it reads (the global rank while there is no CP or TP)."""
        if self.mesh is None:
            return self.rank
        return (self.mesh.get_local_rank("dp_replicate") * self.dp_shard
                + self.mesh.get_local_rank("dp_shard"))

    @property
    def fsdp_mesh(self):
        """The mesh fully_shard gets: 2-D (HSDP) when there are replica groups, else the dp_shard
        dim alone (plain FSDP); with CP, dp_shard and cp flattened ("dp_shard_cp") stand for
        dp_shard."""
        if self.mesh is None:
            return None
        shard = "dp_shard_cp" if self.cp > 1 else "dp_shard"
        return self.mesh["dp_replicate", shard] if self.dp_replicate > 1 else self.mesh[shard]

    @property
    def distributed(self) -> bool:
        """A process group exists (collectives must be used, even with world size 1)."""
        return self.use_fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def mesh_shape(parallel: ParallelConfig | None, world_size: int,
               local_world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) for `world_size` processes, `local_world_size` of them per node,
    parallel.cp x parallel.tp of them sharing each data-parallel rank's rows: -1 takes what the
    other leaves, dp_shard "auto" the node's processes (over cp x tp). A ConfigError naming the
    keys when they do not multiply to the world size."""
    parallel = parallel or ParallelConfig()
    replicate, shard = parallel.dp_replicate, parallel.dp_shard
    inner = {key: value for key, value in (("cp", parallel.cp), ("tp", parallel.tp)) if value > 1}
    given = (f"parallel.dp_replicate = {replicate!r}, parallel.dp_shard = {shard!r}"
             f"{''.join(f', parallel.{key} = {value}' for key, value in inner.items())}"
             f"{f' (LOCAL_WORLD_SIZE {local_world_size})' if shard == 'auto' else ''}")
    split = 1   # processes that share each data-parallel rank's rows
    for key, value in inner.items():
        split *= value
        if world_size % split:
            raise ConfigError(f"{given}: parallel.{key} = {value} does not divide the "
                              f"{world_size} process(es) (WORLD_SIZE)")
    world_size //= split
    if shard == "auto":
        shard = max(local_world_size // split, 1)
    for key, value, other in (("parallel.dp_replicate", replicate, shard),
                              ("parallel.dp_shard", shard, replicate)):
        if value == -1:
            if world_size % other:
                raise ConfigError(f"{given}: {key} = -1 takes what the other leaves of the "
                                  f"{world_size} process(es), but {other} does not divide "
                                  f"{world_size}")
    if replicate == -1:
        replicate = world_size // shard
    if shard == -1:
        shard = world_size // replicate
    if replicate * shard != world_size:
        inner_text = "".join(f" x {value}" for value in inner.values())
        keys = "".join(f" x parallel.{key}" for key in inner)
        raise ConfigError(f"{given}: a mesh of {replicate} x {shard}{inner_text} = "
                          f"{replicate * shard * split} process(es), but this run has "
                          f"{world_size * split} (WORLD_SIZE); make parallel.dp_replicate x "
                          f"parallel.dp_shard{keys} equal it, or set one of the first two to -1 "
                          "to take what the other leaves")
    return replicate, shard


def setup_runtime(device: str = "auto", dtype: str = "auto",
                  timeout_s: float | None = None,
                  parallel: ParallelConfig | None = None) -> Runtime:
    """Picks the device and compute dtype, and initialises the process group when launched by
    torchrun (NCCL on GPUs, gloo on CPU) or for mixed precision (a group of one, for FSDP2; where
    that cannot start, one warning and no group: _start_group_of_one). The values are
    train.device and model.dtype as validate_config checked them; timeout_s
    (train.collective_timeout_s) is how long a collective waits for the other ranks before it
    fails (torch's default, 10 to 30 minutes, where None). `parallel` ([parallel]) shapes the
    mesh (mesh_shape); its product is checked against the world size before any group starts."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use --train.device=cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    torchrun = launched_by_torchrun()
    rank = int(os.environ.get("RANK", 0)) if torchrun else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if torchrun else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if torchrun else 0
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                               "CUDA device(s) visible: --nproc_per_node must not exceed the GPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    compute_dtype = resolve_dtype(dtype, dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if torchrun else 1
    # Before the process group: a wrong shape fails at once on every rank, not in a collective.
    replicate, shard = mesh_shape(parallel, world, local_world)
    cp, tp = (parallel or ParallelConfig()).cp, (parallel or ParallelConfig()).tp
    use_fsdp = torchrun or compute_dtype != torch.float32
    owns = False
    mesh = None
    if use_fsdp and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        if timeout_s is not None:
            # gloo raises in the waiting collective; NCCL's watchdog aborts the process.
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if torchrun:
            dist.init_process_group(backend, **kwargs)
            owns = True
        else:
            owns = use_fsdp = _start_group_of_one(backend, dev, compute_dtype, kwargs)
    if use_fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        shape, names = (replicate, shard), ("dp_replicate", "dp_shard")
        if cp > 1:
            shape, names = (*shape, cp), (*names, "cp")
        if tp > 1:   # innermost: a block's ranks on one node
            shape, names = (*shape, tp), (*names, "tp")
        mesh = init_device_mesh(dev.type, shape, mesh_dim_names=names,
                                backend_override=_subgroup_timeouts(shape, dev, timeout_s))
        if cp > 1:   # the dim FSDP2 shards over (Runtime.fsdp_mesh)
            mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        rank, world = dist.get_rank(), dist.get_world_size()
    elif cp > 1 or tp > 1:
        raise ConfigError("parallel.cp / parallel.tp > 1 need a process group (torchrun, or a "
                          "mixed-precision run); this process has none")
    return Runtime(device=dev, dtype=compute_dtype, rank=rank, world_size=world,
                   local_rank=local_rank,
                   use_fsdp=use_fsdp, mesh=mesh, owns_process_group=owns,
                   dp_replicate=replicate, dp_shard=shard, cp=cp, tp=tp,
                   sequence_parallel=(parallel or ParallelConfig()).sequence_parallel)


def _subgroup_timeouts(shape: tuple[int, ...], device: torch.device,
                       timeout_s: float | None) -> dict | None:
    """init_device_mesh's backend_override giving the mesh's own process groups (a dim smaller than
    the world) train.collective_timeout_s: torch creates them with its default timeout (30 min for
    gloo), not the default group's. A dim spanning the world reuses the default group (it already
    has the timeout; an override would make torch create a second one)."""
    if timeout_s is None:
        return None
    world = dist.get_world_size()
    backend = "nccl" if device.type == "cuda" else "gloo"
    overrides = {}
    try:   # the options types are torch's (Gloo's private): a release without them keeps defaults
        options_type = dist.ProcessGroupNCCL.Options if backend == "nccl" \
            else dist.ProcessGroupGloo._Options
        for dim, size in enumerate(shape):
            if size < world:
                options = options_type()
                options._timeout = timedelta(seconds=timeout_s)
                overrides[dim] = (backend, options)
    except (AttributeError, TypeError) as error:
        log.warning(f"the mesh's process groups keep torch's default timeout ({error}); "
                    "train.collective_timeout_s holds for the default group only")
        return None
    return overrides or None


def _start_group_of_one(backend: str, device: torch.device, compute_dtype: torch.dtype,
                        kwargs: dict) -> bool:
    """The process group of one that FSDP2's mixed precision needs in a single process. Where the
    backend cannot start (NCCL in a container without the shared memory or the devices it
    wants), says so in one line and returns False: the run goes on without the group and without
    FSDP2, its weights and optimizer state in the compute dtype."""
    try:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        # NCCL may set up its communicator lazily: one collective now, so that a failure shows
        # here and not in the middle of the first step.
        probe = torch.zeros(1, device=device)
        dist.all_reduce(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # DistBackendError and plain RuntimeErrors alike
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # the half-made group is dropped either way
                pass
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        dtype_name = str(compute_dtype).removeprefix("torch.")
        log.warning(f"{backend.upper()} could not start a process group of one ({reason}); "
                    f"training on {device} without it: no FSDP2, so the weights and the optimizer "
                    f"state are {dtype_name} instead of fp32 master weights")
        return False
    return True


def teardown_runtime(runtime: Runtime, *, finished: bool = False) -> None:
    """Ends the process group this process started. `finished`: every rank got here the same way
    (a run that ended normally), so they first wait for each other: none closes its connections
    while a peer may still be reading its last collective (a gloo peer whose socket is reset then
    aborts). After a failure there is no waiting: the ranks left may never come."""
    if runtime.owns_process_group and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.dtype (one of config.MODEL_DTYPES): the compute dtype. auto = bf16 on GPU, fp32 on
    CPU. fp16 is a valid model.dtype (distill and eval run in it) but not one to train in."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "fp16":
        raise ConfigError("model.dtype = 'fp16': training in fp16 needs loss scaling, which this "
                          "loop does not do; use bf16 (or fp32)")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------
# Per-block transformations


def checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing of one block: keep only its input, recompute inside in backward.

    The block's forward is replaced on the instance rather than wrapping the module, so parameter
    names stay transformers' own (`model.layers.0.mlp...`): checkpoints, the safetensors loader
    and the export see the same names with and without checkpointing.
    """
    from torch.utils.checkpoint import checkpoint
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def compile_block(block: nn.Module) -> None:
    """torch.compile of one block's forward (after checkpoint_block, so the checkpoint is traced
    as part of the graph). The forward function is compiled, not the module: FSDP2's hooks, which
    run around the forward, stay outside the graph (with `module.compile()` they would sit at its
    start and Dynamo skips the whole call), and parameter names stay unchanged."""
    block.forward = torch.compile(block.forward)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype) -> None:
    """fully_shard each decoder block, then the root (embeddings, final norm, LM head). A 2-D
    mesh ("dp_replicate", "dp_shard") makes it HSDP."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:   # torch 2.4 / 2.5 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = {"mesh": mesh}
    if param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                   reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, block in enumerate(layers):
        # The last block's parameters are needed again at once by the backward: keep them.
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Building the model


def model_source(config: ModelConfig) -> tuple[str, Path]:
    """("path", dir) or ("init_config", file); a clear error naming what is missing."""
    if config.path and config.init_config:
        # Both from one source (the file, or the command line): load_config only settles a
        # command-line key against the file's (config.ALTERNATIVES).
        raise ConfigError(f"model.path = {config.path!r} and model.init_config = "
                          f"{config.init_config!r} are both set; give one: "
                          f"{ALTERNATIVES[('model.path', 'model.init_config')]}")
    if config.path:
        path = Path(config.path)
        if not path.is_dir():
            raise FileNotFoundError(f"model.path = {path}: no such directory (expected a Hugging "
                                    "Face checkpoint with config.json and safetensors)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path = {path}: {path / 'config.json'} not found")
        return "path", path
    if config.init_config:
        path = Path(config.init_config)
        if not path.exists():
            raise FileNotFoundError(f"model.init_config = {path}: no such file (expected a "
                                    "Hugging Face config.json)")
        return "init_config", path
    raise ConfigError("no model: set model.path (a Hugging Face checkpoint directory) or "
                      "model.init_config (a config.json to initialise randomly from)")


def build_model(config: ModelConfig, runtime: Runtime, *, seed: int, precision: str = "bf16",
                fp8_recipe: str = "tensorwise", lora=None) -> tuple[nn.Module, torch.dtype]:
    """The model on runtime.device, parallelised and with its weights; returns (model, compute
    dtype). `precision` and `fp8_recipe` are train.precision and train.fp8_recipe; with "fp8"
    the decoder blocks' linear layers are converted first (train/fp8.py) and model.fp8_summary
    says what was (None otherwise). The values are those validate_config checked."""
    from rega_engine.model import from_config, from_pretrained, load_state_dict_into

    kind, source = model_source(config)
    compute_dtype = runtime.dtype
    if precision == "fp8":   # before anything is built: an A100 is refused at once
        from rega_engine.train.fp8 import check_fp8_supported
        check_fp8_supported(runtime.device)

    if runtime.use_fsdp:
        # fp32 master weights; the mixed-precision policy casts to the compute dtype per block.
        if kind == "path":
            model = from_pretrained(source, dtype=torch.float32, device="meta")
        else:
            model = from_config(source, dtype=torch.float32, device="meta")
    elif kind == "path":
        model = from_pretrained(source, dtype=compute_dtype, device=runtime.device)
    else:
        model = from_config(source, dtype=compute_dtype, device="cpu", seed=seed).to(runtime.device)

    model.attention_backend = config.attention_backend
    model.cross_entropy_backend = config.cross_entropy_backend
    model.fp8_summary = None
    if precision == "fp8":
        # torchtitan's order: FP8 first, then checkpointing, compile and fully_shard, so that
        # those wrap the FP8 layers and FSDP sees the FP8 all-gather weights (tensorwise).
        from rega_engine.train.fp8 import apply_fp8
        model.fp8_summary = apply_fp8(model, fp8_recipe, fsdp=runtime.use_fsdp)
    if lora is not None and lora.rank:   # [lora]: frozen weights, adapters trained (model/lora.py)
        from rega_engine.model.lora import LoRASettings, apply_lora
        apply_lora(model, LoRASettings.from_config(lora))
    if runtime.tp > 1:   # torchtitan's order: TP, then checkpointing, compile and fully_shard
        from rega_engine.train.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, runtime.tp_mesh, runtime.sequence_parallel)
    for block in model.model.layers:
        if config.activation_checkpointing == "block":
            checkpoint_block(block)
        if config.compile:
            compile_block(block)

    if runtime.use_fsdp:
        apply_fsdp(model, runtime.fsdp_mesh, compute_dtype)
        model.to_empty(device=runtime.device)
        if kind == "path":
            load_state_dict_into(model, source)
        else:
            _sharded_random_init(model, seed)
    if lora is not None and lora.rank:
        from rega_engine.model.lora import init_lora_weights
        init_lora_weights(model, seed)
    return model, compute_dtype


@torch.no_grad()
def _sharded_random_init(model: nn.Module, seed: int) -> None:
    """The random init of a materialised (sharded) model, bit for bit what one process gets from
    `from_config(..., seed=seed)` (CausalLM.init_weights on the CPU), whatever the mesh, and
    without communication: every rank walks the base model's parameters in init order (llama's
    init_order, on a meta-device CausalLM of the model's args, so that LoRA adapters, FP8 linears
    and wrappers change nothing), draws each normal tensor whole in fp32 on the CPU from one
    generator seeded with `seed`, keeps the part its shard holds and drops the rest. Host memory
    peaks at the rank's shards plus one full tensor; every rank spends the CPU time of drawing the
    whole model once. LoRA adapters are left to init_lora_weights."""
    from torch.distributed.tensor import DTensor

    from rega_engine.model.hf_io import _copy_into, _expected_tensors, _list
    from rega_engine.model.llama import INIT_NORMAL, INIT_ZEROS, CausalLM, init_order

    targets = _expected_tensors(model)   # canonical names, LoRA adapters left out
    order = list(init_order(CausalLM(model.args, device="meta")))
    differ = {name for name, _ in order} ^ set(targets)
    if differ:
        raise RuntimeError(f"random init: the model's parameters and its init order differ in "
                           f"{_list(differ)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    std = model.args.initializer_range
    for name, how in order:
        target = targets[name]
        if how == INIT_NORMAL:
            full = torch.empty(tuple(target.shape), dtype=torch.float32)
            full.normal_(0.0, std, generator=generator)
            _copy_into(target, full)
            del full
        else:
            local = target.to_local() if isinstance(target, DTensor) else target
            local.fill_(0.0 if how == INIT_ZEROS else 1.0)
