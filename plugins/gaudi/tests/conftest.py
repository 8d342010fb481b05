"""The stand-in Gaudi stack (tests only): habana_frameworks.torch and optimum-habana."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fake_habana_stack  # noqa: E402


@pytest.fixture
def habana_stack(monkeypatch):
    for name, module in fake_habana_stack.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_habana_stack.STATE.__init__()
    return fake_habana_stack
