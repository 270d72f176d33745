"""Triton when it is installed, else just enough of it for the kernel modules to import.

torch wheels for macOS and Windows come without Triton; the PyTorch references must stay usable
there, so `HAS_TRITON` decides at call time and the kernel definitions only need to parse.
"""
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def Config(*args, **kwargs):
            return None

    triton = tl = _NoTriton()

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, x, who: str, interpreted: bool) -> str:
    """"triton" or "torch" for a kernel call on tensor `x`: "auto" takes Triton on CUDA tensors
    when it is installed; "triton" is refused, naming `who`, where it cannot run (no triton, or
    CPU tensors without the interpreter the kernel module was built for)."""
    if backend not in BACKENDS:
        raise ValueError(f"{who}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{who}: backend='triton' needs the triton package, which is not "
                             "installed; use backend='auto' or 'torch'")
        if not x.is_cuda and not interpreted:
            raise ValueError(f"{who}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                             f"set before triton is imported to run on CPU; got tensors on "
                             f"{x.device}. Use backend='auto' or 'torch' on this device.")
    return backend


def is_interpreted(kernel) -> bool:
    """Whether a Triton kernel function was built for the interpreter (TRITON_INTERPRET=1 at import
    time): such kernels run interpreted whatever the environment says later."""
    return HAS_TRITON and not isinstance(kernel, triton.runtime.jit.JITFunction)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def unit_stride(t):
    """t itself when its last dimension is contiguous (what the kernels index), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def device_guard(t):
    """Triton launches on the current CUDA device: make it the tensor's one (nothing on CPU)."""
    import torch
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


__all__ = ["BACKENDS", "HAS_TRITON", "device_guard", "is_interpreted", "next_power_of_2",
           "resolve_backend", "triton", "tl", "unit_stride"]
