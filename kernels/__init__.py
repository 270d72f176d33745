"""Triton kernels of rega-engine, installed as `rega_engine.kernels`."""
from .cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from .attention import varlen_attention, varlen_attention_reference
