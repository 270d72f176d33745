"""gpu-check's env stage installs on whatever the GPU image offers: when `pip install -e .` cannot
run (an externally managed Python, no pip, a read-only site-packages), the extension is built in
place and every stage runs from the checkout, with `kernels/` reachable as rega_engine.kernels
and Triton's cache in the run's folder. The in-place build itself (a minute of C++ on 2 cores)
is stood in for by a command that succeeds; the import from the checkout is real."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _gpu_check_env as env_stage  # noqa: E402
from _procs import Deadline  # noqa: E402


def test_the_ways_are_tried_in_order_without_the_network(tmp_path):
    ways = env_stage.default_ways("python3", tmp_path, allow_build=True)
    assert [name for name, _, _ in ways] == ["installed", "pip", "in place"]
    pip, in_place = ways[1][1], ways[2][1]
    assert {"--no-deps", "--no-build-isolation", "--no-index", "-e"} <= set(pip)
    assert in_place[1:4] == ["setup.py", "build_ext", "--inplace"]
    assert [name for name, _, _ in env_stage.default_ways("python3", tmp_path, False)] == [
        "installed"]


def test_without_pip_the_checkout_is_run_in_place(tmp_path):
    refused = [sys.executable, "-c", "raise SystemExit('error: externally-managed-environment')"]
    built = [sys.executable, "-c", "pass"]
    ways = [("pip", refused, None),
            ("in place", built, lambda env: env_stage.in_place_env(tmp_path, env))]
    result, env = env_stage.prepare(tmp_path, {"PATH": "/usr/bin:/bin"}, Deadline(120),
                                    ways=ways)
    assert result["how"] == "in place", result
    pip, in_place = result["attempts"][0], result["attempts"][-1]
    assert pip["returncode"] == 1 and "externally-managed" in pip["log_tail"]
    assert in_place["probe"] == "imports"
    # imported from the run's folder: the checkout's rega_engine with kernels/ inside it
    site = tmp_path / "site"
    assert result["rega_engine"] == str(site / "rega_engine" / "__init__.py")
    assert result["kernels"] == str(site / "rega_engine" / "kernels" / "__init__.py")
    assert (site / "rega_engine" / "kernels").resolve() == REPO / "kernels"
    assert env["PYTHONPATH"].split(":")[0] == str(site) and env["PYTHONSAFEPATH"] == "1"
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton-cache")


def test_when_nothing_works_it_says_what_was_tried(tmp_path):
    ways = [("pip", [sys.executable, "-c", "raise SystemExit(3)"], None),
            ("in place", [str(tmp_path / "no-such-python")], None)]
    result, _ = env_stage.prepare(tmp_path, {}, Deadline(60), ways=ways)
    assert result["how"] is None
    assert [a["returncode"] for a in result["attempts"]] == [3, 127]


def test_the_caches_a_user_chose_are_kept(tmp_path):
    env = env_stage.cache_env(tmp_path, {"TRITON_CACHE_DIR": "/fast/disk"})
    assert env["TRITON_CACHE_DIR"] == "/fast/disk"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor-cache")
