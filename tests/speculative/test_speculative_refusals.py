"""Where speculative decoding could not be exact (or would read freed blocks), start-up says so."""

from __future__ import annotations

import pytest

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.installed import require_distribution
from lmport.testing.tiny_models import TINY_MODELS, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

STATIC = {"LMPORT_FAKE_VENDOR_DEVICE": "1", "LMPORT_FAKE_VENDOR_PROFILE": "static", "LMPORT_BACKEND": "fake"}


def cpu_host() -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend("cpu")
    return host


def build(path, host=None, **settings):
    config = LaunchConfig(model_id=str(path), dtype="float32", block_size=8, max_batch_total_tokens=512, **settings)
    return build_llm_engine(config, host or cpu_host())[0]


def test_negative_speculate(checkpoints):
    with pytest.raises(ValueError, match="--speculate must be at least 0"):
        build(checkpoints["target"], speculate=-1)


def test_a_draft_with_another_vocabulary(checkpoints, tmp_path):
    config = TINY_MODELS["llama"]()
    config.vocab_size = 256
    make_checkpoint("llama", tmp_path, config=config)
    with pytest.raises(ValueError, match="its vocabulary \\(256 tokens\\) is not the target's \\(384\\)"):
        build(checkpoints["target"], speculative_model=str(tmp_path))


def test_a_draft_beside_a_windowed_target(tmp_path, checkpoints):
    make_checkpoint("mistral", tmp_path)  # every layer windowed: old blocks go back to the pool
    train_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="every layer is windowed"):
        build(tmp_path, speculative_model=str(checkpoints["target"]))
    assert build(tmp_path, speculate=2).speculator.method == "ngram"  # n-gram lookup reads nothing freed


def test_a_static_shape_backend(checkpoints):
    require_distribution("lmport-fake-vendor", "pip install -e tests/fake_vendor")
    host = PluginHost(environ=STATIC)
    host.select_backend()
    with pytest.raises(ValueError, match="static shapes"):
        build(checkpoints["target"], host, speculate=2)
