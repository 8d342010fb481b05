"""PluginHost: entry-point loading, allow/block lists, broken plugins, backend selection."""

from __future__ import annotations

import sys
import textwrap

import pytest

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.plugins import BACKENDS_GROUP, PluginError, PluginHost
from lmport.testing.fake_machine import FakeMachine


@pytest.fixture
def dist_dir(tmp_path, monkeypatch):
    """A folder on sys.path where a test installs tiny distributions (dist-info + module)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("lmport_test_")]:
        del sys.modules[name]


def install_backend(root, dist: str, entry: str, module: str, source: str | None) -> None:
    """Write ``dist``'s metadata with ``entry = module`` in lmport.backends, and the module."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[{BACKENDS_GROUP}]\n{entry} = {module}\n")
    if source is not None:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


GOOD_BACKEND = """
from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities

@hookimpl
def lmport_detect_backend(env):
    if env.environ.get("TEST_ACCEL") == "1":
        return BackendInfo(name="accel", device_type="cpu", priority=5)

@hookimpl
def lmport_capabilities(backend):
    if backend.name == "accel":
        return Capabilities(backend="accel", device_type="cpu", kv_block_sizes=(32,))
"""


def test_entry_point_backend_is_loaded_with_its_distribution(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    host = PluginHost(environ={}).load()
    record = host.records["accel"]
    assert record.loaded and record.error is None
    assert (record.distribution, record.version, record.group) == ("lmport-test-accel", "1.2.3", BACKENDS_GROUP)
    # core plugins are registered after every external one
    names = list(host.records)
    assert names.index("accel") < names.index("cpu")


def test_detected_backend_of_highest_priority_is_selected(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    host = PluginHost(environ={"TEST_ACCEL": "1"}, detection_env=FakeMachine.bare({"TEST_ACCEL": "1"}))
    selection = host.select_backend()
    assert selection.backend.name == "accel"
    assert selection.reason == "highest priority (5) among detected backends; also detected: cpu"
    assert host.capabilities().kv_block_sizes == (32,)


def test_cpu_is_the_default_when_nothing_else_is_detected(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    host = PluginHost(environ={}, detection_env=FakeMachine.bare())
    selection = host.select_backend()
    assert selection.backend.name == "cpu"
    assert selection.reason == "no accelerator backend detected"
    assert [info.name for info in selection.detected] == ["cpu"]


def test_broken_plugin_is_reported_not_fatal(dist_dir):
    install_backend(dist_dir, "lmport-test-broken", "broken", "lmport_test_broken", "import no_such_module_xyz\n")
    host = PluginHost(environ={}, detection_env=FakeMachine.bare())
    assert host.select_backend().backend.name == "cpu"
    record = host.records["broken"]
    assert not record.loaded
    assert record.error == "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    assert record.to_dict()["error"] == record.error


def test_broken_plugin_is_fatal_when_it_is_the_one_selected(dist_dir):
    install_backend(dist_dir, "lmport-test-broken", "broken", "lmport_test_broken", "raise RuntimeError('no driver')\n")
    host = PluginHost(environ={"LMPORT_BACKEND": "broken"}, detection_env=FakeMachine.bare())
    with pytest.raises(PluginError, match=r"backend 'broken' \(lmport-test-broken\) failed to load: RuntimeError: no driver"):
        host.select_backend()


def test_detection_that_raises_is_isolated():
    class Faulty:
        @hookimpl
        def lmport_detect_backend(self, env):
            raise OSError("driver hung")

    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    host.register(Faulty(), "faulty", BACKENDS_GROUP)
    assert host.select_backend().backend.name == "cpu"
    assert host.records["faulty"].error == "detection failed: OSError: driver hung"


def test_allow_list_loads_only_named_plugins(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    install_backend(dist_dir, "lmport-test-other", "other", "lmport_test_other", GOOD_BACKEND.replace('"accel"', '"other"'))
    host = PluginHost(environ={"LMPORT_PLUGINS": "other"}).load()
    assert host.records["accel"].disabled and not host.records["accel"].loaded
    assert host.records["other"].loaded
    assert host.records["cpu"].loaded  # the core always loads


def test_block_list_disables_a_plugin_and_says_so_when_requested(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    host = PluginHost(environ={"LMPORT_DISABLE_PLUGINS": "accel, something-else", "TEST_ACCEL": "1"})
    with pytest.raises(PluginError, match="disabled by LMPORT_PLUGINS/LMPORT_DISABLE_PLUGINS"):
        host.select_backend("accel")
    assert host.records["accel"].disabled


def test_reason_names_the_argument_when_the_argument_wins():
    host = PluginHost(environ={"LMPORT_BACKEND": "cpu"}, detection_env=FakeMachine.bare())
    assert host.select_backend("cpu").reason == "requested with --backend=cpu"


def test_reason_names_the_environment_variable():
    host = PluginHost(environ={"LMPORT_BACKEND": "cpu"}, detection_env=FakeMachine.bare())
    assert host.select_backend().reason == "requested with LMPORT_BACKEND=cpu"


def test_argument_overrides_the_environment_variable(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    env = {"LMPORT_BACKEND": "accel", "TEST_ACCEL": "1"}
    host = PluginHost(environ=env, detection_env=FakeMachine.bare(env))
    assert host.select_backend("cpu").backend.name == "cpu"


def test_unknown_backend_lists_the_installed_ones():
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    with pytest.raises(PluginError, match=r"backend 'tpu' is not installed; installed backends: cpu"):
        host.select_backend("tpu")


def test_installed_but_undetected_backend_is_an_error_naming_what_was_detected(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    host = PluginHost(environ={}, detection_env=FakeMachine.bare())
    with pytest.raises(PluginError, match=r"'accel' is installed but found no usable device; detected: cpu"):
        host.select_backend("accel")


def test_exactly_one_backend_stays_registered(dist_dir):
    install_backend(dist_dir, "lmport-test-accel", "accel", "lmport_test_accel", GOOD_BACKEND)
    env = {"TEST_ACCEL": "1"}
    host = PluginHost(environ=env, detection_env=FakeMachine.bare(env))
    host.select_backend("cpu")
    # the accel plugin was unregistered: its capabilities hook can no longer answer
    assert host.capabilities().backend == "cpu"
    assert host.select_backend().backend.name == "cpu"  # asking again returns the same selection
    with pytest.raises(PluginError, match="'cpu' is already active; one backend per process"):
        host.select_backend("accel")


def test_backend_property_before_selection_is_an_error():
    with pytest.raises(PluginError, match="call select_backend"):
        PluginHost(environ={}).backend


def test_capabilities_must_be_a_capabilities_object():
    class Sloppy:
        @hookimpl
        def lmport_detect_backend(self, env):
            return BackendInfo(name="sloppy", device_type="cpu", priority=1)

        @hookimpl
        def lmport_capabilities(self, backend):
            return {"backend": "sloppy"}

    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    host.register(Sloppy(), "sloppy", BACKENDS_GROUP)
    host.select_backend()
    with pytest.raises(PluginError, match="reported dict, not Capabilities"):
        host.capabilities()


def test_report_marks_the_active_plugin_and_carries_the_flags():
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    host.select_backend()
    report = host.report()
    active = [p["name"] for p in report["plugins"] if p["active"]]
    assert active == ["cpu"]
    assert report["active"]["capabilities"] == host.capabilities().to_dict()
    assert report["active"]["reason"] == "no accelerator backend detected"
    assert isinstance(host.capabilities(), Capabilities)


def test_a_plugin_with_an_unknown_hook_is_isolated_not_fatal(dist_dir):
    typo = "from lmport import hookimpl\n\n@hookimpl\ndef lmport_detect_backends(env):\n    return None\n"
    install_backend(dist_dir, "lmport-test-typo", "typo", "lmport_test_typo", typo)
    bad_args = "from lmport import hookimpl\n\n@hookimpl\ndef lmport_capabilities(backend, extra):\n    return None\n"
    install_backend(dist_dir, "lmport-test-args", "args", "lmport_test_args", bad_args)
    host = PluginHost(environ={}, detection_env=FakeMachine.bare())
    assert host.select_backend().backend.name == "cpu"
    assert "unknown hook 'lmport_detect_backends'" in host.records["typo"].error
    assert not host.records["typo"].loaded
    assert "extra" in host.records["args"].error and not host.records["args"].loaded


def test_an_entry_point_cannot_take_the_core_backends_name(dist_dir):
    install_backend(dist_dir, "lmport-test-cpu", "cpu", "lmport_test_cpu", GOOD_BACKEND)
    host = PluginHost(environ={}, detection_env=FakeMachine.bare())
    host.load()
    assert host.records["cpu"].distribution == "lmport"
    assert host.select_backend().backend.name == "cpu"
