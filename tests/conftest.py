import os

# Triton's fp-fusion default changes in 3.10; pin today's behaviour and keep the logs quiet.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. Triton reads this when a
# kernel module is imported (at @triton.jit), so it must be set before any test module imports
# rega_engine.kernels. On a CUDA machine the kernels compile for the device instead; compile-only
# checks for sm_80/sm_90 run in a subprocess either way (tests/kernel_compile.py).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
