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

__all__ = ["HAS_TRITON", "triton", "tl"]
