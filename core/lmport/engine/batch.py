"""What the scheduler hands the executor each step, and the flat batch built from it.

:class:`ScheduledStep` is the engine's own view of a step (its entries carry the live
sequences); ``plan()`` turns it into the plain :class:`~lmport.plan.StepPlan` that executors
with ``takes_plan`` (the paged runner, the tensor-parallel workers) receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmport.engine.sequence import Sequence
from lmport.executor import ExecutorOutput, PromptLogprobs, SampledToken  # noqa: F401  (their old home)
from lmport.layers.attention import AttentionMetadata
from lmport.plan import NewSequence, PlanEntry, StepPlan, as_plan
from lmport.runtime import DeviceRuntime


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: tokens ``start .. start+num_new_tokens-1`` are fed.

    ``sample`` is set when this chunk reaches the sequence's last known token, so the step
    yields its next token; a prompt chunk that stops short of that samples nothing.
    ``prompt_logprobs`` asks for the logprob of every prompt token this chunk predicts.
    Speculative decoding: ``num_lookahead`` draft tokens have KV slots reserved after the fed
    token, and the proposer's ``draft_token_ids`` (at most that many) are fed after it, in the
    same forward (the plan entry counts them in its ``num_new_tokens``); the step verifies them.
    Executors read ``seq`` and never change it; the engine updates it after the step.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool
    prompt_logprobs: bool = False
    num_lookahead: int = 0
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_new_tokens]

    is_prefill: bool = field(init=False)  # fixed when scheduled: the engine moves ``seq`` on after the step

    def __post_init__(self) -> None:
        self.is_prefill = not (self.num_new_tokens == 1 and self.seq.is_decoding)

    def prompt_rows(self) -> range:
        """Positions in this chunk whose next token is a prompt token (prompt logprob rows)."""
        if not self.prompt_logprobs:
            return range(0)
        end = min(self.start + self.num_new_tokens, self.seq.num_prompt_tokens - 1)
        return range(self.start, max(self.start, end))

    def plan_entry(self) -> PlanEntry:
        seq, start, n = self.seq, self.start, self.num_new_tokens
        rows = self.prompt_rows()
        drafts = self.draft_token_ids
        token_ids = [seq.token_ids[start]] if n == 1 else seq.token_ids[start : start + n]
        return PlanEntry(
            seq_id=seq.seq_id,
            request_id=seq.request_id,
            start=start,
            num_new_tokens=n + len(drafts),
            sample=self.sample,
            token_ids=token_ids + drafts if drafts else token_ids,
            is_prefill=self.is_prefill,
            num_prompt_tokens=seq.num_prompt_tokens,
            prompt_logprobs=self.prompt_logprobs,
            prompt_targets=[seq.token_ids[p + 1] for p in rows] if rows else [],
            block_table_len=len(seq.block_table),
            cross_block_table=list(seq.cross_block_table) if seq.cross_block_table else [],
            num_draft_tokens=len(drafts),
        )


def new_sequence(seq: Sequence) -> NewSequence:
    """What an executor learns about ``seq`` when it is first scheduled."""
    return NewSequence(
        seq_id=seq.seq_id,
        request_id=seq.request_id,
        index=seq.index,
        prompt_token_ids=list(seq.prompt_token_ids),
        params=seq.params,
        seed=seq.seed,
        images=seq.images,
        encoder_input=seq.encoder_input,
        cross_kv_len=seq.cross_kv_len,
        cross_key_ranges=seq.cross_key_ranges,
        output_token_ids=seq.output_token_ids[: seq.num_known_output_tokens],
        processors=seq.processors,
    )


@dataclass
class ScheduledStep:
    """One step's work, in the order of the flat batch.

    ``released_seq_ids`` names sequences that finished, were aborted or preempted since the
    previous step (their blocks are free); ``finished_seq_ids`` those of them that never come
    back; ``new_seqs`` the sequences scheduled for the first time (the plan's delta).
    """

    entries: list[ScheduledSequence]
    released_seq_ids: list[int] = field(default_factory=list)
    # the block manager's BlockTableRows array (row ``seq.block_row`` mirrors ``seq.block_table``);
    # None: the batch builder reads the lists
    block_table_rows: np.ndarray | None = None
    new_seqs: list[Sequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries if e.is_prefill)

    @property
    def is_empty(self) -> bool:
        return not self.entries

    def plan(self) -> StepPlan:
        """This step as plain data (built once; the engine changes the sequences after the step)."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            width = max((len(e.seq.block_table) for e in self.entries), default=0)
            plan = StepPlan(
                entries=[e.plan_entry() for e in self.entries],
                block_tables=_gather_block_tables(self, width),
                new=[new_sequence(seq) for seq in self.new_seqs],
                released_seq_ids=list(self.released_seq_ids),
                finished_seq_ids=list(self.finished_seq_ids),
            )
            self.__dict__["_plan"] = plan
        return plan


@dataclass
class FlatBatch:
    """The tensors the model runs on, and which hidden rows need logits.

    ``logits_indices`` lists hidden-state rows to turn into logits: for each entry, its
    prompt-logprob rows, then its sample row (a speculative entry: its ``k + 1`` verify rows).
    ``sample_rows[i]``/``prompt_rows[i]`` index into those logits for entry ``i`` (None / empty
    when it has none; None for a speculative entry, whose rows ``verify_rows[i]`` lists).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sample_rows: list[int | None]
    prompt_rows: list[range]
    sample_index: torch.Tensor  # int64: the logits rows to sample from, in entry order
    prompt_index: torch.Tensor  # int64: the logits rows of prompt logprobs, in entry order
    prompt_targets: torch.Tensor  # int64: the prompt token each of those rows predicts
    verify_rows: list[range] = field(default_factory=list)  # per entry: its verify logits rows (empty: none)
    verify_entries: list[int] = field(default_factory=list)  # the entries with drafts, in step order
    verify_index: torch.Tensor | None = None  # int64: their logits rows, in entry order


_ALIGN = 16  # elements: each packed segment starts 64/128-byte aligned, as kernels like it


def _aligned(size: int) -> int:
    return size + (-size % _ALIGN)


def _send(segments: list[np.ndarray | list[int]], dtype: torch.dtype, device: torch.device | DeviceRuntime) -> list[torch.Tensor]:
    """Pack ``segments`` into one host buffer (pinned for an accelerator), copy it over without
    blocking, and hand back a device view per segment. ``device``: a :class:`DeviceRuntime`
    (or a device, served by the reference runtime).

    A fresh pinned buffer per step: PyTorch's pinned-memory cache does not hand a buffer out
    again before the copy that reads it has finished.
    """
    runtime = device if isinstance(device, DeviceRuntime) else DeviceRuntime(device)
    sizes = [len(values) for values in segments]
    total = sum(_aligned(size) for size in sizes)
    host = runtime.host_buffer(total, dtype)
    view = host.numpy()
    offsets = []
    offset = 0
    for values, size in zip(segments, sizes):
        view[offset : offset + size] = values
        view[offset + size : offset + _aligned(size)] = 0
        offsets.append(offset)
        offset += _aligned(size)
    buffer = runtime.to_device(host)
    return [buffer[start : start + size] for start, size in zip(offsets, sizes)]


def _gather_block_tables(step: ScheduledStep, width: int) -> np.ndarray:
    """``int32 [num_entries, width]``, each sequence's block table padded with 0."""
    rows = step.block_table_rows
    if rows is not None:  # the block manager's mirror: one gather, no per-block Python
        tables = rows[[e.seq.block_row for e in step.entries], :width]
        lengths = np.fromiter((len(e.seq.block_table) for e in step.entries), np.int64, len(step.entries))
        if width and lengths.min() < width:
            tables[np.arange(width) >= lengths[:, None]] = 0  # the mirror's stale tail
        return tables
    tables = np.zeros((len(step.entries), width), dtype=np.int32)
    for i, entry in enumerate(step.entries):
        table = entry.seq.block_table
        tables[i, : len(table)] = table
    return tables


def build_flat_batch(step: StepPlan | ScheduledStep, block_size: int, device: torch.device | DeviceRuntime) -> FlatBatch:
    """Pack every entry's new tokens into one flat batch with its attention metadata.

    Everything the device needs goes over in two copies (one int64, one int32 buffer).
    Per entry only its few scalars are read in Python; positions, slots and block tables are
    computed with array operations, so the cost does not grow with the sequences' lengths.
    """
    plan = as_plan(step)
    entries = plan.entries
    num_entries = len(entries)
    input_ids: list[int] = []
    first_positions: list[int] = []
    counts: list[int] = []
    logits_indices: list[int] = []
    sample_index: list[int] = []
    sample_rows: list[int | None] = []
    prompt_rows: list[range] = []
    prompt_targets: list[int] = []
    verify_rows: list[range] = []
    verify_entries: list[int] = []
    verify_index: list[int] = []
    row0 = 0
    for index, entry in enumerate(entries):
        start, n = entry.start, entry.num_new_tokens
        if n == 1:
            input_ids.append(entry.token_ids[0])
        else:
            input_ids.extend(entry.token_ids)
        first_positions.append(start)
        counts.append(n)
        first = len(logits_indices)
        if entry.prompt_logprobs:
            rows = entry.prompt_rows()
            logits_indices.extend(row0 + (p - start) for p in rows)
            prompt_targets.extend(entry.prompt_targets)
        prompt_rows.append(range(first, len(logits_indices)))
        row0 += n
        drafts = entry.num_draft_tokens
        if drafts:  # a verify: the last known token's row and each draft's
            first = len(logits_indices)
            verify_rows.append(range(first, first + drafts + 1))
            verify_entries.append(index)
            verify_index.extend(verify_rows[-1])
            logits_indices.extend(range(row0 - drafts - 1, row0))
            sample_rows.append(None)
        elif entry.sample:
            verify_rows.append(range(0))
            sample_rows.append(len(logits_indices))
            sample_index.append(len(logits_indices))
            logits_indices.append(row0 - 1)
        else:
            verify_rows.append(range(0))
            sample_rows.append(None)
    num_tokens = row0
    prompt_index = [i for r in prompt_rows for i in r] if prompt_targets else []

    starts = np.asarray(first_positions, dtype=np.int64)
    query_start_loc = np.zeros(num_entries + 1, dtype=np.int64)
    seq_lens = starts + counts
    if num_tokens == num_entries:  # decode only: one token per entry
        query_start_loc[1:] = np.arange(1, num_entries + 1)
        positions = starts
        token_entry = np.arange(num_entries)
    else:
        np.cumsum(counts, out=query_start_loc[1:])
        token_entry = np.repeat(np.arange(num_entries), counts)
        positions = np.arange(num_tokens) - query_start_loc[token_entry] + starts[token_entry]
    tables = plan.block_tables
    width = tables.shape[1]
    slots = tables[token_entry, positions // block_size].astype(np.int64) * block_size + positions % block_size

    ids_t, pos_t, slots_t, logits_t, sample_t, prompt_t, targets_t, verify_t = _send(
        [input_ids, positions, slots, logits_indices, sample_index, prompt_index, prompt_targets, verify_index],
        torch.int64, device,
    )
    starts_t, seq_lens_t, tables_t = _send([query_start_loc, seq_lens, tables.reshape(-1)], torch.int32, device)
    seq_lens_host = seq_lens.tolist()
    metadata = AttentionMetadata(
        query_start_loc=starts_t,
        seq_lens=seq_lens_t,
        block_tables=tables_t.view(num_entries, width),
        slot_mapping=slots_t,
        query_start_loc_host=query_start_loc.tolist(),
        seq_lens_host=seq_lens_host,
        max_query_len=max(counts),
        max_seq_len=max(seq_lens_host),
        block_size=block_size,
    )
    return FlatBatch(
        input_ids=ids_t,
        positions=pos_t,
        metadata=metadata,
        logits_indices=logits_t,
        sample_rows=sample_rows,
        prompt_rows=prompt_rows,
        sample_index=sample_t,
        prompt_index=prompt_t,
        prompt_targets=targets_t,
        verify_rows=verify_rows if verify_entries else [],
        verify_entries=verify_entries,
        verify_index=verify_t if verify_entries else None,
    )
