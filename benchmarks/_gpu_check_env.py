"""The env stage of `make gpu-check`: rega_engine importable (its C++ extension and its Triton
kernels) on whatever the machine offers, without the network; then the versions and the device.

The ways, in order, the first that works wins:
  installed  rega_engine._C and rega_engine.kernels already import (an editable or a real install);
  pip        `pip install --no-deps --no-build-isolation --no-index -e .` (fails without pip, on an
             externally managed Python, without a writable site-packages, without setuptools);
  in place   `setup.py build_ext --inplace` (the extension lands in rega_engine/ of the checkout)
             and every later stage runs from the checkout: `kernels/` only becomes
             `rega_engine.kernels` through an install, so a folder in the run's directory holds a
             `rega_engine` made of links to the checkout's files plus `kernels`, first on
             PYTHONPATH, with PYTHONSAFEPATH=1 so that the checkout's own folder (the current
             directory of `python -m`) does not come first.
Each stage after this one gets `env` from `prepare`: the way's variables and a Triton and an
Inductor cache inside the run's folder (writable, and kept for the next run on the machine).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from _procs import Deadline, run_bounded

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import rega_engine, rega_engine._C, rega_engine.kernels; "
         "print('imported:', rega_engine.__file__, '|', rega_engine.kernels.__file__)")
PROBE_TIMEOUT_S = 120      # imports torch and triton: seconds on a warm machine, more when cold
VERSION_PACKAGES = ("torch", "triton", "transformers", "numpy", "pybind11", "setuptools",
                    "torchao", "flash-attn", "liger-kernel", "matplotlib")


def cache_env(work_dir: Path, env: dict) -> dict:
    """Triton's and Inductor's caches inside the run's folder, unless the caller chose others."""
    env = dict(env)
    env.setdefault("TRITON_CACHE_DIR", str(work_dir / "triton-cache"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work_dir / "inductor-cache"))
    return env


def checkout_import_path(work_dir: Path) -> Path:
    """A folder whose `rega_engine` is the checkout's, with `kernels/` as `rega_engine.kernels`:
    links to every entry of rega_engine/ (so an extension built in place is seen) and to kernels/.
    Rebuilt on every call, so that it follows the checkout."""
    site = work_dir / "site"
    package = site / "rega_engine"
    if package.is_symlink() or package.is_file():
        package.unlink()
    package.mkdir(parents=True, exist_ok=True)
    for link in package.iterdir():
        if link.is_symlink():
            link.unlink()
    for entry in (REPO / "rega_engine").iterdir():
        (package / entry.name).symlink_to(entry)
    if not (package / "kernels").exists() and (REPO / "kernels").is_dir():
        (package / "kernels").symlink_to(REPO / "kernels")
    return site


def in_place_env(work_dir: Path, env: dict) -> dict:
    site = checkout_import_path(work_dir)
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env["PYTHONSAFEPATH"] = "1"
    return env


def default_ways(python: str, work_dir: Path, allow_build: bool) -> list[tuple]:
    """(name, build command or None, how the environment changes) in the order they are tried."""
    ways = [("installed", None, None)]
    if allow_build:
        ways += [
            ("pip", [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                     "--no-index", "-e", str(REPO)], None),
            ("in place", [python, "setup.py", "build_ext", "--inplace", "--build-temp",
                          str(work_dir / "build")], lambda env: in_place_env(work_dir, env)),
        ]
    return ways


def prepare(work_dir: Path, env: dict, deadline: Deadline, *, python: str = sys.executable,
            allow_build: bool = True, ways: list[tuple] | None = None) -> tuple[dict, dict]:
    """(what was done, the environment for every later stage). The result's "how" names the way
    that worked, or is None when none did; "attempts" has each command, its exit status, seconds
    and output tail."""
    env = cache_env(work_dir, env)
    attempts = []
    for name, build, adjust in ways or default_ways(python, work_dir, allow_build):
        if deadline.left() <= 0:
            attempts.append({"way": name, "skipped": "deadline"})
            break
        logs = work_dir / "logs"
        if build is not None:
            done = run_bounded(build, deadline.left(), logs / f"build-{_slug(name)}.log",
                               cwd=REPO, env=env)
            attempts.append({"way": name, "command": " ".join(build),
                             "returncode": done.returncode, "seconds": round(done.seconds, 1),
                             "log_tail": done.tail(1500)})
            if done.returncode != 0:
                continue
        way_env = adjust(env) if adjust else env
        probe = run_bounded([python, "-c", PROBE], min(PROBE_TIMEOUT_S, max(deadline.left(), 1)),
                            logs / f"probe-{_slug(name)}.log", cwd=REPO, env=way_env)
        output = probe.tail(4000).strip().splitlines()
        attempts.append({"way": name, "seconds": round(probe.seconds, 1),
                         "probe": "imports" if probe.returncode == 0
                         else (output[-1] if output else f"exit {probe.returncode}")})
        said = [line for line in output if line.startswith("imported:")]
        if probe.returncode == 0 and said:
            package, _, kernels = said[-1].removeprefix("imported:").partition("|")
            found = {"how": name, "attempts": attempts, "rega_engine": package.strip(),
                     "kernels": kernels.strip(), "triton_cache": way_env["TRITON_CACHE_DIR"]}
            return found, way_env
    return {"how": None, "attempts": attempts, "triton_cache": env["TRITON_CACHE_DIR"]}, env


def _slug(name: str) -> str:
    return name.replace(" ", "-")


def versions(device: str) -> dict:
    """Installed versions (from the package metadata: importing flash-attn or transformers here
    would cost seconds of the slot) and the device."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in VERSION_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    import torch

    found["torch"] = torch.__version__
    found["cuda"] = torch.version.cuda
    found["device"] = device
    if torch.cuda.is_available():
        found["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            found["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            found["driver"] = None
    return found
