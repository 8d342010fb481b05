"""The core never imports a plugin distribution: in-tree plugins are built like third parties'."""

from __future__ import annotations

import ast
from pathlib import Path

import lmport

CORE = Path(lmport.__file__).resolve().parent
PLUGIN_PACKAGES = {"lmport_cuda", "lmport_rocm", "lmport_gaudi", "lmport_neuron", "lmport_fake_vendor"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return names


def test_no_core_module_imports_a_plugin_package():
    offenders = {
        str(path.relative_to(CORE)): sorted(m for m in imported_modules(path) if m.split(".")[0] in PLUGIN_PACKAGES)
        for path in CORE.rglob("*.py")
    }
    offenders = {path: mods for path, mods in offenders.items() if mods}
    assert not offenders, f"core modules import plugin packages: {offenders}"


def test_the_scan_sees_every_import_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import lmport_cuda.plugin\nfrom lmport_rocm import plugin\n"
        "import importlib\nimportlib.import_module('lmport_gaudi.plugin')\n__import__('lmport_neuron')\n"
    )
    assert imported_modules(sample) >= {"lmport_cuda.plugin", "lmport_rocm", "lmport_gaudi.plugin", "lmport_neuron"}
