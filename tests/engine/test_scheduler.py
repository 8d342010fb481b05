"""Scheduler invariants with a simulated executor (each sampled sequence gets one token).

The model is left out on purpose: these tests are about which tokens run when, and that
blocks always come back.
"""

from __future__ import annotations

import dataclasses
import itertools

from lmport.engine.api import SamplingParams
from lmport.engine.block_manager import BlockManager
from lmport.engine.limits import EngineLimits
from lmport.engine.scheduler import Scheduler
from lmport.engine.sequence import Sequence, SequenceStatus

_ids = itertools.count()


def make_scheduler(num_blocks=64, block_size=4, prefill=64, ratio=0.0, max_waiting=20, max_batch_size=64, caching=False):
    limits = EngineLimits(
        max_concurrent_requests=128, max_input_tokens=1000, max_total_tokens=2000,
        max_batch_prefill_tokens=prefill, max_batch_total_tokens=num_blocks * block_size,
        max_batch_size=max_batch_size, waiting_served_ratio=ratio, max_waiting_tokens=max_waiting,
        block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching,
    )
    return Scheduler(limits, BlockManager(num_blocks, block_size, caching))


def add(sched: Scheduler, prompt_len: int, max_new: int = 4, first: int = 3) -> Sequence:
    seq = Sequence(next(_ids), f"r{prompt_len}", 0, list(range(first, first + prompt_len)), SamplingParams(max_new_tokens=max_new), 0.0)
    sched.add(seq)
    return seq


def run_step(sched: Scheduler):
    """Schedule, then do what the engine does after the executor: compute, sample, finish."""
    step = sched.schedule()
    for e in step.entries:
        assert e.seq.status is SequenceStatus.RUNNING
        assert len(e.seq.block_table) * sched.block_manager.block_size >= e.start + e.num_new_tokens
        e.seq.num_computed_tokens = e.start + e.num_new_tokens
        sched.block_manager.commit_computed(e.seq)
        if e.sample:
            e.seq.append_token(7)
            if e.seq.num_output_tokens >= e.seq.params.max_new_tokens:
                sched.finish(e.seq)
    return step


def run_all(sched: Scheduler, limit: int = 1000):
    steps = []
    while sched.has_unfinished():
        steps.append(run_step(sched))
        assert len(steps) < limit, "scheduler made no progress"
    assert sched.block_manager.num_used_blocks == 0
    return steps


def test_long_prompt_is_prefilled_in_chunks_of_the_budget():
    sched = make_scheduler(prefill=16)
    seq = add(sched, 50, max_new=2)
    chunks = []
    for _ in range(4):
        (entry,) = run_step(sched).entries
        chunks.append((entry.start, entry.num_new_tokens, entry.sample))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert seq.num_output_tokens == 1
    (entry,) = run_step(sched).entries
    assert (entry.start, entry.num_new_tokens, entry.sample, entry.is_prefill) == (50, 1, True, False)
    assert not sched.has_unfinished() and sched.block_manager.num_used_blocks == 0


def test_prefill_tokens_per_step_never_exceed_the_budget_and_decodes_ride_along():
    sched = make_scheduler(prefill=20)
    for n in (7, 30, 12, 3, 25):
        add(sched, n, max_new=5)
    steps = run_all(sched)
    assert all(s.num_prefill_tokens <= 20 for s in steps)
    assert any(s.num_prefill_tokens and len(s.entries) > 1 and any(not e.is_prefill for e in s.entries) for s in steps)
    # every token of every sequence ran exactly once
    fed: dict[int, list[int]] = {}
    for s in steps:
        for e in s.entries:
            fed.setdefault(e.seq.seq_id, []).extend(range(e.start, e.start + e.num_new_tokens))
    assert all(positions == list(range(len(positions))) for positions in fed.values())


def test_max_batch_size_bounds_running_sequences():
    sched = make_scheduler(max_batch_size=3)
    for _ in range(7):
        add(sched, 5, max_new=6)
    steps = run_all(sched)
    assert max(len(s.entries) for s in steps) == 3


def test_requests_join_and_leave_the_running_batch_every_step():
    sched = make_scheduler()
    a = add(sched, 4, max_new=10)
    run_step(sched)
    run_step(sched)
    b = add(sched, 6, max_new=2)
    step = run_step(sched)
    assert [(e.seq, e.is_prefill) for e in step.entries] == [(a, False), (b, True)]
    run_step(sched)  # b's second token: b finishes and leaves
    assert b.is_finished and sched.running == [a]
    assert b.block_table == []


def test_waiting_served_ratio_holds_back_too_few_newcomers():
    sched = make_scheduler(ratio=0.3, max_waiting=5)
    running = [add(sched, 4, max_new=100) for _ in range(10)]
    run_step(sched)
    assert sched.running == running
    late = [add(sched, 4, max_new=3), add(sched, 4, max_new=3)]  # 2 < floor(10 * 0.3)
    waited = 0
    while late[0].status is SequenceStatus.WAITING:
        step = run_step(sched)
        waited += 1
        assert all(not e.is_prefill for e in step.entries) or late[0] in [e.seq for e in step.entries]
    # admitted only once they had waited max_waiting_tokens decode steps
    assert waited == 6 and late[1].status is SequenceStatus.RUNNING


