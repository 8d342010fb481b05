"""lmport-gaudi's whole-model executor against stand-in habana_frameworks.torch / optimum-habana
modules on the CPU (tests/fake_habana_stack.py): loading through adapt_transformers_to_gaudi and
HPU graphs, bucketed static shapes warmed up at start (and nothing else run after), limits,
and the conformance suite for whole-model executors. No Gaudi has run this."""

from __future__ import annotations

import logging

import pytest

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.executor_conformance import WholeModelConformance
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

require_distribution("lmport-gaudi", "pip install --no-deps -e plugins/gaudi")

SMALL_BUCKETS = (("gaudi_bucket_size", 16),)


def gaudi_host() -> PluginHost:
    host = PluginHost(environ={}, detection_env=FakeMachine.gaudi(count=1))
    assert host.select_backend().backend.name == "gaudi"
    return host


class TestGaudiWholeModelConformance(WholeModelConformance):
    backend_name = "gaudi"
    distribution = "lmport-gaudi"
    settings = {"extra": SMALL_BUCKETS}

    @classmethod
    def make_host(cls) -> PluginHost:
        return gaudi_host()

    @pytest.fixture
    def device_stack(self, habana_stack):
        yield habana_stack


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gaudi-llama")
    make_checkpoint("llama", path)
    train_tiny_tokenizer().save_pretrained(path)
    return path


def test_loaded_through_optimum_habana_in_hpu_graphs_with_every_bucket_warmed_up(checkpoint, habana_stack, caplog):
    with caplog.at_level(logging.INFO):
        engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(checkpoint), dtype="float32", max_batch_size=3,
                                                     max_total_tokens=24, extra=SMALL_BUCKETS), gaudi_host())
    executor = engine.executor
    assert habana_stack.STATE.adapted == 1
    assert isinstance(executor.model, habana_stack.HpuGraphModule)
    config = executor.model.generation_config
    assert config.static_shapes and config.bucket_size == 16
    assert executor.device.type == "cpu"  # the stand-in bridge has no HPU: nothing names "hpu"
    assert executor.shapes() == [(b, n) for b in (1, 2, 3) for n in (16, 32)]
    assert set(habana_stack.STATE.graphs) == set(executor.shapes())
    assert "gaudi: warmed up 6 shape buckets" in caplog.text and executor.warmup["seconds"] >= 0
    assert engine.limits.block_size == 128 and not engine.limits.enable_prefix_caching

    habana_stack.STATE.warm = True
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.generate([GenerationRequest(f"r{i}", tuple(range(5, 9 + 4 * i)), params) for i in range(4)])
    assert habana_stack.STATE.captured_after_warmup == [], "serving ran a shape the warm-up did not capture"
    assert habana_stack.STATE.mark_steps > len(executor.shapes())


def test_bf16_is_the_default_dtype(checkpoint, habana_stack):
    import torch

    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(checkpoint), max_batch_size=1, max_total_tokens=16,
                                                 extra=SMALL_BUCKETS), gaudi_host())
    assert next(engine.executor.model.parameters()).dtype == torch.bfloat16


def test_a_max_input_past_the_warmed_up_length_is_refused(checkpoint, habana_stack):
    from lmport.whole_model import CompiledShapeError

    with pytest.raises(CompiledShapeError, match="--max-input-tokens 40 >= the compiled sequence length 40"):
        build_llm_engine(LaunchConfig(model_id=str(checkpoint), dtype="float32", max_total_tokens=40,
                                      max_input_tokens=40, extra=SMALL_BUCKETS), gaudi_host())
