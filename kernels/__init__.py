"""Triton kernels of rega-engine, installed as `rega_engine.kernels`."""
# From a checkout's root this directory is also importable as a top-level `kernels`, the name of
# Hugging Face's kernels package, and transformers probes for that one by importing it. Running
# the op modules a second time under that name would register every rega:: op twice (training
# then crashes at random), so under any other name this package stays an empty shell.
if __name__ == "rega_engine.kernels":
    from .attention import varlen_attention, varlen_attention_reference
    from .cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

    # These three functions share their module's name, so `rega_engine.kernels.rms_norm` (and
    # .swiglu) is the function; reach a module itself with importlib.import_module or a
    # `from rega_engine.kernels.rms_norm import ...`.
    from .rms_norm import rms_norm, rms_norm_reference
    from .rope import rotary_embedding, rotary_embedding_reference
    from .swiglu import swiglu, swiglu_reference
