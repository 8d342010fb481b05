"""lmport.testing's pytest plugin is loaded through its pytest11 entry point and serves fixtures."""

from __future__ import annotations

import importlib.metadata

from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution


def test_registered_as_a_pytest11_entry_point(pytestconfig):
    entry = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert entry["lmport"] == "lmport.testing.pytest_plugin"
    assert pytestconfig.pluginmanager.has_plugin("lmport")


def test_lmport_environ_drops_selection_variables(monkeypatch, request):
    monkeypatch.setenv("LMPORT_BACKEND", "rocm")
    environ = request.getfixturevalue("lmport_environ")
    assert "LMPORT_BACKEND" not in environ


def test_plugin_host_factory_runs_real_detection_on_a_fake_machine(plugin_host_factory):
    require_distribution("lmport-cuda", "pip install -e plugins/cuda")
    host = plugin_host_factory(FakeMachine.nvidia("8.6", "NVIDIA A10G", "23028 MiB"))
    assert host.select_backend().backend.description == "1 x NVIDIA A10G (sm_86, 22 GiB)"
    assert plugin_host_factory(LMPORT_BACKEND="cpu").select_backend().reason == "requested with LMPORT_BACKEND=cpu"


def test_report_header_names_the_installed_backends(pytestconfig):
    from lmport.testing.pytest_plugin import pytest_report_header

    header = pytest_report_header(pytestconfig)
    assert header.startswith("lmport backends installed: cpu")
