"""The wheel ships every package: ``pyproject.toml`` lists packages explicitly (``kernels/``
is mapped to ``streamprune.kernels``), so a new package folder must be added there — a
missing one installs fine in editable mode and breaks only in a built wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "streamprune").rglob("__init__.py")}
    found |= {"streamprune.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but not a package: {sorted(listed - found)}"
    assert setup["package-dir"]["streamprune.kernels"] == "kernels"
