"""Build glue: the package layout and the C++ extension `rega_engine._C`.

Metadata lives in pyproject.toml; this file only says what pyproject.toml cannot: that `kernels/`
installs as `rega_engine.kernels` (never as a top-level `kernels`, a name another PyPI package owns)
and how to compile `csrc/` with pybind11.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "rega_engine._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    packages=find_packages(include=["rega_engine", "rega_engine.*"]) + ["rega_engine.kernels"],
    package_dir={"rega_engine.kernels": "kernels"},
    package_data={"rega_engine.demo": ["sample/*.jsonl", "sample/*.txt",
                                       "sample/tokenizer/*.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
