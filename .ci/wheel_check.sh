#!/usr/bin/env bash
# The wheel another trainer would depend on: build it, check what it carries, install it in a
# fresh virtual environment (the locked versions, nothing from this checkout) and use it from a
# folder outside the checkout: our kernels, the C++ extension, the HF integration, and the demo.
# `make wheel-check` runs it; CI runs it after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WHEEL_CHECK_DIR:-build/wheel-check}
rm -rf "$work"
mkdir -p "$work/dist" "$work/outside"
work=$(cd "$work" && pwd)

python3 -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install -q -c requirements.lock setuptools wheel pybind11
"$work/build-env/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$work/dist" .
wheel=$(ls "$work"/dist/rega_engine-*.whl)
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"

# The wheel carries the package (kernels as rega_engine.kernels, the extension, the demo's
# sample data) and nothing of the checkout's tests, benchmarks or caches.
python3 - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
unwanted = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "kernels", "csrc")
            or "__pycache__" in n or n.endswith((".pyc", ".o"))]
assert not unwanted, f"the wheel carries {unwanted[:10]}"
needed = ["rega_engine/kernels/__init__.py", "rega_engine/kernels/attention.py",
          "rega_engine/cli.py", "rega_engine/demo/sample/tokenizer/tokenizer.json"]
missing = [n for n in needed if n not in names]
assert not missing, f"the wheel lacks {missing}"
assert any(n.startswith("rega_engine/_C") and n.endswith(".so") for n in names), "no extension"
print(f"wheel contents: {len(names)} files, no tests, benchmarks or caches")
EOF

.ci/make_venv.sh "$work/venv" bare
"$work/venv/bin/python" -m pip install -c requirements.lock "$wheel"

cd "$work/outside"   # nothing of the checkout on sys.path
"$work/venv/bin/python" - "$work/venv" <<'EOF'
import sys
import rega_engine, rega_engine._C, rega_engine.kernels
from rega_engine.integrations.hf import PaddingFreeCollator, apply_rega_kernels
assert rega_engine.__file__.startswith(sys.argv[1]), f"not the wheel's: {rega_engine.__file__}"
assert callable(rega_engine.kernels.varlen_attention) and callable(apply_rega_kernels)
print("imported from", rega_engine.__file__)
EOF
"$work/venv/bin/rega-engine" demo --quick --out "$work/outside/demo"
test -s "$work/outside/demo/results.json"
echo "wheel check passed: $(basename "$wheel")"
