"""lmport_detect_backend's inputs: DetectionEnv probes, and FakeMachine standing in for hardware."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmport.detection import DetectionEnv, TorchBuild, _parse_torch_version
from lmport.plugins import PluginHost
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution


def test_run_returns_stdout_and_none_for_missing_failing_or_hung_tools(tmp_path):
    env = DetectionEnv()
    assert env.run([sys.executable, "-c", "print('GPU 0')"]) == "GPU 0\n"
    assert env.run(["lmport-no-such-tool-xyz", "--query"]) is None
    assert env.run([sys.executable, "-c", "raise SystemExit(3)"]) is None
    assert env.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2) is None


def test_files_and_modules():
    env = DetectionEnv()
    assert env.module_available("json") and not env.module_available("lmport_no_such_module")
    assert env.path_exists("/") and not env.path_exists("/lmport-no-such-path")
    assert env.read_text("/lmport-no-such-path") is None
    assert env.distribution_version("pluggy") is not None
    assert env.distribution_version("lmport-no-such-dist") is None


def test_torch_build_is_read_without_importing_torch():
    script = (
        "import sys\nfrom lmport.detection import DetectionEnv\n"
        "build = DetectionEnv().torch_build()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(build.version)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    import torch

    assert out.strip() == torch.__version__


def test_torch_version_file_parsing():
    source = "from typing import Optional\n__version__ = '2.9.0+rocm6.4'\ncuda: Optional[str] = None\nhip: Optional[str] = '6.4.1'\n"
    assert _parse_torch_version(source) == TorchBuild(version="2.9.0+rocm6.4", cuda=None, hip="6.4.1")


def test_fake_machine_answers_from_its_tables():
    machine = FakeMachine(
        commands={"tool": "out"},
        files={"/sys/a/b/properties": "x 1", "/dev/neuron0": ""},
        modules=frozenset({"vendor_rt"}),
        distributions={"vendor": "1.0"},
    )
    assert machine.run(["tool", "--flag"]) == "out" and machine.run(["other"]) is None
    assert machine.path_exists("/sys/a") and machine.path_exists("/sys/a/b/properties")
    assert not machine.path_exists("/sys/ab")
    assert machine.glob("/sys/*/b/properties") == ["/sys/a/b/properties"]
    assert machine.glob("/dev/neuron*") == ["/dev/neuron0"]
    assert machine.read_text("/sys/a/b/properties") == "x 1"
    assert machine.module_available("vendor_rt") and not machine.module_available("json")
    assert machine.distribution_version("vendor") == "1.0"
    assert machine.with_environ(A="1").environ == {"A": "1"}


@pytest.mark.parametrize(
    "machine, expected",
    [
        (FakeMachine.bare(), "cpu"),
        (FakeMachine.nvidia("8.0"), "cuda"),
        (FakeMachine.nvidia("7.5", "Tesla T4", "15360 MiB"), "cuda"),
        (FakeMachine.amd(), "rocm"),
        (FakeMachine.gaudi(), "gaudi"),
        (FakeMachine.inferentia2(), "neuron"),
    ],
    ids=["bare", "a100", "t4", "mi250", "gaudi2", "inf2"],
)
def test_lmport_detect_backend_of_the_in_tree_plugins_picks_the_right_one(machine, expected):
    for dist in ("lmport-cuda", "lmport-rocm", "lmport-gaudi", "lmport-neuron"):
        require_distribution(dist, "pip install -e plugins/<hw>")
    host = PluginHost(environ={}, detection_env=machine)
    detected = {info.name for _, info in host.detect()}
    assert detected == {"cpu", expected}
    assert host.select_backend().backend.name == expected


def test_gpu_plugins_need_a_matching_torch_build():
    require_distribution("lmport-cuda")
    from dataclasses import replace

    from lmport.testing.fake_machine import CPU_TORCH

    host = PluginHost(environ={}, detection_env=replace(FakeMachine.nvidia(), torch=CPU_TORCH))
    assert {info.name for _, info in host.detect()} == {"cpu"}


def test_cpu_fast_dtypes_follow_the_bf16_flags():
    """bfloat16 is a fast dtype of the CPU backend only where the CPU has bf16 dot products."""
    from lmport.backends.cpu.plugin import has_bf16_dot_products

    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire_rapids = "flags\t\t: avx512f amx_bf16 amx_tile\n"
    skylake = "flags\t\t: fpu avx2 avx512f avx512bw\n"
    assert has_bf16_dot_products(zen4) and has_bf16_dot_products(sapphire_rapids)
    assert not has_bf16_dot_products(skylake) and not has_bf16_dot_products("")
