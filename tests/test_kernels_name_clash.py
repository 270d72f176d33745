"""Our top-level `kernels/` folder never shadows anyone's package named `kernels`.

From a checkout's root (`python -c`, `python -m`, torchrun, pytest, the demo's workers) the
folder is importable as a top-level `kernels`, the name of Hugging Face's kernels package that
transformers >= 5.25 imports with its model classes. Every way of starting Python must then get
the installed package under that name (HF's, or a stand-in of another project), our empty shell
only where none is installed, and never a second run of our op modules (every rega:: op would be
registered twice and training would crash at random). Each case runs in a subprocess, in this
environment (HF's kernels installed, as current transformers requires) and in two that lack it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bigram_model import make_bigram_checkpoint
from python_envs import python_without
from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = "WHOSE = 'stand-in'\n"

# Run as `python -c` from the root: the root is sys.path[0], where `kernels/` is found first.
PROBE = """
import json, sys
from transformers import LlamaForCausalLM
import rega_engine.kernels
import torch
import kernels
try:
    import kernels.attention
except ImportError:
    pass
ours = sorted(name for name, module in sys.modules.items()
              if name.split(".")[0] == "kernels" and name != "kernels"
              and getattr(module, "__file__", "").startswith(sys.argv[1]))
from transformers.utils.import_utils import is_kernels_available
print(json.dumps({"file": kernels.__file__, "whose": getattr(kernels, "WHOSE", None),
                  "has_ops": hasattr(kernels, "varlen_attention"), "ours_again": ours,
                  "registered": hasattr(torch.ops.rega, "varlen_attention"),
                  "hub_available": is_kernels_available()}))
"""


def _hf_kernels_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return bool(version("kernels"))
    except PackageNotFoundError:   # transformers < 5.25 does not need it (make test-oldest)
        return False


HF_KERNELS = pytest.mark.skipif(not _hf_kernels_installed(),
                                reason="Hugging Face's kernels is not installed here")


@pytest.fixture(scope="module")
def environments(tmp_path_factory):
    """name -> python executable: this one (with HF's kernels, as current transformers has it),
    one without any package named kernels, and one with a stand-in of another project in its
    place."""
    base = tmp_path_factory.mktemp("envs")
    return {"hf": sys.executable,
            "none": python_without(base / "none", ("kernels",)),
            "stand-in": python_without(base / "stand_in", ("kernels",), {"kernels": STAND_IN})}


@pytest.fixture(scope="module")
def eval_args(tmp_path_factory):
    """A `rega-engine eval` of a tiny bigram model: it loads a transformers model class."""
    folder = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer()
    path = make_bigram_checkpoint(folder / "model", len(tok), {}, {tok.eos_token_id: 1.0},
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    general = folder / "general.jsonl"
    general.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "ok"}]}) + "\n")
    return ["eval", f"--eval.checkpoint={path}", f"--eval.general={general}",
            f"--eval.output={folder / 'eval.json'}", f"--data.tokenizer={tiny_tokenizer_dir()}",
            "--eval.max_new_tokens=2"]


def _run(argv, env=None, cwd=ROOT):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv[:4]} exit {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def _probe(python, env=None):
    out = _run([python, "-c", PROBE, str(ROOT / "kernels")], env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _expect_probe(found, environment):
    assert found["ours_again"] == [] and not found["has_ops"]
    assert found["registered"]
    if environment == "hf":
        assert "site-packages" in found["file"] and found["hub_available"]
    elif environment == "stand-in":
        assert found["whose"] == "stand-in" and not found["hub_available"]
    else:   # nothing installed under the name: our empty shell, which no one takes for HF's
        assert found["file"] == str(ROOT / "kernels" / "__init__.py")
        assert not found["hub_available"]


ENVIRONMENTS = [pytest.param("hf", marks=HF_KERNELS), "none", "stand-in"]


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_python_c_from_the_root(environments, environment):
    _expect_probe(_probe(environments[environment]), environment)


@HF_KERNELS
def test_the_demo_workers_environment_from_another_folder(tmp_path):
    # rega-engine demo puts the folder holding rega_engine (here the root) first on its workers'
    # PYTHONPATH, so with an editable install they see the root from any folder.
    from rega_engine.demo.run import worker_env
    env = worker_env(threads=1)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    out = _run([sys.executable, "-c", PROBE, str(ROOT / "kernels")], env=env, cwd=tmp_path)
    _expect_probe(json.loads(out.stdout.strip().splitlines()[-1]), "hf")


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_python_m_cli_from_the_root(environments, environment, eval_args):
    _run([environments[environment], "-m", "rega_engine.cli", *eval_args])


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("environment", [pytest.param("hf", marks=HF_KERNELS), "none"])
def test_torchrun_m_cli_from_the_root(environments, environment, eval_args):
    # torchrun is `python -m torch.distributed.run`; its workers start with `python -m` too.
    _run([environments[environment], "-m", "torch.distributed.run", "--nproc_per_node=1",
          "--master_port=0", "-m", "rega_engine.cli", *eval_args])


@pytest.mark.parametrize("environment", [pytest.param("hf", marks=HF_KERNELS), "none"])
def test_pytest_from_the_root(environments, environment, tmp_path):
    test_file = tmp_path / "test_probe.py"
    test_file.write_text("def test_imports():\n"
                         "    from transformers import LlamaForCausalLM  # noqa: F401\n"
                         "    import rega_engine.kernels as ours\n"
                         "    assert ours.varlen_attention\n")
    _run([environments[environment], "-m", "pytest", "-q", "-p", "no:cacheprovider",
          str(test_file)])
