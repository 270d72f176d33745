"""What a load reads from safetensors files: benchmarks/bench_load_memory.py reports the bytes,
tests/sharded_load_worker.py checks that sharded parameters never read a whole tensor."""
from __future__ import annotations

from contextlib import contextmanager


class SafetensorsReads:
    """While in a `with` block, wraps rega_engine.model.hf_io.open_safetensors and records the
    names given to get_tensor (whole tensors), and the elements and bytes of every tensor read,
    by get_tensor and get_slice(...)[...] alike."""

    def __init__(self):
        from rega_engine.model import hf_io
        self.hf_io, self.original = hf_io, hf_io.open_safetensors
        self.get_tensor: list[str] = []
        self.elements = 0
        self.bytes = 0

    def _read(self, tensor):
        self.elements += tensor.numel()
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self):
        reads = self

        class Slice:
            def __init__(self, inner):
                self.inner = inner

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, key):
                return reads._read(self.inner[key])

        class Handle:
            def __init__(self, inner):
                self.inner = inner

            def keys(self):
                return self.inner.keys()

            def get_slice(self, name):
                return Slice(self.inner.get_slice(name))

            def get_tensor(self, name):
                reads.get_tensor.append(name)
                return reads._read(self.inner.get_tensor(name))

        @contextmanager
        def opened(file, *args, **kwargs):
            with self.original(file, *args, **kwargs) as handle:
                yield Handle(handle)

        self.hf_io.open_safetensors = opened
        return self

    def __exit__(self, *exc):
        self.hf_io.open_safetensors = self.original
