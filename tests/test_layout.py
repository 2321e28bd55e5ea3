"""The shape of the house: no module inside lora_core imports the package back (its __init__ only
re-exports), and what pip installs is lora_core alone (no top-level kernels, train, generate, export)."""
import ast
import pkgutil
from pathlib import Path

import pytest

import lora_core

PACKAGE = Path(lora_core.__file__).parent


def test_no_module_imports_the_package_back():
    submodules = {m.name for m in pkgutil.walk_packages([str(PACKAGE)])} | {"kernels", "cli", "export"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name == "lora_core" for a in node.names):
                found.append(f"{path.relative_to(PACKAGE)}: import lora_core")
            elif isinstance(node, ast.ImportFrom) and node.module in ("lora_core", None):
                depth = node.level - (1 if path.parent == PACKAGE else 2 if path.parent.parent == PACKAGE else 3)
                to_package = node.module == "lora_core" or depth == 0
                names = [a.name for a in node.names if a.name not in submodules]
                if to_package and names:
                    found.append(f"{path.relative_to(PACKAGE)}: from the package import {names}")
    assert not found, found


def test_installed_names():
    """pyproject.toml installs lora_core (kernels/ as lora_core.kernels) and console scripts, nothing else."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    packages = config["tool"]["setuptools"]["packages"]
    assert all(p == "lora_core" or p.startswith("lora_core.") for p in packages)
    assert "py-modules" not in config["tool"]["setuptools"]
    assert set(config["project"]["scripts"]) == {"lora-train", "lora-generate", "lora-export"}
    assert lora_core.kernels.__file__.endswith("kernels/__init__.py")
