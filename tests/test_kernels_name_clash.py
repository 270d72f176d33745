"""From a checkout's root, `kernels/` is importable as a top-level `kernels`: Hugging Face's kernels
package has that name, and transformers probes for it by importing it (peft triggers the probe).
The op modules must not run a second time under that name, or every rega:: op is registered twice
and training crashes at random."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
import rega_engine.kernels
from transformers.utils.import_utils import is_kernels_available
print(is_kernels_available())
shadow = sorted(name for name in sys.modules if name.startswith("kernels."))
assert not shadow, f"op modules imported again as {shadow}"
"""


def test_transformers_probe_does_not_import_our_ops_twice():
    # cwd = the checkout's root, which `python -c` puts first on sys.path, as pytest does.
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"   # ours is no Hugging Face kernels package
