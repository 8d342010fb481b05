"""The conformance suite for whole-model executors (``lmport_model_executor``).

A backend whose stack runs whole models (Neuron, Gaudi, a vendor's compiled engine) runs it
by subclassing, beside :class:`~lmport.testing.conformance.BackendConformance`::

    from lmport.testing.executor_conformance import WholeModelConformance

    class TestMyExecutor(WholeModelConformance):
        backend_name = "mine"
        environ = {"MY_DEVICE": "1"}

Override :meth:`make_host` to detect on a fake machine, and the ``device_stack`` fixture to
install stand-in device modules (both default to the real machine). The suite builds a tiny
Llama through ``build_llm_engine`` with the backend selected and checks: the flag and the
hook agree; the executor takes plans (plain data); its compiled shape, if it has one, bounds
the engine's limits; greedy tokens of more prompts than the batch holds equal the CPU
backend's, alone and with a request aborted midway; a grammar constraint holds; seeded
sampling repeats itself.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.plugins import PluginError, PluginHost
from lmport.testing.installed import require_distribution

PROMPT_LENGTHS = (5, 11, 3, 8, 14)
NEW_TOKENS = 5


class WholeModelConformance:
    """Subclass with ``backend_name`` set (and the class name starting with ``Test``)."""

    backend_name: ClassVar[str] = ""
    distribution: ClassVar[str | None] = None
    environ: ClassVar[dict[str, str]] = {}
    # the shape the engine is asked for (an executor that compiles at start compiles this)
    max_batch_size: ClassVar[int] = 2
    max_total_tokens: ClassVar[int] = 32
    settings: ClassVar[dict[str, Any]] = {}

    # ------------------------------------------------------------------ overridable

    @classmethod
    def make_host(cls) -> PluginHost:
        """The host with the backend selected (default: the real machine's detection)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMPORT_")}
        host = PluginHost(environ={**env, **cls.environ})
        host.select_backend(cls.backend_name)
        return host

    @pytest.fixture
    def device_stack(self):
        """Install whatever the backend's device layer needs (stand-ins in tests); default: nothing."""
        yield

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, tmp_path_factory):
        from lmport.testing.tiny_models import make_checkpoint
        from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

        path = tmp_path_factory.mktemp("whole-model-llama")
        make_checkpoint("llama", path)
        train_tiny_tokenizer().save_pretrained(path)
        return path

    @pytest.fixture
    def host(self, device_stack) -> PluginHost:
        if not self.backend_name:
            pytest.fail(f"{type(self).__name__} must set backend_name", pytrace=False)
        if self.distribution:
            require_distribution(self.distribution)
        try:
            return self.make_host()
        except PluginError as exc:
            pytest.skip(f"backend '{self.backend_name}' not usable here: {exc}")

    @classmethod
    def config(cls, checkpoint, **changes: Any) -> LaunchConfig:
        settings = dict(dtype="float32", max_batch_size=cls.max_batch_size, max_total_tokens=cls.max_total_tokens,
                        max_input_tokens=cls.max_total_tokens - NEW_TOKENS - 1)
        return LaunchConfig(model_id=str(checkpoint), **{**settings, **cls.settings, **changes})

    @pytest.fixture
    def engine(self, host, checkpoint):
        from lmport.engine.factory import build_llm_engine

        engine, _, _ = build_llm_engine(self.config(checkpoint), host)
        return engine

    @pytest.fixture(scope="class")
    @classmethod
    def cpu_tokens(cls, checkpoint) -> list[list[int]]:
        from lmport.engine.factory import build_llm_engine

        cpu = PluginHost(environ={}, load_entry_points=False).load()
        cpu.select_backend("cpu")
        engine, _, _ = build_llm_engine(cls.config(checkpoint, max_batch_total_tokens=1024), cpu)
        return _greedy(engine, _prompts())

    # ------------------------------------------------------------------ the checks

    def test_flag_and_hook_agree(self, host, engine) -> None:
        from lmport.engine.model_runner import PagedModelRunner

        assert host.capabilities().whole_model_executor, "a backend that runs whole models flags whole_model_executor"
        assert not isinstance(engine.executor, PagedModelRunner), "lmport_model_executor did not answer"

    def test_executor_takes_plans(self, engine) -> None:
        assert getattr(engine.executor, "takes_plan", False), "a whole-model executor receives lmport.plan.StepPlan"

    def test_compiled_shape_bounds_the_limits(self, engine) -> None:
        shape = getattr(engine.executor, "compiled_shape", None)
        if shape is None:
            pytest.skip("the executor names no compiled shape")
        assert engine.limits.max_batch_size <= shape.batch_size
        assert engine.limits.max_total_tokens <= shape.sequence_length

    def test_greedy_tokens_equal_the_cpu_backend(self, engine, cpu_tokens) -> None:
        steps = _count_running(engine)
        assert _greedy(engine, _prompts()) == cpu_tokens
        assert max(steps) <= engine.limits.max_batch_size

    def test_an_abort_midway_leaves_the_others_exact(self, engine, cpu_tokens) -> None:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        prompts = _prompts()
        for i, prompt in enumerate(prompts):
            engine.add_request(GenerationRequest(f"r{i}", tuple(prompt), params))
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        steps = 0
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(t.token_id for t in out.tokens)
            steps += 1
            if steps == 2:
                engine.abort("r0")
        for i in range(1, len(prompts)):
            assert tokens[f"r{i}"] == cpu_tokens[i], f"request r{i}"

    def test_a_grammar_constraint_holds(self, engine) -> None:
        """The request's logits processors (here a regex constraint) reach the sampler."""
        import re

        from lmport.engine.api import Constraint

        pattern = r"(cat|dog)-[0-9]{2}"
        params = SamplingParams(max_new_tokens=self.max_total_tokens - 4, constraint=Constraint("regex", pattern))
        out = engine.generate([GenerationRequest("c", (5, 6, 7), params)])["c"]
        text = "".join(o.text for o in out)
        assert out[-1].finish_reason == "eos_token" and re.fullmatch(pattern, text), text

    def test_seeded_sampling_repeats(self, engine) -> None:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.9, seed=7, ignore_eos=True)
        runs = []
        for attempt in range(2):
            out = engine.generate([GenerationRequest(f"s{attempt}", tuple(_prompts()[1]), params)])
            runs.append([t.token_id for o in out[f"s{attempt}"] for t in o.tokens])
        assert runs[0] == runs[1] and len(runs[0]) == NEW_TOKENS


def _prompts() -> list[list[int]]:
    from lmport.testing.tiny_models import VOCAB

    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    out = engine.generate([GenerationRequest(f"g{i}", tuple(p), params) for i, p in enumerate(prompts)])
    return [[t.token_id for o in out[f"g{i}"] for t in o.tokens] for i in range(len(prompts))]


def _count_running(engine) -> list[int]:
    """Record the number of sequences in every step the engine schedules from now on."""
    counts: list[int] = [0]
    schedule = engine.scheduler.schedule

    def recording():
        step = schedule()
        counts.append(len(step.entries))
        return step

    engine.scheduler.schedule = recording
    return counts
