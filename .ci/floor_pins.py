"""Print the pins (``name==version``) of the declared minimum versions that CI tests.

Reads the ``>=`` floor of each package in FLOOR_PACKAGES from pyproject.toml's
``project.dependencies``, so the floor environment of ``.ci/run`` installs exactly what the
package declares::

    python .ci/floor_pins.py            # -> diffusers==0.37.0 transformers==4.48.0 ...

Needs Python >= 3.11 (tomllib) and ``packaging`` (installed with transformers): run it in .venv-ci.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

#: the libraries whose APIs the toolkit leans on and which move fastest
FLOOR_PACKAGES = ("diffusers", "transformers", "peft", "accelerate")


def floor_pins(pyproject: Path) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    requirements = {Requirement(d).name.lower(): Requirement(d) for d in dependencies}
    pins = []
    for name in FLOOR_PACKAGES:
        if name not in requirements:
            raise SystemExit(f"{pyproject}: {name} is not a dependency; CI tests the floors of {', '.join(FLOOR_PACKAGES)}")
        floors = [spec.version for spec in requirements[name].specifier if spec.operator == ">="]
        if len(floors) != 1:
            raise SystemExit(f"{pyproject}: {requirements[name]} must declare exactly one '>=' floor")
        pins.append(f"{name}=={floors[0]}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print(" ".join(floor_pins(path)))
