"""An out-of-tree backend (tests/fake_vendor, installed with pip) plugs in with no core change:
selected by name or by detection, its attention and KV allocation are the ones that run, and
a model generates exactly what it generates on the CPU backend."""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.layers.attention import Attention, KVCacheSpec
from lmport.layers.reference_attention import ReferenceAttention
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import PluginError, PluginHost
from lmport.testing.installed import require_distribution
from lmport.testing.model_driver import greedy_generate
from lmport.testing.tiny_models import make_checkpoint

require_distribution("lmport-fake-vendor", "pip install -e tests/fake_vendor")

from lmport_fake_vendor.attention import CountingAttention  # noqa: E402

DEVICE = {"LMPORT_FAKE_VENDOR_DEVICE": "1"}


def test_selected_with_lmport_backend_when_its_device_is_present():
    host = PluginHost(environ={"LMPORT_BACKEND": "fake", **DEVICE})
    selection = host.select_backend()
    assert selection.backend.name == "fake" and selection.reason == "requested with LMPORT_BACKEND=fake"
    assert host.records["fake"].distribution == "lmport-fake-vendor"


def test_auto_selected_over_the_cpu_when_detected():
    selection = PluginHost(environ=DEVICE).select_backend()
    assert selection.backend.name == "fake"
    assert selection.reason.startswith("highest priority (50) among detected backends")


def test_without_its_device_it_is_installed_but_not_usable():
    with pytest.raises(PluginError, match="'fake' is installed but found no usable device"):
        PluginHost(environ={"LMPORT_BACKEND": "fake"}).select_backend()
    assert PluginHost(environ={}).select_backend().backend.name == "cpu"


def test_its_config_adjustment_and_server_info():
    host = PluginHost(environ={"LMPORT_BACKEND": "fake", **DEVICE})
    host.select_backend()
    config, adjustments = host.adjust_config(LaunchConfig(block_size=32))
    assert config.block_size == 16 and adjustments[0].plugin == "fake"
    assert host.server_info()["device_name"] == "FakeAccel 1"


def test_its_kv_allocation_is_the_one_called():
    host = PluginHost(environ={"LMPORT_BACKEND": "fake", **DEVICE})
    host.select_backend()
    caches = host.allocate_kv_cache(KVCacheSpec(3, 2, 16, 8, torch.float32), 4, torch.device("cpu"))
    storages = {t.untyped_storage().data_ptr() for pair in caches for t in pair}
    assert len(storages) == 1, "the vendor allocates one slab for all layers"
    assert caches[2][1].shape == (4, 8, 2, 16)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint("llama", path)
    return resolve_model_info(path)


def generate(info, environ, prompts):
    host = PluginHost(environ=environ)
    host.select_backend()
    model = build_native_model(info, host, torch.float32, torch.device("cpu"))
    block_size = host.capabilities().default_block_size
    tokens = greedy_generate(model, prompts, 8, host=host, block_size=block_size, prefill_chunk=5)
    backends = [m.backend for m in model.modules() if isinstance(m, Attention)]
    return tokens, backends


def test_a_model_on_the_fake_backend_runs_its_attention_and_matches_the_cpu_backend(tiny_llama):
    prompts = [[1, 17, 42, 99, 5, 230, 8], [1, 300], [1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 12]]
    fake_tokens, fake_backends = generate(tiny_llama, {"LMPORT_BACKEND": "fake", **DEVICE}, prompts)
    cpu_tokens, cpu_backends = generate(tiny_llama, {"LMPORT_BACKEND": "cpu"}, prompts)
    assert fake_backends and all(type(b) is CountingAttention for b in fake_backends)
    assert all(b.calls > 0 for b in fake_backends)
    assert all(type(b) is ReferenceAttention for b in cpu_backends)
    assert fake_tokens == cpu_tokens
    assert all(len(t) == 8 for t in fake_tokens)
