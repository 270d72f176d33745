import os

# Triton's fp-fusion default changes in 3.10; pin today's behaviour and keep the logs quiet.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
