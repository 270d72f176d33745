#!/usr/bin/env bash
# Creates (or completes) a virtual environment with rega-engine installed in it, from the
# checkout's root. Every set-up comes through here: `make install` (and so `make test`, CI),
# `make test-latest`, `make test-oldest`, `make lock` and `make wheel-check`.
#
#   .ci/make_venv.sh VENV locked   the exact versions in requirements.lock (what CI runs)
#   .ci/make_venv.sh VENV latest   the newest releases the ranges in pyproject.toml allow
#   .ci/make_venv.sh VENV oldest   exactly the lower bounds of those ranges (.ci/lower_bounds.py)
#   .ci/make_venv.sh VENV lock     the newest releases in a clean environment, then written to
#                                  requirements.lock
#   .ci/make_venv.sh VENV bare     torch and the build tools only (the wheel check installs the
#                                  wheel itself)
#
# torch comes first and on purpose: locked and latest environments see the system's packages,
# so a machine that has torch (a CUDA image) keeps it; a machine without an NVIDIA GPU gets the
# CPU build 2.13.0 and never downloads a CUDA build (several GB). That is also why torch and its
# CUDA libraries are not in the lock, and why a kept torch keeps its own triton.
set -euo pipefail
venv=$1
mode=$2
lock=requirements.lock
cpu_torch="torch==2.13.0"
cpu_index=https://download.pytorch.org/whl/cpu

case $mode in
  locked|latest) site=--system-site-packages ;;
  oldest|lock|bare) site= ;;   # exact: nothing from the system's site-packages
  *) echo "make_venv.sh: mode '$mode': choose locked, latest, oldest, lock or bare" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv $site "$venv"
py="$venv/bin/python"
pip="$py -m pip"

kept_torch=0
if [ -n "$site" ] && "$py" -c "import torch" 2>/dev/null; then
  echo "keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
  kept_torch=1
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $pip install "torch>=2.13"
else
  # The CPU index holds CPU builds only; where it cannot be reached, pip's other sources must
  # still offer the pinned CPU build (a machine with torch wheels on disk does).
  $pip install --timeout 10 --retries 1 --index-url "$cpu_index" "$cpu_torch" \
    || $pip install "$cpu_torch"
fi
$pip install "setuptools>=64" wheel "pybind11>=2.12"

case $mode in
  locked)
    constraints="$venv/constraints.txt"
    if [ "$kept_torch" = 1 ]; then
      # a machine's own torch pins its own triton (torch 2.11 needs triton 3.6 exactly)
      grep -v '^triton==' "$lock" > "$constraints"
    else
      cp "$lock" "$constraints"
    fi
    $pip install -c "$constraints" --no-build-isolation -e ".[test]" ;;
  latest|lock)
    # everything to its newest but torch, which stays the build chosen above (an eager upgrade
    # would replace the CPU build by the newest CUDA one)
    "$py" -c "import torch; print('torch==' + torch.__version__)" > "$venv/torch-pin.txt"
    $pip install --upgrade --upgrade-strategy eager -c "$venv/torch-pin.txt" \
      --no-build-isolation -e ".[test]" ;;
  oldest)
    "$py" .ci/lower_bounds.py | grep -v '^torch==' > "$venv/lower-bounds.txt"
    $pip install -r "$venv/lower-bounds.txt"
    $pip install --no-deps --no-build-isolation -e . ;;
  bare) ;;
esac

if [ "$mode" = lock ]; then
  {
    echo "# The exact versions \`make test\` and CI install (pip constraints: pip install -c)."
    echo "# Written by \`make lock\` from the newest releases the ranges in pyproject.toml allowed"
    echo "# on $(date -u +%Y-%m-%d), with Python $("$py" -c 'import platform; print(platform.python_version())'); refresh it with \`make lock\`"
    echo "# after \`make test-latest\` passes. torch, its CUDA libraries and (where a machine keeps"
    echo "# its own torch) triton are chosen by .ci/make_venv.sh, not here."
    $pip freeze --exclude-editable | grep -v -i -E '^(torch==|nvidia-|cuda-)'
  } > "$lock.new"
  mv "$lock.new" "$lock"
  echo "wrote $lock ($(grep -c '==' "$lock") pins)"
fi
