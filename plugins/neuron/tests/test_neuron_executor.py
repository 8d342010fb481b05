"""lmport-neuron's whole-model executor against stand-in optimum-neuron 0.4 / torch_neuronx /
neuronx_distributed modules on the CPU (tests/fake_neuron_stack.py): loading an exported
folder or exporting at start, the compiled shape checked at start, slots, padding, warm-up,
and the conformance suite for whole-model executors. No Inferentia2 has run this."""

from __future__ import annotations

import logging

import pytest

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.executor_conformance import WholeModelConformance
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer
from lmport.whole_model import CompiledShapeError

require_distribution("lmport-neuron", "pip install --no-deps -e plugins/neuron")


def neuron_host() -> PluginHost:
    host = PluginHost(environ={}, detection_env=FakeMachine.inferentia2())
    assert host.select_backend().backend.name == "neuron"
    return host


class TestNeuronWholeModelConformance(WholeModelConformance):
    backend_name = "neuron"
    distribution = "lmport-neuron"

    @classmethod
    def make_host(cls) -> PluginHost:
        return neuron_host()

    @pytest.fixture
    def device_stack(self, neuron_stack):
        yield neuron_stack


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("neuron-llama")
    make_checkpoint("llama", path)
    train_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def exported(checkpoint, tmp_path, neuron_stack):
    """A folder exported for batch 2, sequence 32 (neuron_config.json beside a link to the weights)."""
    config = neuron_stack.NeuronConfig(batch_size=2, sequence_length=32, checkpoint_id=str(checkpoint))
    for f in checkpoint.iterdir():
        (tmp_path / f.name).symlink_to(f)
    config.save_pretrained(tmp_path)
    return tmp_path


def test_a_checkpoint_is_exported_at_start_with_the_current_api_and_the_compile_announced(checkpoint, neuron_stack, caplog):
    with caplog.at_level(logging.INFO):
        engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(checkpoint), dtype="float32", max_batch_size=3,
                                                     max_total_tokens=40, num_shard=1), neuron_host())
    model = engine.executor.model
    assert (model.neuron_config.batch_size, model.neuron_config.sequence_length) == (3, 40)
    assert neuron_stack.RUNTIME.traced == ["context_encoding", "token_generation"]
    assert neuron_stack.RUNTIME.tp_degree == 1
    assert "compiling it now for batch_size=3, sequence_length=40, tensor_parallel_size=1" in caplog.text
    assert "neuron: compiled in" in caplog.text
    assert engine.limits.max_batch_size == 3 and engine.limits.max_total_tokens == 40
    assert engine.limits.fixed_slots and not engine.limits.enable_prefix_caching
    warmup = engine.executor.warmup
    assert warmup["context_buckets"] == [16, 32, 40] and "warmed up 3 context buckets" in caplog.text


def test_an_exported_folder_loads_and_its_shape_caps_the_engine(exported, neuron_stack):
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(exported), dtype="float32"), neuron_host())
    assert neuron_stack.RUNTIME.traced == []  # loaded, not compiled
    assert (engine.limits.max_batch_size, engine.limits.max_total_tokens) == (2, 32)


@pytest.mark.parametrize("setting, message", [
    ({"max_batch_size": 4}, "--max-batch-size 4 > the compiled batch size 2"),
    ({"max_total_tokens": 64}, "--max-total-tokens 64 > the compiled sequence length 32"),
])
def test_limits_past_the_compiled_shape_are_a_clear_startup_error(exported, neuron_stack, setting, message):
    with pytest.raises(CompiledShapeError) as err:
        build_llm_engine(LaunchConfig(model_id=str(exported), dtype="float32", **setting), neuron_host())
    assert message in str(err.value)
    assert "compiled for batch_size=2, sequence_length=32" in str(err.value)


def test_slots_prefill_into_free_rows_while_the_others_pause(exported, neuron_stack):
    from lmport.engine.api import GenerationRequest, SamplingParams

    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(exported), dtype="float32"), neuron_host())
    model = engine.executor.model
    model.calls.clear()
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 6, 3)]
    out = engine.generate([GenerationRequest(f"r{i}", tuple(range(5, 10 + 3 * i)), p) for i, p in enumerate(params)])
    assert [len([t for o in out[f"r{i}"] for t in o.tokens]) for i in range(3)] == [2, 6, 3]
    kinds = [(kind, ids, shape) for kind, ids, shape in model.calls]
    # r0 and r1 fill slots 0 and 1 (padded to the 16-token bucket); r2 waits for r0's slot,
    # prefilled alone while r1 pauses; decodes feed one token per slot, sorted by slot
    assert kinds[0] == ("prefill", (0, 1), (2, 16))
    assert ("prefill", (0,), (1, 16)) in kinds[2:]
    assert all(shape[1] == 1 for kind, _, shape in kinds if kind == "decode")
    # every finished sequence gave its slot back, but the last, whose release the next step's plan brings
    assert len(engine.executor.slots.used) <= 1


def test_a_step_mixing_prefill_and_decode_is_refused(exported, neuron_stack):
    from lmport.plan import NewSequence, PlanEntry, StepPlan
    import numpy as np

    from lmport.engine.api import SamplingParams

    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(exported), dtype="float32"), neuron_host())
    executor = engine.executor
    params = SamplingParams(max_new_tokens=4)
    prefill = PlanEntry(seq_id=1, request_id="a", start=0, num_new_tokens=3, sample=True, token_ids=[5, 6, 7],
                        is_prefill=True, num_prompt_tokens=3)
    decode = PlanEntry(seq_id=2, request_id="b", start=4, num_new_tokens=1, sample=True, token_ids=[9],
                       is_prefill=False, num_prompt_tokens=4)
    plan = StepPlan([prefill, decode], np.zeros((2, 1), np.int32),
                    new=[NewSequence(1, "a", 0, [5, 6, 7], params), NewSequence(2, "b", 0, [5, 6, 7, 8], params)])
    with pytest.raises(RuntimeError, match="mixes prefill and decode"):
        executor.execute(plan)
    with pytest.raises(RuntimeError, match="decodes without a slot"):
        executor.execute(StepPlan([decode], np.zeros((1, 1), np.int32)))