def test_waiting_served_ratio_admits_enough_newcomers_at_once():
    sched = make_scheduler(ratio=0.3)
    for _ in range(10):
        add(sched, 4, max_new=100)
    run_step(sched)
    late = [add(sched, 4, max_new=3) for _ in range(3)]  # 3 >= floor(10 * 0.3)
    step = run_step(sched)
    assert [e.seq for e in step.entries][-3:] == late


def test_waiting_served_ratio_admits_newcomers_that_fill_the_prefill_budget():
    # 2 < floor(10 * 0.3) newcomers, but their prompts fill the 64-token prefill budget: a
    # burst is admitted at once instead of after max_waiting_tokens decode steps
    sched = make_scheduler(ratio=0.3, prefill=64, max_waiting=5)
    for _ in range(10):
        add(sched, 4, max_new=100)
    run_step(sched)
    late = [add(sched, 40, max_new=3), add(sched, 40, max_new=3)]
    step = run_step(sched)
    assert [(e.seq, e.num_new_tokens) for e in step.entries][-2:] == [(late[0], 40), (late[1], 24)]
    assert sum(e.num_new_tokens for e in step.entries if e.is_prefill) == 64


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    sched = make_scheduler(num_blocks=6, block_size=4)
    old = add(sched, 8, max_new=6)  # 2 blocks now, 4 at the end
    new = add(sched, 8, max_new=6)
    steps = [run_step(sched)]
    assert {e.seq for e in steps[0].entries} == {old, new}
    preempted_at = None
    while sched.has_unfinished():
        steps.append(run_step(sched))
        if preempted_at is None and new.num_preemptions:
            preempted_at = len(steps) - 1
            assert new.status is SequenceStatus.WAITING and new.block_table == []
            assert sched.waiting[0] is new and old.num_preemptions == 0
            assert new.seq_id in steps[-1].released_seq_ids
    assert preempted_at is not None and sched.num_preemptions >= 1
    # after old finished, new was recomputed from all its tokens (prompt + generated) in one chunk
    recompute = [e for s in steps[preempted_at + 1 :] for e in s.entries if e.seq is new and e.start == 0]
    assert recompute and recompute[0].num_new_tokens > new.num_prompt_tokens
    assert old.num_output_tokens == 6 and new.num_output_tokens == 6
    assert sched.block_manager.num_used_blocks == 0


def test_a_lone_sequence_that_cannot_grow_preempts_itself_without_failing():
    sched = make_scheduler(num_blocks=2, block_size=4)
    seq = add(sched, 7, max_new=3)  # needs 3 blocks at 9 tokens: never fits
    run_step(sched)  # prefill, 1 token out (8 tokens)
    run_step(sched)  # position 7 still fits the second block, 9 tokens
    step = run_step(sched)  # position 8 needs a third block
    assert step.entries == [] and seq.status is SequenceStatus.WAITING
    sched.finish(seq)
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()


def test_finish_frees_blocks_of_running_and_waiting_sequences_at_once():
    sched = make_scheduler(num_blocks=8, block_size=4, max_batch_size=1)
    running, waiting = add(sched, 9, max_new=50), add(sched, 5, max_new=50)
    run_step(sched)
    assert sched.block_manager.num_used_blocks == 3
    sched.finish(waiting)
    assert waiting.is_finished and not sched.waiting
    sched.finish(running)
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()
    assert sched.schedule().released_seq_ids == [waiting.seq_id, running.seq_id]


def test_prefix_hits_shrink_the_prefill_of_a_repeated_prompt():
    sched = make_scheduler(block_size=4, caching=True)
    first = add(sched, 13, max_new=2)
    run_all(sched)
    again = add(sched, 13, max_new=2)
    (entry,) = run_step(sched).entries
    assert entry.seq is again and (entry.start, entry.num_new_tokens) == (12, 1)
    assert first.block_table == [] and sched.block_manager.prefix_cache.hit_tokens == 12
    run_all(sched)


def test_prompt_logprob_requests_skip_the_prefix_cache():
    sched = make_scheduler(block_size=4, caching=True)
    add(sched, 13, max_new=1)
    run_all(sched)
    seq = Sequence(next(_ids), "p", 0, list(range(3, 16)), SamplingParams(max_new_tokens=1, prompt_logprobs=True), 0.0)
    sched.add(seq)
    (entry,) = run_step(sched).entries
    assert (entry.start, entry.num_new_tokens, entry.prompt_logprobs) == (0, 13, True)
    assert list(entry.prompt_rows()) == list(range(12))


def test_limits_are_plain_data():
    sched = make_scheduler()
    assert dataclasses.asdict(sched.limits)["max_batch_prefill_tokens"] == 64
