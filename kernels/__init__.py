"""Triton kernels of rega-engine, installed as `rega_engine.kernels`."""
# From a checkout's root (`python -m`, `python -c`, pytest) this directory is also importable as a
# top-level `kernels`: the name of Hugging Face's kernels package, which transformers imports with
# its model classes. Under that name this file never runs the op modules (every rega:: op would be
# registered twice and training would crash at random): it hands the name to the next `kernels` on
# sys.path, or, where none is installed, stays an empty shell that no one mistakes for it.
if __name__ == "rega_engine.kernels":
    from .attention import varlen_attention, varlen_attention_reference
    from .cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

    # These three functions share their module's name, so `rega_engine.kernels.rms_norm` (and
    # .swiglu) is the function; reach a module itself with importlib.import_module or a
    # `from rega_engine.kernels.rms_norm import ...`.
    from .rms_norm import rms_norm, rms_norm_reference
    from .rope import rotary_embedding, rotary_embedding_reference
    from .split_attention import split_varlen_attention
    from .swiglu import swiglu, swiglu_reference
    from .vocab_parallel_cross_entropy import vocab_parallel_linear_cross_entropy
else:
    def _yield_name_to_installed_package() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        ours = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        others = [p for p in sys.path if os.path.realpath(p or os.curdir) != ours]
        spec = importlib.machinery.PathFinder.find_spec(__name__, others)
        if spec is None or spec.loader is None:
            return
        package = importlib.util.module_from_spec(spec)
        # The import system returns whatever sys.modules holds under the name once this file has
        # run, so the installed package replaces this shell for `import kernels` and its
        # submodules alike; on a failure the name is left to neither.
        sys.modules[__name__] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[__name__]
            raise

    _yield_name_to_installed_package()
    del _yield_name_to_installed_package
    # Still this shell: no submodule either, or `import kernels.attention` would register the
    # ops a second time.
    __path__ = []
