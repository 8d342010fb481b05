"""``lmport backends``: plugins, the active backend and why, its flags; --json and --backend."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from lmport.commands import backends
from lmport.testing.installed import require_distribution


def run(monkeypatch, *argv: str, **environ: str) -> tuple[int, str]:
    for key in [k for k in os.environ if k.startswith("LMPORT_")]:
        monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    backends.add_parser(parser.add_subparsers())
    args = parser.parse_args(["backends", *argv])
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


def test_json_lists_plugins_active_backend_reason_and_flags(monkeypatch):
    code, text = run(monkeypatch, "--json")
    report = json.loads(text)
    assert code == 0
    cpu = next(p for p in report["plugins"] if p["name"] == "cpu")
    assert cpu == {**cpu, "distribution": "lmport", "loaded": True, "active": True, "error": None}
    assert report["active"]["backend"]["name"] == "cpu"
    assert report["active"]["reason"] == "no accelerator backend detected"
    assert report["active"]["capabilities"]["paged_attention"] is True
    assert "error" not in report


def test_text_output_names_the_backend_the_reason_and_the_flags(monkeypatch):
    code, text = run(monkeypatch, "--backend", "cpu")
    assert code == 0
    assert "Active backend: cpu" in text
    assert "chosen because: requested with --backend=cpu" in text
    assert "sliding_window_attention   True" in text
    assert text.splitlines()[0] == "Plugins:"


def test_a_backend_that_cannot_be_used_exits_non_zero_with_the_reason(monkeypatch):
    code, text = run(monkeypatch, "--json", LMPORT_BACKEND="no-such-backend")
    report = json.loads(text)
    assert code == 1
    assert report["error"].startswith("backend 'no-such-backend' is not installed; installed backends: ")
    assert "active" not in report


def test_a_plugin_import_error_is_listed(monkeypatch, tmp_path):
    info = tmp_path / "lmport_test_cmd_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmport-test-cmd-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lmport.backends]\ncmdbroken = lmport_test_cmd_broken_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, text = run(monkeypatch)
    assert code == 0
    row = next(line for line in text.splitlines() if line.strip().startswith("cmdbroken"))
    assert "lmport-test-cmd-broken" in row
    assert "error: ModuleNotFoundError: No module named 'lmport_test_cmd_broken_missing'" in row


def test_fake_vendor_is_active_when_its_device_is_present(monkeypatch):
    require_distribution("lmport-fake-vendor", "pip install -e tests/fake_vendor")
    code, text = run(monkeypatch, "--json", LMPORT_FAKE_VENDOR_DEVICE="1")
    report = json.loads(text)
    assert report["active"]["backend"]["name"] == "fake"
    assert report["active"]["reason"] == "highest priority (50) among detected backends; also detected: cpu"


@pytest.mark.skipif(
    any(importlib.util.find_spec(f"lmport.commands.{c}") is None for c in ("launch", "bench")),
    reason="the lmport CLI imports lmport.commands.launch and .bench, which are not written yet",
)
def test_through_the_lmport_cli():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMPORT_")}
    done = subprocess.run(
        [sys.executable, "-m", "lmport.cli", "backends", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["active"]["backend"]["name"] == "cpu"
