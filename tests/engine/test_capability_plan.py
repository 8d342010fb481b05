"""The capability flags steer the engine (issue 16, point 1): static shapes pad every step to
shape buckets, a compiled batch size caps --max-batch-size, no continuous batching runs
fixed slots (prefill-only or decode-only steps), and `lmport backends` shows what is applied.

The fake vendor's ``static`` profile is the static-shape accelerator (its "device" is the CPU)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from lmport.capabilities import Capabilities
from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.batch import ScheduledSequence, ScheduledStep
from lmport.engine.block_manager import BlockManager
from lmport.engine.factory import build_llm_engine
from lmport.engine.limits import EngineLimits, resolve_limits
from lmport.engine.scheduler import Scheduler
from lmport.engine.sequence import Sequence
from lmport.planning import BucketRange, ShapeBuckets, plan_for
from lmport.plugins import PluginHost
from lmport.testing.installed import require_distribution

STATIC = {"LMPORT_FAKE_VENDOR_DEVICE": "1", "LMPORT_FAKE_VENDOR_PROFILE": "static", "LMPORT_BACKEND": "fake"}


def test_buckets_double_up_to_the_step_then_grow_by_it():
    r = BucketRange(1, 32)
    assert r.values(100) == (1, 2, 4, 8, 16, 32, 64, 96, 128)
    assert [r.bucket(n) for n in (1, 3, 17, 32, 33, 65)] == [1, 4, 32, 32, 64, 96]
    assert BucketRange(16, 256).values(600) == (16, 32, 64, 128, 256, 512, 768)
    assert BucketRange(3, 10).bucket(7) == 10  # a ramp that does not meet the step stops at it


def test_a_step_pads_to_three_buckets():
    b = ShapeBuckets(BucketRange(1, 8), BucketRange(16, 64), BucketRange(1, 4))
    decode = b.pad(3, 3, 5)
    assert (decode.num_seqs, decode.num_tokens, decode.num_blocks) == (4, 4, 8)
    prefill = b.pad(2, 20, 2, block_size=4)  # 12 pad tokens in a dummy sequence: 3 blocks wide
    assert (prefill.num_seqs, prefill.num_tokens, prefill.num_blocks) == (4, 32, 4)
    exact = b.pad(1, 16, 1, block_size=4)
    assert (exact.num_seqs, exact.num_tokens, exact.num_blocks) == (1, 16, 1)


def test_plan_per_flag():
    caps = Capabilities(backend="x", device_type="hpu", static_shapes=True, continuous_batching=False, max_batch_size=8)
    plan = plan_for(caps)
    assert plan.shape_buckets is not None and plan.fixed_slots and plan.max_batch_size == 8
    assert "paged_attention" in plan.reference_kernels and "sliding_window_attention" in plan.reference_kernels
    rows = dict(plan.describe())
    assert rows["max_batch_size"].startswith("--max-batch-size capped at 8")
    assert rows["continuous_batching"].startswith("off: fixed slots")
    assert plan_for(Capabilities(backend="cpu", device_type="cpu")).reference_kernels == ()


def test_a_compiled_batch_caps_max_batch_size(caplog):
    with caplog.at_level(logging.WARNING, logger="lmport.engine.limits"):
        limits = resolve_limits(LaunchConfig(max_batch_size=64), max_positions=64, block_size=4, num_blocks=64,
                                backend_max_batch_size=4)
    assert limits.max_batch_size == 4
    assert "capped at 4" in caplog.text
    assert resolve_limits(LaunchConfig(max_batch_size=2), max_positions=64, block_size=4, num_blocks=64,
                          backend_max_batch_size=4).max_batch_size == 2


def test_fixed_slots_never_chunk_prompts():
    with pytest.raises(ValueError, match="prefills whole prompts"):
        resolve_limits(LaunchConfig(max_batch_prefill_tokens=8, max_input_tokens=30, max_total_tokens=40),
                       max_positions=64, block_size=4, num_blocks=64, fixed_slots=True)


def _seq(i: int, n: int, max_new: int = 3) -> Sequence:
    return Sequence(seq_id=i, request_id=f"r{i}", index=0, prompt_token_ids=list(range(3, 3 + n)),
                    params=SamplingParams(max_new_tokens=max_new, ignore_eos=True), arrival_time=0.0,
                    token_ids=list(range(3, 3 + n)))


def _advance(step: ScheduledStep) -> None:
    """What the engine does after a step: the fed tokens are computed, a sampled one appended."""
    for e in step.entries:
        e.seq.num_computed_tokens = e.start + e.num_new_tokens
        if e.sample:
            e.seq.token_ids.append(7)
            e.seq.output_token_ids.append(7)


def test_fixed_slots_schedule_prefill_only_or_decode_only_steps():
    limits = EngineLimits(max_concurrent_requests=16, max_input_tokens=30, max_total_tokens=40, max_batch_prefill_tokens=80,
                          max_batch_total_tokens=512, max_batch_size=2, waiting_served_ratio=0.3, max_waiting_tokens=20,
                          block_size=4, num_blocks=128, fixed_slots=True)
    sched = Scheduler(limits, BlockManager(128, 4, enable_prefix_caching=False))
    for i in range(3):
        sched.add(_seq(i, 5 + i))
    kinds = []
    for _ in range(12):
        step = sched.schedule()
        if step.is_empty:
            break
        prefill = [e.is_prefill for e in step.entries]
        assert all(prefill) or not any(prefill), "a fixed-slot step never mixes prefill and decode"
        kinds.append(("P" if prefill[0] else "D", sorted(e.seq.seq_id for e in step.entries)))
        _advance(step)
        for e in list(step.entries):
            if e.seq.num_output_tokens >= e.seq.params.max_new_tokens:
                sched.finish(e.seq)
        assert len(sched.running) <= 2
    # two slots fill at once; decodes pause while the third prompt is prefilled into a freed slot
    assert kinds == [("P", [0, 1]), ("D", [0, 1]), ("D", [0, 1]), ("P", [2]), ("D", [2]), ("D", [2])]


def test_lmport_backends_shows_the_plan_of_a_static_shape_backend():
    require_distribution("lmport-fake-vendor", "pip install -e tests/fake_vendor")
    from lmport.commands.backends import format_report

    host = PluginHost(environ=STATIC)
    host.select_backend()
    text = format_report(host.report())
    assert "Engine plan (what the engine does with these flags):" in text
    assert "--max-batch-size capped at 4 (the compiled batch)" in text
    assert "steps padded to shape buckets" in text and "off: fixed slots" in text


@pytest.mark.parametrize("machine, backend, expected", [
    ("amd", "rocm", ["sliding_window_attention", "alibi_attention", "flash_layer_norm"]),
    ("gaudi", "gaudi", ["the backend's executor runs its compiled shapes", "lmport_model_executor runs the model"]),
    ("inferentia2", "neuron", ["off: fixed slots", "lmport_model_executor runs the model"]),
])
def test_lmport_backends_on_fake_mi250_gaudi2_inferentia2_shows_the_applied_plan(machine, backend, expected):
    from lmport.commands.backends import format_report
    from lmport.testing.fake_machine import FakeMachine

    require_distribution(f"lmport-{backend}", f"pip install --no-deps -e plugins/{backend}")
    host = PluginHost(environ={}, detection_env=getattr(FakeMachine, machine)())
    assert host.select_backend().backend.name == backend
    text = format_report(host.report())
    plan = text[text.index("Engine plan"):]
    for words in expected:
        assert words in plan, (words, plan)


def test_a_static_shape_backend_runs_bucketed_fixed_slot_steps_with_the_cpus_tokens(tiny_model_dir, random_prompts, caplog):
    """Six requests on a compiled batch of 4 asked to run 16: capped at 4; every attention call
    sees a bucketed shape; tokens equal the CPU backend's (padding changes nothing)."""
    require_distribution("lmport-fake-vendor", "pip install -e tests/fake_vendor")
    from lmport_fake_vendor.attention import CountingAttention

    path, _ = tiny_model_dir("llama")
    prompts = random_prompts([5, 9, 3, 12, 7, 4], seed=3)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    def run(host):
        config = LaunchConfig(model_id=str(path), block_size=8, max_batch_total_tokens=1024, max_batch_size=16)
        engine, _, _ = build_llm_engine(config, host)
        steps = []
        schedule = engine.scheduler.schedule

        def recording():
            step = schedule()
            steps.append([e.is_prefill for e in step.entries])
            return step

        engine.scheduler.schedule = recording
        results = engine.generate([GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)])
        return engine, steps, [[t.token_id for o in results[f"r{i}"] for t in o.tokens] for i in range(len(prompts))]

    cpu = PluginHost(environ={}, load_entry_points=False).load()
    cpu.select_backend()
    _, _, expected = run(cpu)
    static = PluginHost(environ=STATIC)
    static.select_backend()
    with caplog.at_level(logging.WARNING, logger="lmport.engine.limits"):
        engine, steps, tokens = run(static)
    assert tokens == expected
    assert engine.limits.max_batch_size == 4 and engine.limits.fixed_slots
    assert "capped at 4" in caplog.text
    assert all(all(kinds) or not any(kinds) for kinds in steps if kinds)
    assert max(len(kinds) for kinds in steps) == 4
    backends = {m.backend for m in engine.executor.model.modules() if hasattr(m, "backend")}
    shapes = set().union(*(b.shapes for b in backends if isinstance(b, CountingAttention)))
    buckets = engine.executor.shape_buckets
    assert shapes and all(
        s == buckets.batch.bucket(s) and t in (s, buckets.tokens.bucket(t)) and w == buckets.blocks.bucket(w)
        for s, t, w in shapes
    ), shapes
    assert any(t > s for s, t, w in shapes if t != s) and any(s in (2, 4) for s, t, w in shapes)
