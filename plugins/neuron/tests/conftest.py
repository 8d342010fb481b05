"""The stand-in Neuron stack (tests only): optimum-neuron 0.4, torch_neuronx, neuronx_distributed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fake_neuron_stack  # noqa: E402


@pytest.fixture
def neuron_stack(monkeypatch):
    for name, module in fake_neuron_stack.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_neuron_stack.RUNTIME.__init__()
    return fake_neuron_stack
