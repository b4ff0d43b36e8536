"""pyproject lists every package explicitly; check that none is forgotten and none is stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the tomli package
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> installed package name (pyproject's package-dir).
SOURCES = {"midms_cli": "midms_cli", "plugins": "midms_plugins"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, package in SOURCES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    return found


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(_packages_on_disk() - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_no_listed_package_is_missing_on_disk():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    stale = sorted(listed - _packages_on_disk())
    assert not stale, f"listed in pyproject.toml but no such package directory: {stale}"


def test_package_dir_maps_plugins_to_midms_plugins():
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert package_dir == {"midms_cli": "midms_cli", "midms_plugins": "plugins"}


def test_folders_with_modules_are_packages():
    """A folder of .py files without __init__.py would silently be left out of the wheel."""
    orphans = []
    for folder in SOURCES:
        for module in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in module.parts and not (module.parent / "__init__.py").is_file():
                orphans.append(str(module.parent.relative_to(ROOT)))
    assert not orphans, f"folders with modules but no __init__.py: {sorted(set(orphans))}"


def test_dataset_entry_points_point_into_listed_packages():
    project = _pyproject()
    listed = set(project["tool"]["setuptools"]["packages"])
    for name, target in project["project"].get("entry-points", {}).get("midms.datasets", {}).items():
        module = re.split(r"[:\s]", target)[0]
        package = module if module in listed else module.rpartition(".")[0]  # a package or a module in one
        assert package in listed, f"entry point {name!r} -> {target!r}: {module} is not in a listed package"
