"""Triton kernels of rega-engine, installed as `rega_engine.kernels`."""
