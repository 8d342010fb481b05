"""What a backend's detection hook may look at, passed in explicitly.

Detection runs before any backend is chosen, in every process that starts lmport, so it must
be cheap and must never create a device context: no ``torch.cuda.*``, no kernel launch. A
:class:`DetectionEnv` offers the probes that are safe: environment variables, whether a
module could be imported (``find_spec``, no import), a driver tool's output (short timeout),
files under ``/sys`` and ``/dev``, and how the installed torch was built (read from its
``version.py`` without importing torch).

Detection hooks use only these methods, so a test can hand the host a
:class:`lmport.testing.fake_machine.FakeMachine` (a subclass that answers from tables) and
run the real detection code against an A100, a T4 or an MI250 that isn't there.
"""

from __future__ import annotations

import ast
import glob as _glob
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

# A driver tool that takes longer than this is treated as absent: detection runs at every start.
COMMAND_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TorchBuild:
    """How the installed torch was built, read from ``torch/version.py`` without importing it."""

    version: str | None = None
    cuda: str | None = None  # CUDA toolkit version of a CUDA build
    hip: str | None = None  # HIP version of a ROCm build

    @property
    def installed(self) -> bool:
        return self.version is not None


@dataclass(frozen=True)
class DetectionEnv:
    environ: Mapping[str, str] = field(default_factory=dict)
    machine: str = field(default_factory=platform.machine)
    system: str = field(default_factory=platform.system)

    def module_available(self, name: str) -> bool:
        """True if ``name`` can be imported, without importing it (no device context)."""
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> str | None:
        """stdout of a driver tool (``nvidia-smi ...``), or ``None`` if it is missing, fails or hangs."""
        if shutil.which(argv[0]) is None:
            return None
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    def path_exists(self, path: str) -> bool:
        return os.path.exists(path)

    def glob(self, pattern: str) -> list[str]:
        return sorted(_glob.glob(pattern))

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    def distribution_version(self, name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def torch_build(self) -> TorchBuild:
        """``torch.version``'s fields, parsed from the file so that torch is not imported here."""
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return TorchBuild()
        for location in spec.submodule_search_locations:
            source = self.read_text(os.path.join(location, "version.py"))
            if source is not None:
                return _parse_torch_version(source)
        return TorchBuild()


def _parse_torch_version(source: str) -> TorchBuild:
    values: dict[str, str | None] = {}
    for node in ast.parse(source).body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            if value.value is None or isinstance(value.value, str):
                values[target.id] = value.value
    return TorchBuild(version=values.get("__version__"), cuda=values.get("cuda"), hip=values.get("hip"))
