"""The wheel's package list in pyproject.toml names every package folder, so none is left out of an install
(edgeft/export/ once was: the wheel had no `edgeft export`). Read from pyproject.toml; nothing is built."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_ships():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    where = {name: ROOT / folder for name, folder in tool.get("package-dir", {}).items()}
    found = set()
    for folder in ("edgeft", "converters", "devices"):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            base = next(name for name, path in {"edgeft": ROOT / "edgeft", **where}.items() if path == ROOT / folder)
            found.add(".".join([base, *parts]))
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"
