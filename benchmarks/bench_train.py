"""End-to-end training throughput: rega-engine against Hugging Face baselines, side by side.

One fixed SFT-like set of samples (log-normal lengths, median ~350 tokens, capped at the row
length; a random prompt share of each sample carries no loss) is trained on by every system, with
the same samples in every optimizer step (so the same real tokens per step), the same optimizer
(AdamW, lr 1e-5, no weight decay, gradient clipping at 1.0), the same initial weights and the
same objective (mean cross-entropy over the step's label tokens):

  rega            rega-engine: PackedLoader (C++ packer) rows, our model, our Triton kernels,
                  the training loop's own optimizer_step (rega_engine/train/loop.py)
  rega-compile    the same with torch.compile on every decoder block
  rega-fullgraph  the same with torch.compile(model, fullgraph=True): forward, fused loss and
                  backward as one graph (every kernel is a custom op Dynamo sees through);
                  compiled systems report graphs_compiled, graph_breaks and graphs_per_step
  rega-fp8, rega-compile-fp8
                  the same two with train.precision = "fp8" (torchao float8, tensorwise: the
                  decoder blocks' linear layers in FP8, weights all-gathered in FP8); sm_89+
                  GPUs and torchao only (on CPU they run, slowly, through torch._scaled_mm).
                  FP8 pays off with torch.compile, which fuses its scaling and casts
  hf-padded       transformers, SDPA attention, samples padded to the longest of each micro-batch:
                  the step of transformers.Trainer with its default collator, written as a plain
                  forward/backward/clip/AdamW loop (the Trainer's own bookkeeping is not timed)
  hf-flatten      transformers, padding-free: DataCollatorWithFlattening (flash_attention_2 when
                  flash-attn is installed, else SDPA with transformers' packed-sequence mask)
  hf-flatten-liger  the same with Liger kernels (CUDA and liger-kernel installed only)
  hf-rega         transformers patched by rega_engine.integrations.hf (our kernels behind HF's
                  hooks) with its PaddingFreeCollator: varlen attention and the fused loss
  hf-rega-all     the same with every kernel patched: also RMSNorm, rotary embedding and SwiGLU

Every system runs in its own process (clean memory peaks, no compile caches shared). Reported per
system: real (non-padding) tokens/s, MFU (null on CPU and unknown GPUs; PaLM's definition, see
rega_engine/train/metrics.py, real tokens only), peak memory, step time, the loss of the first
step (a check that all train the same thing) and the ratio of rega's tokens/s to each baseline.
Results go to benchmarks/results/bench_train_<device>.{json,md,png}.

    python benchmarks/bench_train.py --quick      # ~2 minutes on a 2-core CPU (tiny shape)
    rega-engine bench                             # 1B and 3B Llama shapes on a GPU
    rega-engine bench --shapes 1b --systems rega,hf-padded --steps 20
    rega-engine bench --shapes 1b,8b-layers --systems rega-compile,rega-compile-fp8   # FP8 vs bf16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# The helpers beside this file, also when run with PYTHONSAFEPATH=1 (gpu_check's in-place mode).
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MEDIAN_LENGTH = 350
LENGTH_SIGMA = 1.0        # as benchmarks/bench_packer.py
LR = 1e-5
MAX_GRAD_NORM = 1.0

# Random-init Llama shapes (Llama 3.2 1B / 3B: tied embeddings, llama3 rope); `tiny` keeps the
# comparison runnable on any CPU.
_LLAMA3_ROPE = {"rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
SHAPES = {
    "tiny": {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
             "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
             "rope_theta": 10000.0},
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
           "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
           "tie_word_embeddings": True,
           **_LLAMA3_ROPE},
    "3b": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
           "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
           "tie_word_embeddings": True,
           **_LLAMA3_ROPE},
    # Llama 3.1 8B's layers (the GEMM shapes that decide FP8's gain), 4 of its 32, so that one GPU
    # measures them in seconds.
    "8b-layers": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "head_dim": 128, "tie_word_embeddings": False, **_LLAMA3_ROPE},
}
# Per shape: row length, rows per micro-batch, micro-batches per step, samples per padded
# micro-batch (the Trainer's per_device_train_batch_size) and activation checkpointing (all
# systems).
RUN_SETTINGS = {
    "tiny": {"seq_len": 1024, "rows": 2, "grad_accum": 1, "padded_batch": 4,
             "checkpointing": False},
    "1b": {"seq_len": 2048, "rows": 4, "grad_accum": 2, "padded_batch": 4, "checkpointing": False},
    "3b": {"seq_len": 2048, "rows": 2, "grad_accum": 4, "padded_batch": 2, "checkpointing": True},
    "8b-layers": {"seq_len": 8192, "rows": 1, "grad_accum": 1, "padded_batch": 1,
                  "checkpointing": False},
}
SYSTEMS = ("rega", "rega-compile", "rega-fullgraph", "rega-fp8", "rega-compile-fp8", "hf-padded",
           "hf-flatten",
           "hf-flatten-liger", "hf-rega", "hf-rega-all")
# The engine's systems: (torch.compile per block, train.precision).
# compile: False, True (per block) or "model" (the whole model, fullgraph=True).
ENGINE_SYSTEMS = {"rega": (False, "bf16"), "rega-compile": (True, "bf16"),
                  "rega-fullgraph": ("model", "bf16"),
                  "rega-fp8": (False, "fp8"), "rega-compile-fp8": (True, "fp8")}
# Each FP8 system against the same system in bf16 (its "fp8_speedup").
FP8_BASELINE = {"rega-fp8": "rega", "rega-compile-fp8": "rega-compile"}
OURS = "rega"
BASELINES = ("hf-padded", "hf-flatten", "hf-flatten-liger")


# --------------------------------------------------------------------------------------------
# The samples and the steps


def write_samples(path: Path, shape: dict, settings: dict, num_samples: int, seed: int):
    """A prepared dataset (rega_engine TokenDataset) of SFT-like samples."""
    from rega_engine.data import TokenDatasetWriter
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(MEDIAN_LENGTH), LENGTH_SIGMA, num_samples), 16,
                      settings["seq_len"]).astype(np.int64)
    with TokenDatasetWriter(path, domains=["general"], kind_weights={}, pad_id=0,
                            vocab_size=shape["vocab_size"], seq_len=settings["seq_len"]) as writer:
        for n in lengths:
            tokens = rng.integers(4, shape["vocab_size"], size=n)
            prompt = int(n * rng.uniform(0.2, 0.5))
            writer.add(tokens, np.arange(n) >= prompt, kind=0, domain=0)
    return lengths


def plan_micro_batches(dataset_dir: Path, settings: dict, count: int) -> list[list[int]]:
    """The sample ids of each of the engine's first `count` micro-batches, read back from the
    PackedLoader's own batches (documents matched to samples by their tokens), so that every
    baseline trains on exactly the samples the engine packs into each step."""
    from rega_engine.data import TokenDataset
    dataset = TokenDataset(dataset_dir)
    by_content = {}
    for i in range(len(dataset)):
        tokens, _ = dataset.sample(i)
        by_content[np.asarray(tokens, dtype=np.int64).tobytes()] = i
    loader = _engine_loader(dataset_dir, settings)
    plan = []
    for batch in loader:
        flat = batch.input_ids.reshape(-1).numpy()
        kinds = batch.kind_ids.reshape(-1).numpy()
        cu = batch.cu_seqlens.tolist()
        ids = [by_content[flat[s:e].tobytes()] for s, e in zip(cu, cu[1:]) if e > s and kinds[s]
               >= 0]
        if sum(int(dataset.offsets[i + 1] - dataset.offsets[i])
               for i in ids) != batch.num_real_tokens:
            raise RuntimeError("bench_train: could not match the packed documents back to samples")
        plan.append(ids)
        if len(plan) == count:
            return plan
    raise RuntimeError(f"bench_train: the dataset fills only {len(plan)} micro-batches, {count} "
                       "needed; raise the sample count")


def _engine_loader(dataset_dir: Path, settings: dict):
    from rega_engine.data import PackedLoader
    # Shuffled rows as in training (best-fit-decreasing opens its bins longest first, so the first
    # rows in plan order hold only the longest samples); seeded, so that the plan above and the
    # engine's worker see the very same batches.
    return PackedLoader(dataset_dir, seq_len=settings["seq_len"], batch_size=settings["rows"],
                        shuffle=True,
                        seed=settings["loader_seed"])


# --------------------------------------------------------------------------------------------
# Workers: one system, one process


def _hf_config(shape: dict):
    from transformers import LlamaConfig
    config = LlamaConfig(**shape, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
    # With a cache, transformers skips its packed-sequence mask; a training step needs no cache.
    config.use_cache = False
    return config


def _initial_state(shape: dict, seed: int):
    """Our random init (transformers' recipe), so that every system starts from the same weights."""
    import torch

    from rega_engine.model import from_config
    return from_config({**shape, "model_type": "llama"}, dtype=torch.float32, device="cpu",
                       seed=seed).state_dict()


def _samples(dataset, ids):
    """HF features for the given sample ids: input_ids and unshifted labels (-100 on the prompt)."""
    features = []
    for i in ids:
        tokens, mask = dataset.sample(i)
        tokens = np.asarray(tokens, dtype=np.int64)
        labels = np.where(np.asarray(mask, dtype=bool), tokens, -100)
        features.append({"input_ids": tokens.tolist(), "labels": labels.tolist()})
    return features


def _padded_micro_batches(features, size: int):
    """The Trainer's default collation for causal LMs: right padding, attention_mask, labels
    -100."""
    import torch
    batches = []
    for start in range(0, len(features), size):
        chunk = features[start:start + size]
        longest = max(len(f["input_ids"]) for f in chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        labels = torch.full((len(chunk), longest), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), longest, dtype=torch.long)
        for row, f in enumerate(chunk):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


def _adamw(model, device):
    import torch
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                             weight_decay=0.0, **kind)


