"""The wheel ships every package: ``pyproject.toml`` lists packages explicitly, so a new
package folder must be added there — a missing one installs fine in editable mode and
breaks only in a built wheel (tests/test_install.py builds one). ``kernels/`` reaches the
package as ``streamprune/kernels``, a link to it, and has no ``__init__.py`` so that it can
never shadow Hugging Face's ``kernels`` package (kernels/README.md)."""

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "streamprune").rglob("__init__.py")}
    found |= {"streamprune.kernels"}  # a namespace package: no __init__.py to find
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but not a package: {sorted(listed - found)}"
    assert "package-dir" not in setup


def test_kernels_folder_cannot_shadow_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists() and not (ROOT / "kernels.py").exists()
    link = ROOT / "streamprune" / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"
