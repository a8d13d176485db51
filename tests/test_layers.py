"""The layers, checked from the source: data flows one way, quantize → (mobile_runtime | ios_export) → demo/ptq4ris.

``quantize`` (with ``quantize.deploy``, the calibrated graph both backends lower) imports no backend and nothing
downstream; the two backends never import each other; no module reaches into another package's private names; and
importing ``quantize`` loads neither ExecuTorch nor coremltools. The imports are read with ``ast`` (function-local ones
included), so a lazy import that breaks a layer is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quantize", "mobile_runtime", "ios_export", "demo", "ptq4ris", "tests")

# What each layer must not import (top-level package names).
FORBIDDEN = {
    "quantize": {"mobile_runtime", "ios_export", "demo", "ptq4ris"},
    "mobile_runtime": {"ios_export", "demo", "ptq4ris"},
    "ios_export": {"mobile_runtime", "demo", "ptq4ris"},
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted name of the importing module
    module: str  # dotted name of the imported module
    name: str | None  # the name taken from it (``from module import name``), None for ``import module``
    line: int

    def __str__(self) -> str:
        what = f"from {self.module} import {self.name}" if self.name else f"import {self.module}"
        return f"{self.importer}:{self.line}: {what}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str, path: Path) -> str:
    """The package a module belongs to: itself for an ``__init__``, else its parent."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(path: Path) -> list[Import]:
    module = _module_name(path)
    package = _package_of(module, path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found += [Import(module, source, alias.name, node.lineno) for alias in node.names]
    return found


def _files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


ALL = {package: [i for path in _files(package) for i in _imports(path)] for package in PACKAGES}


def test_every_package_is_read():
    assert all(ALL[package] for package in PACKAGES), [p for p in PACKAGES if not ALL[p]]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_downstream_or_the_other_backend(layer):
    bad = [str(i) for i in ALL[layer] if i.module.split(".")[0] in FORBIDDEN[layer]]
    assert not bad, f"{layer} must not import {sorted(FORBIDDEN[layer])}:\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_from_another_package():
    """``from pkg.mod import _name`` only within ``pkg`` (a private name is a package's own business)."""
    first_party = set(PACKAGES)
    bad = []
    for path in (p for package in PACKAGES for p in _files(package)):
        module = _module_name(path)
        package = _package_of(module, path)
        for i in _imports(path):
            if i.module.split(".")[0] not in first_party:
                continue
            own = i.module == package or i.module.startswith(package + ".")
            names = i.module.split(".") + ([i.name] if i.name else [])
            if not own and any(_private(n) for n in names):
                bad.append(str(i))
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


def test_importing_quantize_loads_no_backend():
    """The calibrated graph is backend-neutral: the backends' heavy imports happen in the backends."""
    modules = ["quantize", "quantize.calibration.artifact", "quantize.data"] + [
        _module_name(p) for p in _files("quantize/deploy")
    ]
    code = (
        f"import sys\nimport {', '.join(modules)}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'executorch', 'coremltools'}))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