def _setup_engine(spec: dict, compile_blocks: bool | str, precision: str = "bf16"):
    import torch

    from rega_engine.config import ModelConfig
    from rega_engine.train.loop import optimizer_step
    from rega_engine.train.parallel import build_model, setup_runtime

    runtime = setup_runtime("cuda" if spec["device"] == "cuda" else "cpu")
    config_path = Path(spec["work_dir"]) / "config.json"
    model_config = ModelConfig(init_config=str(config_path), compile=compile_blocks is True,
                               activation_checkpointing="block"
                               if spec["settings"]["checkpointing"] else "none")
    model, _ = build_model(model_config, runtime, seed=spec["seed"], precision=precision)
    whole_model = compile_blocks == "model"
    if whole_model:
        # forward, loss and backward as one graph: our kernels are custom ops Dynamo sees
        # through (rega_engine/model/llama.py); cu_seqlens is marked dynamic per micro-batch
        model = torch.compile(model, fullgraph=True)
    optimizer = _adamw(model, runtime.device)
    batches = iter(_engine_loader(Path(spec["dataset_dir"]), spec["settings"]))
    accum = spec["settings"]["grad_accum"]

    def step(index: int):
        host = [next(batches) for _ in range(accum)]
        expected = spec["step_tokens"][index]
        if sum(b.num_real_tokens for b in host) != expected:
            raise RuntimeError(f"step {index}: the loader gave "
                               f"{sum(b.num_real_tokens for b in host)} real "
                               f"tokens, the plan {expected}")
        micro = [b.to(runtime.device) for b in host]
        if whole_model:
            for b in micro:   # another document count must not recompile the graph
                torch._dynamo.mark_dynamic(b.cu_seqlens, 0)
        # The training loop's own step (forward/backward, clipping, its finite-loss check with
        # the step's one host sync, AdamW, FP8's scale precompute), so that this measures the
        # code users run.
        result = optimizer_step(model, optimizer, micro, lr=LR, grad_clip=MAX_GRAD_NORM,
                                step=index + 1, world_size=runtime.world_size,
                                distributed=runtime.distributed)
        if compile_blocks:
            _count_graphs(info)
        return result.loss_value, sum(b.input_ids.numel() for b in host)

    info = {"attention": "rega varlen (Triton)" if runtime.device.type == "cuda"
            else "rega varlen (PyTorch reference on CPU)", "precision": precision}
    if model.fp8_summary is not None:
        info["fp8"] = model.fp8_summary.describe().splitlines()[0]
    if compile_blocks:
        _count_graphs(info)
    return runtime.device, step, info


