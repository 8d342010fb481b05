"""The flat batch against a token-by-token reference built from the sequences' own lists,
over steps a real scheduler makes: chunked prefill, decode, prefix hits, preemption,
prompt logprobs; with the block manager's block-table mirror and without it."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from lmport.engine.api import SamplingParams
from lmport.engine.batch import ScheduledStep, build_flat_batch
from lmport.engine.block_manager import BlockManager
from lmport.engine.block_table_rows import BlockTableRows
from lmport.engine.limits import EngineLimits
from lmport.engine.scheduler import Scheduler
from lmport.engine.sequence import Sequence

BLOCK = 4


def reference(step: ScheduledStep, block_size: int) -> dict:
    """What the batch must hold, computed one token at a time from ``token_ids`` and ``block_table``."""
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    logits, sample_rows, prompt_rows, targets = [], [], [], []
    width = max(len(e.seq.block_table) for e in step.entries)
    tables = []
    for e in step.entries:
        seq = e.seq
        row0 = len(ids)
        for p in range(e.start, e.start + e.num_new_tokens):
            ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        starts.append(len(ids))
        seq_lens.append(e.start + e.num_new_tokens)
        tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
        first = len(logits)
        if e.prompt_logprobs:
            for p in range(e.start, min(e.start + e.num_new_tokens, seq.num_prompt_tokens - 1)):
                logits.append(row0 + p - e.start)
                targets.append(seq.token_ids[p + 1])
        prompt_rows.append(range(first, len(logits)))
        if e.sample:
            sample_rows.append(len(logits))
            logits.append(len(ids) - 1)
        else:
            sample_rows.append(None)
    return dict(
        input_ids=ids, positions=positions, slot_mapping=slots, query_start_loc=starts, seq_lens=seq_lens,
        block_tables=tables, logits_indices=logits, sample_rows=sample_rows, prompt_rows=prompt_rows,
        sample_index=[r for r in sample_rows if r is not None], prompt_index=[i for r in prompt_rows for i in r],
        prompt_targets=targets,
    )


def observed(batch) -> dict:
    meta = batch.metadata
    assert meta.query_start_loc.tolist() == meta.query_start_loc_host
    assert meta.seq_lens.tolist() == meta.seq_lens_host
    assert meta.max_query_len == max(b - a for a, b in itertools.pairwise(meta.query_start_loc_host))
    assert meta.max_seq_len == max(meta.seq_lens_host)
    assert (batch.input_ids.dtype, meta.slot_mapping.dtype, meta.block_tables.dtype) == (torch.int64, torch.int64, torch.int32)
    return dict(
        input_ids=batch.input_ids.tolist(), positions=batch.positions.tolist(), slot_mapping=meta.slot_mapping.tolist(),
        query_start_loc=meta.query_start_loc_host, seq_lens=meta.seq_lens_host, block_tables=meta.block_tables.tolist(),
        logits_indices=batch.logits_indices.tolist(), sample_rows=batch.sample_rows, prompt_rows=batch.prompt_rows,
        sample_index=batch.sample_index.tolist(), prompt_index=batch.prompt_index.tolist(),
        prompt_targets=batch.prompt_targets.tolist(),
    )


def make_scheduler(num_blocks: int, caching: bool) -> Scheduler:
    limits = EngineLimits(
        max_concurrent_requests=64, max_input_tokens=200, max_total_tokens=400, max_batch_prefill_tokens=24,
        max_batch_total_tokens=num_blocks * BLOCK, max_batch_size=16, waiting_served_ratio=0.0,
        max_waiting_tokens=20, block_size=BLOCK, num_blocks=num_blocks, enable_prefix_caching=caching,
    )
    return Scheduler(limits, BlockManager(num_blocks, BLOCK, caching))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("caching", [True, False])
def test_flat_batch_matches_the_reference_over_a_scheduled_run(caching, device):
    """On CUDA the buffers travel pinned and non-blocking: ``.tolist()`` reads them after the copy."""
    device = torch.device(device)
    rng = random.Random(int(caching))
    sched = make_scheduler(num_blocks=40, caching=caching)  # small: sequences get preempted
    shared = [rng.randrange(3, 300) for _ in range(12)]  # a common prefix for prefix-cache hits
    for i in range(30):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(max_new_tokens=rng.randrange(1, 30), prompt_logprobs=i % 5 == 0)
        sched.add(Sequence(i, f"r{i}", 0, prompt, params, 0.0))
    kinds = set()
    for _ in range(500):
        if not sched.has_unfinished():
            break
        step = sched.schedule()
        if step.is_empty:
            continue
        assert step.block_table_rows is sched.block_manager.rows.array
        expected = reference(step, BLOCK)
        assert observed(build_flat_batch(step, BLOCK, device)) == expected
        without_mirror = dataclasses.replace(step, block_table_rows=None)
        assert observed(build_flat_batch(without_mirror, BLOCK, device)) == expected
        kinds.add("decode only" if all(e.num_new_tokens == 1 for e in step.entries) else "mixed")
        for e in step.entries:  # what the engine does after the executor
            e.seq.num_computed_tokens = e.start + e.num_new_tokens
            if e.seq.num_computed_tokens >= e.seq.num_prompt_tokens - 1:
                e.seq.wants_prompt_logprobs = False
            sched.block_manager.commit_computed(e.seq)
            if e.sample:
                e.seq.append_token(rng.randrange(3, 300))
                if e.seq.num_output_tokens >= e.seq.params.max_new_tokens:
                    sched.finish(e.seq)
    assert not sched.has_unfinished()
    assert kinds == {"decode only", "mixed"} and sched.num_preemptions > 0


def test_block_table_rows_mirror_the_lists_as_they_grow():
    rows = BlockTableRows(rows=2, columns=2)
    bm = BlockManager(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False)
    bm.rows = rows
    seqs = [Sequence(i, f"r{i}", 0, list(range(3, 3 + 5 * i + 1)), SamplingParams(), 0.0) for i in range(5)]
    for seq in seqs:  # more sequences than rows, more blocks than columns: both grow
        assert bm.allocate(seq, seq.num_tokens)
    for seq in seqs:
        assert rows.array[seq.block_row, : len(seq.block_table)].tolist() == seq.block_table
    assert len({s.block_row for s in seqs}) == 5
    freed = seqs[2].block_row
    bm.free(seqs[2])
    assert seqs[2].block_row is None
    again = Sequence(9, "r9", 0, [5, 6], SamplingParams(), 0.0)
    assert bm.allocate(again, 2) and again.block_row == freed  # a freed row is reused
    assert rows.array[freed, : len(again.block_table)].tolist() == again.block_table
