"""The accelerator warm-up: a full prefill step, mixed steps, decodes; a clean engine after."""

from __future__ import annotations

from lmport.engine.warmup import NEW_TOKENS, warm_up_engine


def test_warm_up_reaches_a_full_prefill_a_mixed_step_and_leaves_the_engine_clean(make_engine):
    engine, _ = make_engine("llama", max_batch_prefill_tokens=24, max_batch_size=16)
    seen = []
    execute = engine.executor.execute

    def spy(step):
        seen.append([(e.is_prefill, e.num_new_tokens) for e in step.entries])
        return execute(step)

    engine.executor.execute = spy
    ran = warm_up_engine(engine)

    prompt_steps = [sum(n for prefill, n in s if prefill) for s in seen]
    assert prompt_steps[0] == engine.limits.max_batch_prefill_tokens  # the first wave fills the budget
    assert any(any(p for p, _ in s) and any(not p for p, _ in s) for s in seen)  # prompts and decodes in one step
    assert any(all(not p for p, _ in s) for s in seen)  # decode-only steps
    assert ran["steps"] == len(seen) and ran["requests"] >= 2
    # nothing left behind: no request, no block held, counters back at zero
    assert not engine.has_unfinished() and engine.block_manager.num_used_blocks == 0
    stats = engine.stats()
    assert stats.extra["steps"] == 0 and stats.prefix_cache_queries == 0 and stats.extra["preemptions"] == 0
    assert NEW_TOKENS >= 2  # at least one decode step after each prompt


def test_warm_up_fits_a_small_kv_cache(make_engine):
    engine, _ = make_engine("llama", max_batch_prefill_tokens=64, max_batch_total_tokens=48)  # 12 blocks of 4
    warm_up_engine(engine)
    assert not engine.has_unfinished() and engine.stats().extra["preemptions"] == 0