def _count_graphs(info: dict) -> None:
    """Dynamo's totals so far into the system's row: graphs compiled (a recompile adds one),
    graph breaks, and per step the graphs each step adds (0 once warm)."""
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    history = info.setdefault("graphs_per_step", [])
    if "graphs_compiled" in info:
        history.append(graphs - info["graphs_compiled"])
    info["graphs_compiled"] = graphs
    info["graph_breaks"] = sum(counters["graph_break"].values())


def _setup_hf(spec: dict, system: str):
    import torch
    from transformers import DataCollatorWithFlattening, LlamaForCausalLM

    from rega_engine.data import TokenDataset

    device = torch.device(spec["device"])
    config = _hf_config(spec["shape"])
    info = {}
    with torch.device(device):
        model = LlamaForCausalLM(config).float()
    missing, unexpected = model.load_state_dict(_initial_state(spec["shape"], spec["seed"]),
                                                strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers' Llama: missing {missing}, "
                           f"unexpected {unexpected}")
    attention = "sdpa"
    if system in ("hf-flatten",
                  "hf-flatten-liger") and device.type == "cuda" and importable("flash_attn"):
        # what padding-free training with transformers is meant for
        attention = "flash_attention_2"
    model.set_attn_implementation(attention)
    if system == "hf-flatten-liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model)
    if system in ("hf-rega", "hf-rega-all"):
        from rega_engine.integrations.hf import apply_rega_kernels
        every = system == "hf-rega-all"     # hf-rega: attention and loss only, as before
        apply_rega_kernels(model, rms_norm=every, rope=every, swiglu=every)
    if spec["settings"]["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    info["attention"] = model.config._attn_implementation

    dataset = TokenDataset(spec["dataset_dir"])
    accum = spec["settings"]["grad_accum"]
    if system in ("hf-rega", "hf-rega-all"):
        from rega_engine.integrations.hf import PaddingFreeCollator
        collate = PaddingFreeCollator()
    else:
        collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    # Collation happens before the clock starts (the Trainer would collate inside its loop).
    steps = []
    for index in range(spec["num_steps"]):
        micro_ids = spec["plan"][index * accum:(index + 1) * accum]
        if system == "hf-padded":
            micro = [b for ids in micro_ids for b in _padded_micro_batches(_samples(dataset, ids),
                                                                             spec["settings"]["padded_batch"])]
        else:
            micro = [collate(_samples(dataset, ids)) for ids in micro_ids]
        if device.type == "cuda":     # the Trainer's DataLoader pins memory by default
            micro = [{k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in b.items()}
                     for b in micro]
        # Trainer semantics: each micro-batch's summed loss over the step's target count.
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        steps.append((micro, targets))
    optimizer = _adamw(model, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step(index: int):
        micro, targets = steps[index]
        num_items = torch.tensor(targets, device=device)
        total = torch.zeros((), device=device)
        for b in micro:
            b = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                 for k, v in b.items()}
            if autocast is not None:
                with autocast:
                    loss = model(**b, num_items_in_batch=num_items).loss
            else:
                loss = model(**b, num_items_in_batch=num_items).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total, sum(b["input_ids"].numel() for b in micro)

    return device, step, info


class Worker:
    """One system in one process: set up, then timed optimizer steps, then the summary."""

    def __init__(self, spec: dict, system: str):
        import torch

        from rega_engine.model import from_config

        self.spec, self.system = spec, system
        torch.manual_seed(spec["seed"])
        if system in ENGINE_SYSTEMS:
            compile_blocks, precision = ENGINE_SYSTEMS[system]
            self.device, self._step, self.info = _setup_engine(spec, compile_blocks, precision)
        else:
            self.device, self._step, self.info = _setup_hf(spec, system)
        self.meta_model = from_config({**spec["shape"], "model_type": "llama"}, device="meta")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.times, self.losses, self.processed = {}, {}, {}

    def _sync(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, index: int) -> float:
        """Runs step `index`; returns its wall time in seconds."""
        self._sync()
        started = time.perf_counter()
        loss, processed = self._step(index)
        self.losses[index] = float(loss)       # the step's one host sync (rega: already done)
        self._sync()
        self.times[index] = time.perf_counter() - started
        self.processed[index] = processed
        return self.times[index]

    def result(self) -> dict:
        from rega_engine.train.metrics import device_peak_flops, peak_memory_bytes
        spec = self.spec
        timed = range(spec["warmup"], spec["num_steps"])
        times = [self.times[i] for i in timed]
        seconds = sum(times)
        real_tokens = sum(spec["step_tokens"][i] for i in timed)
        flops = sum(self.meta_model.flops_per_token() * spec["step_tokens"][i]
                    + self.meta_model.attention_flops(spec["step_doc_lengths"][i]) for i in timed)
        peak = device_peak_flops(self.device)
        return {
            "system": self.system, "status": "ok", **self.info,
            "tokens_per_s": real_tokens / seconds,
            "mfu": None if peak is None else flops / (seconds * peak),
            "step_time_s": statistics.median(times),
            "step_time_mean_s": seconds / len(times),
            "peak_memory_gib": peak_memory_bytes(self.device) / 2**30,
            "peak_memory_kind": "max allocated (CUDA)" if self.device.type == "cuda"
            else "peak RSS of the process",
            "real_tokens_per_step": real_tokens / len(times),
            "processed_tokens_per_step": sum(self.processed[i] for i in timed) / len(times),
            "warmup_s": sum(self.times[i] for i in range(spec["warmup"])),
            "loss_first_step": self.losses[0],
            "loss_last_step": self.losses[spec["num_steps"] - 1],
        }


def run_worker(spec_path: str, system: str, result_path: str, interleaved: bool) -> None:
    """Sequential: every step at once. Interleaved: READY, then one step per `STEP i` line on
    stdin (answered with its time), and the summary on `FINISH`."""
    worker = Worker(json.loads(Path(spec_path).read_text()), system)
    if not interleaved:
        for index in range(worker.spec["num_steps"]):
            worker.step(index)
    else:
        print("READY", flush=True)
        for line in sys.stdin:
            command = line.split()
            if command and command[0] == "STEP":
                print(f"DONE {worker.step(int(command[1])):.6f}", flush=True)
            elif command == ["FINISH"]:
                break
    Path(result_path).write_text(json.dumps(worker.result()))


# --------------------------------------------------------------------------------------------
# The driver


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("rega-engine", "torch", "transformers", "triton", "accelerate", "liger-kernel",
                 "flash-attn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _device_description(device: str) -> tuple[str, str]:
    """(human-readable name, file-name slug)."""
    import torch
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} ({os.cpu_count()} cores)"
    slug = "".join(c if c.isalnum() else "-" for c in (torch.cuda.get_device_name(0) if device
                                                       == "cuda"
                                                          else f"cpu-{os.cpu_count()}core")).lower()
    return name, "-".join(part for part in slug.split("-") if part)


def importable(module: str) -> bool:
    """Whether an optional package imports: one that is present but broken (built for another
    torch, say) counts as missing, so that its system is skipped rather than failed."""
    import importlib
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def _skip_reason(system: str, device: str) -> str | None:
    if system == "hf-flatten-liger":
        if device != "cuda":
            return "Liger kernels need CUDA"
        if not importable("liger_kernel.transformers"):
            return "liger-kernel is not installed (or does not import)"
    if system in FP8_BASELINE:
        from rega_engine.errors import ConfigError
        from rega_engine.train.fp8 import check_fp8_supported
        try:   # torchao installed, torch new enough, a GPU with FP8 tensor cores
            check_fp8_supported("cuda:0" if device == "cuda" else "cpu")
        except ConfigError as error:
            return str(error)
    return None


def _worker_command(system: str, spec_path: Path, result_path: Path,
                    interleaved: bool) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--spec",
            str(spec_path),
            "--result", str(result_path)] + (["--interleaved"] if interleaved else [])


