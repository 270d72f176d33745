"""A Python that sees this test run's packages but some: "what if this package were not installed"
without touching the real environment, for every way of starting Python (-c, -m, torchrun).

The environment is a bare virtual environment whose one .pth file adds an overlay folder as a
site directory; the overlay holds a symbolic link to every entry of this interpreter's
site-packages (so .pth files, the editable install's finder among them, still run) except the
packages left out, and any stand-in packages given."""
from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path


def _left_out(entry: str, names: set[str]) -> bool:
    # a package folder or module, or its dist-info/egg-info (the name up to the version)
    stem = re.split(r"[-.]", entry, maxsplit=1)[0].lower().replace("-", "_")
    return stem in names


def python_without(folder: Path, leave_out: tuple[str, ...],
                   stand_ins: dict[str, str] | None = None) -> str:
    """A python executable under `folder` without the packages named in `leave_out`; stand_ins
    maps a top-level package name to the source of its __init__.py, installed in their place
    (without distribution metadata, as a package that is not the real one)."""
    folder = Path(folder)
    overlay = folder / "site"
    overlay.mkdir(parents=True)
    names = {name.lower().replace("-", "_") for name in leave_out}
    for site_dir in [*site.getsitepackages(), site.getusersitepackages()]:
        if not os.path.isdir(site_dir):
            continue
        for entry in sorted(os.listdir(site_dir)):
            link = overlay / entry
            if _left_out(entry, names) or link.exists() or entry == "__pycache__":
                continue
            link.symlink_to(os.path.join(site_dir, entry))
    for name, source in (stand_ins or {}).items():
        (overlay / name).mkdir()
        (overlay / name / "__init__.py").write_text(source)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_overlay.pth").write_text(f"import site; site.addsitedir({str(overlay)!r})\n")
    return str(venv / "bin" / "python")
