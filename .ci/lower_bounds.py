"""Prints the declared lower bounds of pyproject.toml as pins (`name==version`), the core
dependencies and the test extra, for `make test-oldest`: the range's floor is a claim that the
suite passes there, and this is how it is checked. Markers are kept; a requirement without a
lower bound is left out (pip then picks what it likes)."""
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

project = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml")
                        .read_text())["project"]
for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
    spec, _, marker = requirement.partition(";")
    floor = re.search(r">=\s*([\w.]+)", spec)
    if floor is None:
        continue
    name = re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0)
    sys.stdout.write(f"{name}=={floor.group(1)}" + (f"; {marker.strip()}" if marker else "") + "\n")
