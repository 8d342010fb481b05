"""Every CLI command works after the README's install (``pip install -e ".[gguf]"``).

The development venv also holds the ``test`` extra, which once hid that ``lmport bench`` needed
httpx from it. Two checks, each against the installed distribution's own metadata:
every third-party import in the core (at any depth, function-level included) comes from a
distribution that the README's install pulls in, and the commands run in a subprocess in which
the packages only the test extra brings cannot be imported.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lmport

CORE = Path(lmport.__file__).parent
README_EXTRAS = {"gguf"}  # the README's install: pip install -e ".[gguf]"
# lmport.testing is the pytest plugin (pytest loads it; it needs pytest by nature)
NOT_SHIPPED_TO_USERS = {CORE / "testing"}
# installed by scripts/install-dev.sh beside the test extra (with --no-deps), never by the README
DEV_ONLY_IMPORTS = {"text_generation"}


def _closure(distribution: str, extras: set[str]) -> set[str]:
    """The distribution and everything it requires (transitively) with those extras on."""
    seen: set[str] = set()
    todo = [(distribution, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed here (its marker excluded it)
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether an import sits in ``try: ... except ImportError`` (an optional dependency)."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, ast.Try) and child in node.body:
            for handler in node.handlers:
                names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if any(isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"} for n in names):
                    return True
    return False


def _core_imports() -> dict[str, set[str]]:
    """Top-level names of the third-party modules the core imports unguarded -> the files."""
    found: dict[str, set[str]] = {}
    for path in CORE.rglob("*.py"):
        if any(path.is_relative_to(skip) for skip in NOT_SHIPPED_TO_USERS):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "lmport" and top not in sys.stdlib_module_names and not _guarded(node, parents):
                    found.setdefault(top, set()).add(str(path.relative_to(CORE.parent)))
    return found


def test_every_core_import_comes_from_the_readme_install():
    allowed = _closure("lmport", README_EXTRAS)
    providers = metadata.packages_distributions()
    imports = _core_imports()
    assert {"torch", "fastapi", "httpx", "transformers"} <= set(imports)  # the scan sees the core
    missing = {
        top: sorted(files)
        for top, files in imports.items()
        if not {canonicalize_name(d) for d in providers.get(top, [])} & allowed
    }
    assert not missing, f"imported by the core but not installed by `pip install lmport[gguf]`: {missing}"


def _test_only_imports() -> set[str]:
    """Import names of what only the test extra (and the dev script) brings."""
    test_only = _closure("lmport", README_EXTRAS | {"test"}) - _closure("lmport", README_EXTRAS)
    names = {top for top, dists in metadata.packages_distributions().items()
             if {canonicalize_name(d) for d in dists} & test_only}  # fmt: skip
    return names | DEV_ONLY_IMPORTS


# Runs in a fresh interpreter: hides the test-only packages, imports every shipped module of the
# core, then runs the commands that need more than --help.
_CHILD = r"""
import importlib, importlib.abc, json, pkgutil, sys
hidden = set(json.loads(sys.argv[1]))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: test extra only)", name=name)
sys.meta_path.insert(0, Hide())
import lmport
from lmport import cli
for info in pkgutil.walk_packages(lmport.__path__, "lmport."):
    if not info.name.startswith("lmport.testing"):
        importlib.import_module(info.name)
print("bench:", cli.main(["bench", "--port", sys.argv[2], "--vocab-size", "100", "--num-prompts", "1", "--no-progress"]))
print("backends:", cli.main(["backends", "--json"]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_commands_run_without_the_test_extra():
    hidden = _test_only_imports()
    assert {"pytest", "openai"} <= hidden
    for command in ("launch", "backends", "bench"):
        help_run = subprocess.run([sys.executable, "-c", _CHILD.split("import lmport")[0] + "from lmport import cli\n"
                                   f"cli.main(['{command}', '--help'])", json.dumps(sorted(hidden))],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        assert help_run.returncode == 0, help_run.stderr
        assert f"usage: lmport {command}" in help_run.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMPORT_")}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sorted(hidden)), str(_free_port())],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # bench reached its HTTP client and found nothing serving there (exit 2), not an ImportError
    assert "bench: 2" in done.stdout and "is not serving" in done.stderr, done.stderr
    report = json.loads(done.stdout.split("bench: 2")[1].split("backends:")[0])
    assert report["active"]["backend"]["name"] == "cpu"