def _failure(system: str, status: str, text: str, wall: float) -> dict:
    tail = text.strip().splitlines()[-12:]
    text = "\n".join(tail)
    if status == "error" and ("OutOfMemoryError" in text or "out of memory" in text.lower()):
        status = "oom"
    return {"system": system, "status": status, "reason": tail[-1] if tail else status,
            "stderr_tail": text, "wall_s": wall}


def _run_sequential(system: str, spec_path: Path, work_dir: Path, timeout: float) -> dict:
    from _procs import run_bounded

    result_path = work_dir / f"result-{system}.json"
    # Its own process group, ended whole at the timeout: torch.compile's worker processes with it.
    done = run_bounded(_worker_command(system, spec_path, result_path, False), timeout,
                       work_dir / f"log-{system}.txt")
    if done.timed_out:
        return {"system": system, "status": "timeout",
                "reason": f"no result within {timeout:.0f} s", "stderr_tail": done.tail(1500),
                "wall_s": done.seconds}
    if done.returncode == 0 and result_path.exists():
        return {**json.loads(result_path.read_text()), "wall_s": done.seconds}
    return _failure(system, "error", done.tail() or f"exit code {done.returncode}", done.seconds)


class _Turns:
    """A worker process that runs one step per request (see run_worker)."""

    def __init__(self, system: str, spec_path: Path, work_dir: Path):
        self.system = system
        self.result_path = work_dir / f"result-{system}.json"
        self.log_path = work_dir / f"stderr-{system}.txt"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(_worker_command(system, spec_path, self.result_path, True),
                                     text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.started = time.perf_counter()
        self.row = None          # set once it failed or finished

    def _read(self, deadline: float) -> str | None:
        import select
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return ""        # the worker died
                if line.startswith(("READY", "DONE")):
                    return line
                # anything else a library printed to stdout is not ours: skip it

    def _fail(self, status: str, reason: str | None = None) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        text = self.log_path.read_text()
        self.row = _failure(self.system, status, text if status == "error" else reason or status,
                            time.perf_counter() - self.started)
        if reason:
            self.row["reason"] = reason

    def expect(self, timeout: float, command: str | None = None) -> bool:
        if self.row is not None:
            return False
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        # The budget runs from the start for the set-up, from the request for a step: the other
        # systems' turns do not count against this one.
        line = self._read((self.started if command is None else time.perf_counter()) + timeout)
        if line is None:
            self._fail("timeout", f"{command or 'set-up'}: no answer within {timeout:.0f} s")
        elif not line:
            self._fail("error")
        return self.row is None

    def finish(self) -> None:
        if self.row is not None:
            return
        self.proc.stdin.write("FINISH\n")
        self.proc.stdin.close()
        code = self.proc.wait()
        self.log.close()
        wall = time.perf_counter() - self.started
        if code == 0 and self.result_path.exists():
            self.row = {**json.loads(self.result_path.read_text()), "wall_s": wall}
        else:
            self.row = _failure(self.system, "error", self.log_path.read_text()
                                or f"exit code {code}", wall)


def _run_interleaved(systems: list[str], spec_path: Path, work_dir: Path, timeout: float,
                     num_steps: int) -> dict[str, dict]:
    """All systems set up side by side, then take turns step by step (in a rotating order), so
    that a machine shared with other work slows every system alike."""
    workers = [_Turns(system, spec_path, work_dir) for system in systems]
    for worker in workers:
        worker.expect(timeout)                                   # READY
    for index in range(num_steps):
        turn = workers[index % len(workers):] + workers[:index % len(workers)]
        for worker in turn:
            worker.expect(timeout, f"STEP {index}")
    for worker in workers:
        worker.finish()
    return {worker.system: worker.row for worker in workers}


def add_ratios(rows: list[dict]) -> None:
    """Each row's ratios to the baselines, rega's speed-up and the FP8 systems' gain over their
    bf16 pair, from the rows of one shape (gpu_check calls it on rows of several runs)."""
    by_system = {r["system"]: r for r in rows if r["status"] == "ok"}
    ours = by_system.get(OURS)
    for row in rows:
        row["ratio_to"] = {}
        if row["status"] != "ok":
            continue
        for base in BASELINES:
            if base in by_system and base != row["system"]:
                row["ratio_to"][base] = row["tokens_per_s"] / by_system[base]["tokens_per_s"]
    if ours is not None:
        for row in rows:
            if row["status"] == "ok":
                row["rega_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
    for row in rows:
        bf16 = by_system.get(FP8_BASELINE.get(row["system"]))
        if row["status"] == "ok" and bf16 is not None:
            row["fp8_speedup"] = row["tokens_per_s"] / bf16["tokens_per_s"]
            # The same steps on the same data from the same weights: FP8's effect on the loss.
            row["fp8_loss_gap_last_step"] = row["loss_last_step"] / bf16["loss_last_step"] - 1


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# Training throughput on {report['device']}", "",
             f"rega-engine {report['versions'].get('rega-engine')}, torch "
             f"{report['versions'].get('torch')}, transformers "
             f"{report['versions'].get('transformers')}; "
             f"{'quick run' if report['config']['quick'] else 'full run'}, "
             f"{report['config']['steps']} timed steps after {report['config']['warmup']} warm-up "
             "steps. Real tokens only; MFU null where the device peak is unknown (CPU).", ""]
    for shape, result in report["shapes"].items():
        s = result["settings"]
        lines += [f"## {shape} ({result['parameters'] / 1e6:.1f}M parameters; rows of "
                  f"{s['seq_len']} tokens, {s['rows']} rows x {s['grad_accum']} micro-batches per "
                  f"step, ~{result['mean_real_tokens_per_step']:.0f} real tokens per step; systems "
                  f"run {result['schedule']})", "",
                  "| system | attention | real tokens/s | MFU | step time (s) | peak memory (GiB) "
                  "| padding | loss step 1 | rega speed-up |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {row['system']} | {row['status']}: {row.get('reason', '')} | | | "
                             "| | | | |")
                continue
            padding = 1 - row["real_tokens_per_step"] / row["processed_tokens_per_step"]
            lines.append(
                f"| {row['system']} | {row.get('attention', '')} | {row['tokens_per_s']:,.0f} | "
                f"{_fmt(row['mfu'], '.1%')} | {row['step_time_s']:.3f} | "
                f"{row['peak_memory_gib']:.2f} | {padding:.0%} | {row['loss_first_step']:.4f} | "
                f"{row.get('rega_speedup', float('nan')):.2f}x |")
        ok = {r["system"]: r for r in result["rows"] if r["status"] == "ok"}
        speedups = []
        for base in BASELINES:
            if base not in ok:
                continue
            ours = [f"{ok[name]['tokens_per_s'] / ok[base]['tokens_per_s']:.2f}x ({name})"
                    for name in ("rega", "rega-compile") if name in ok]
            if ours:
                speedups.append(f"over {base}: {', '.join(ours)}")
        if speedups:
            lines += ["", "rega-engine's real tokens/s " + "; ".join(speedups) + "."]
        fp8 = [f"{row['fp8_speedup']:.2f}x ({row['system']} over {FP8_BASELINE[row['system']]}; "
               f"loss at the last step {row['fp8_loss_gap_last_step']:+.2%})"
               for row in ok.values() if "fp8_speedup" in row]
        if fp8:
            lines += ["", "FP8's real tokens/s over bf16: " + "; ".join(fp8) + "."]
        lines.append("")
    lines.append("Peak memory: CUDA max allocated; on CPU the worker process's peak RSS (Python "
                 "and libraries included). hf-padded is the Trainer's step as a plain loop (no "
                 "Trainer overhead).")
    return "\n".join(lines) + "\n"


def _record(path: Path | None, record: dict) -> None:
    """One line of --rows-file, flushed to disk at once: a caller that ends this run at its
    deadline (gpu_check) keeps every system measured before."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_chart(report: dict, path: Path) -> str | None:
    """The chart, or why there is none: matplotlib is optional (a GPU image may lack it), and a
    chart is never worth failing a run that measured everything."""
    try:
        chart(report, path)
    except ImportError as error:
        return f"no chart: matplotlib is not installed ({error})"
    except Exception as error:
        return f"no chart: {type(error).__name__}: {error}"
    return None


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    shapes = list(report["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in report["shapes"][shape]["rows"] if r["status"] == "ok"]
        names = [r["system"] for r in rows]
        values = [r["tokens_per_s"] for r in rows]
        colors = ["tab:green" if n.startswith("rega") else "tab:blue" if n.startswith("hf-rega")
                  else "tab:gray" for n in names]
        bars = ax.barh(names, values, color=colors)
        for bar, row in zip(bars, rows):
            label = f"{row['tokens_per_s']:,.0f}"
            if row["mfu"] is not None:
                label += f"  ({row['mfu']:.0%} MFU)"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("real tokens/s")
        ax.set_title(f"{shape} on {report['device']}", fontsize=9)
        ax.set_xlim(0, max(values, default=1) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_shape(shape_name: str, args, device: str, work_root: Path) -> dict:
    from rega_engine.model import from_config
    shape = SHAPES[shape_name]
    settings = dict(RUN_SETTINGS[shape_name])
    if args.seq_len:
        settings["seq_len"] = args.seq_len
    if args.rows:
        settings["rows"] = args.rows
    if args.grad_accum:
        settings["grad_accum"] = args.grad_accum
    work_dir = work_root / shape_name
    work_dir.mkdir(parents=True)
    (work_dir / "config.json").write_text(json.dumps({**shape, "model_type": "llama",
                                                      "architectures": ["LlamaForCausalLM"],
                                                      "max_position_embeddings": 131072,
                                                      "rms_norm_eps": 1e-5}))
    num_steps = args.warmup + args.steps
    micro_count = num_steps * settings["grad_accum"]
    tokens_needed = micro_count * settings["rows"] * settings["seq_len"]
    # Twice what the steps take, so that the shuffled rows they get are a fair draw of the epoch.
    num_samples = 2 * int(tokens_needed / MEDIAN_LENGTH) + 64
    settings["loader_seed"] = args.seed
    dataset_dir = work_dir / "data"
    write_samples(dataset_dir, shape, settings, num_samples, args.seed)
    plan = plan_micro_batches(dataset_dir, settings, micro_count)

    from rega_engine.data import TokenDataset
    dataset = TokenDataset(dataset_dir)
    lengths = [int(dataset.offsets[i + 1] - dataset.offsets[i]) for i in range(len(dataset))]
    accum = settings["grad_accum"]
    step_ids = [[i for ids in plan[s * accum:(s + 1) * accum] for i in ids]
                for s in range(num_steps)]
    spec = {"device": device, "shape": shape, "settings": settings, "seed": args.seed,
            "warmup": args.warmup,
            "num_steps": num_steps, "plan": plan, "work_dir": str(work_dir),
            "dataset_dir": str(dataset_dir),
            "step_tokens": [sum(lengths[i] for i in ids) for ids in step_ids],
            "step_doc_lengths": [[lengths[i] for i in ids] for ids in step_ids]}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))

    skipped = {system: _skip_reason(system, device) for system in args.systems}
    runnable = [system for system in args.systems if not skipped[system]]
    interleaved = device == "cpu" and not args.sequential and os.name == "posix"
    _record(args.rows_file, {"shape": shape_name, "settings": settings, "systems": args.systems})
    if interleaved:
        print(f"  {shape_name:>5} {len(runnable)} systems taking turns step by step ...",
              file=sys.stderr, flush=True)
        measured = _run_interleaved(runnable, spec_path, work_dir, args.timeout, num_steps)
    rows = []
    for system in args.systems:
        left = None if args.deadline_at is None else args.deadline_at - time.time()
        if not skipped[system] and not interleaved and left is not None and (
                left < args.min_system_seconds):
            skipped[system] = (f"deadline: {max(left, 0):.0f} s left, a system needs at least "
                               f"{args.min_system_seconds:.0f} s")
        if skipped[system]:
            row = {"system": system, "status": "skipped", "reason": skipped[system]}
            rows.append(row)
            _record(args.rows_file, {"shape": shape_name, "row": row})
            print(f"  {shape_name:>5} {system:<17} skipped: {skipped[system]}", file=sys.stderr,
                  flush=True)
            continue
        timeout = args.timeout if left is None else min(args.timeout, left)
        try:
            row = measured[system] if interleaved else _run_sequential(system, spec_path, work_dir,
                                                                       timeout)
        except Exception as error:  # this driver's own failure for one system: the others go on
            row = {"system": system, "status": "error", "reason": f"{type(error).__name__}: "
                   f"{error}", "stderr_tail": traceback.format_exc()[-2000:]}
        if row["status"] == "timeout" and timeout < args.timeout:
            row["deadline"] = True   # ended by --deadline-at, not found too slow
        rows.append(row)
        _record(args.rows_file, {"shape": shape_name, "row": row})
        if row["status"] == "ok":
            print(f"  {shape_name:>5} {system:<17} {row['tokens_per_s']:>12,.0f} real tokens/s  "
                  f"step {row['step_time_s']:.3f} s  loss@1 {row['loss_first_step']:.4f}  "
                  f"({row['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
        else:
            print(f"  {shape_name:>5} {system:<17} {row['status']}: {row.get('reason')}",
                  file=sys.stderr, flush=True)
    add_ratios(rows)
    params = from_config({**shape, "model_type": "llama"},
                         device="meta").num_parameters(exclude_embeddings=False)
    return {"settings": settings, "parameters": params, "num_samples": num_samples,
            "schedule": "interleaved step by step" if interleaved else "one system after the other",
            "length_distribution": {"kind": "log-normal", "median": MEDIAN_LENGTH,
                                    "sigma": LENGTH_SIGMA,
                                    "min": 16, "cap": settings["seq_len"],
                                    "prompt_share": "uniform 0.2-0.5, no loss"},
            "mean_real_tokens_per_step": statistics.mean(spec["step_tokens"][args.warmup:]),
            "rows": rows}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="rega-engine bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few steps, the smallest shape for the device (~2 min on CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shapes",
        help=f"comma-separated, of {', '.join(SHAPES)} (default: tiny on CPU, 1b,3b on GPU)")
    parser.add_argument("--systems",
                        help=f"comma-separated, of {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per system")
    parser.add_argument("--warmup", type=int, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--seq-len", type=int, help="row length (default per shape)")
    parser.add_argument("--rows", type=int, help="rows per micro-batch (default per shape)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default per shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float,
                        help="seconds before a system is given up: for its whole run, or "
                        "when interleaved for its set-up and for each step (default 300 with "
                        "--quick, else 1800)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--rows-file", type=Path,
                        help="also append each system's row to this JSON-lines file as soon as "
                             "it is measured (gpu_check reads it, also after ending this run)")
    parser.add_argument("--deadline-at", type=float,
                        help="a time.time() by which the run must end: a system is given at most "
                             "the time left, and not started with less than --min-system-seconds")
    parser.add_argument("--min-system-seconds", type=float, default=30.0,
                        help="with --deadline-at: the least time worth starting a system with")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequential", action="store_true",
                        help="one system after the other (the GPU default); on CPU the systems "
                             "otherwise take turns step by step, so that load from other "
                             "processes hits all alike")
    args = parser.parse_args(argv)
    if args.worker:
        return args
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    shapes = args.shapes.split(",") if args.shapes else (["tiny"] if args.device == "cpu"
                                                         else ["1b"] if args.quick else ["1b",
                                                                                         "3b"])
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    args.shapes = shapes
    args.systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.steps is None:
        args.steps = 16 if args.quick else 30
    if args.warmup is None:
        # torch.compile compiles twice: for the first shapes, then once more with dynamic ones.
        args.warmup = 3 if args.quick else 5
    if args.timeout is None:
        args.timeout = 300 if args.quick else 1800
    if args.quick and args.device == "cpu" and not args.rows:
        args.rows = 1
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step pays for start-up and "
                     "compilation)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.spec, args.worker, args.result, args.interleaved)
        return 0
    device_name, slug = _device_description(args.device)
    print(f"bench_train on {device_name}: shapes {', '.join(args.shapes)}; systems "
          f"{', '.join(args.systems)}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    work_root = Path(tempfile.mkdtemp(prefix="rega-bench-"))
    try:
        shapes = {name: run_shape(name, args, args.device, work_root) for name in args.shapes}
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    report = {
        "device": device_name,
        "versions": _versions(),
        "config": {"quick": args.quick, "steps": args.steps, "warmup": args.warmup,
                   "seed": args.seed,
                   "systems": args.systems, "optimizer": {"name": "AdamW", "lr": LR,
                                                          "weight_decay": 0.0,
                                                          "max_grad_norm": MAX_GRAD_NORM},
                   "precision": "bf16 autocast / FSDP2 mixed precision, fp32 master weights"
                   if args.device == "cuda"
                   else "fp32",
                   "fp8_systems": "train.precision = 'fp8', recipe tensorwise (torchao float8)",
                   "shapes": {n: SHAPES[n] for n in args.shapes},
                   "hf_padded_step": "plain loop mirroring Trainer.training_step (no Trainer "
                                     "overhead)"},
        "shapes": shapes,
        "wall_s": time.perf_counter() - started,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench_train_{slug}{'_quick' if args.quick else ''}"
    table = markdown(report)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{stem}.md").write_text(table)
    no_chart = write_chart(report, Path(f"{stem}.png"))
    print(table)
    if no_chart:
        print(f"bench_train: {no_chart}", file=sys.stderr)
    print(f"wrote {stem}.json, .md{'' if no_chart else ' and .png'} "
          f"({report['wall_s']:.0f} s)", file=sys.stderr)
    failed = [r["system"] for s in shapes.values() for r in s["rows"]
              if r["status"] in ("error", "timeout") and not r.get("deadline")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
