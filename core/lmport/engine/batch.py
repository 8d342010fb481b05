"""What the scheduler hands the executor each step, and the flat batch built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmport.engine.sequence import Sequence
from lmport.layers.attention import AttentionMetadata


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: tokens ``start .. start+num_new_tokens-1`` are fed.

    ``sample`` is set when this chunk reaches the sequence's last known token, so the step
    yields its next token; a prompt chunk that stops short of that samples nothing.
    ``prompt_logprobs`` asks for the logprob of every prompt token this chunk predicts.
    Speculative decoding: ``num_lookahead`` draft tokens have KV slots reserved after the fed
    token, and the proposer's ``draft_token_ids`` (at most that many) are fed after it, in the
    same forward; the step then verifies them (``len(draft_token_ids) + 1`` logits rows).
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


@dataclass
class ScheduledStep:
    """One step's work, in the order of the flat batch.

    ``released_seq_ids`` names sequences that finished, were aborted or preempted since the
    previous step, so an executor that keeps state per sequence (a whole-model executor)
    can drop it.
    """

    entries: list[ScheduledSequence]
    released_seq_ids: list[int] = field(default_factory=list)
    # the block manager's BlockTableRows array (row ``seq.block_row`` mirrors ``seq.block_table``);
    # None: the batch builder reads the lists
    block_table_rows: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries if e.is_prefill)

    @property
    def is_empty(self) -> bool:
        return not self.entries


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


@dataclass
class PromptLogprobs:
    """Logprobs of the prompt tokens one chunk predicted: ``positions[i] + 1`` is the token's position."""

    positions: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]


@dataclass
class ExecutorOutput:
    """Per scheduled entry, in step order: the sampled token (or None) and prompt logprobs (or None).

    ``runs`` (speculative decoding; None when no entry verified drafts): per entry, the tokens a
    verify emitted (the kept drafts and the one after them; ``sampled[i]`` is the first), or None.
    """

    sampled: list[SampledToken | None]
    prompt_logprobs: list[PromptLogprobs | None]
    runs: list[list[SampledToken] | None] | None = None


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


def _send(segments: list[np.ndarray | list[int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Pack ``segments`` into one host buffer (pinned for a GPU), copy it over without blocking,
    and hand back a device view per segment.

    A fresh pinned buffer per step: PyTorch's pinned-memory cache does not hand a buffer out
    again before the copy that reads it has finished.
    """
    sizes = [len(values) for values in segments]
    total = sum(_aligned(size) for size in sizes)
    host = torch.empty(total, dtype=dtype, pin_memory=device.type == "cuda")
    view = host.numpy()
    offsets = []
    offset = 0
    for values, size in zip(segments, sizes):
        view[offset : offset + size] = values
        view[offset + size : offset + _aligned(size)] = 0
        offsets.append(offset)
        offset += _aligned(size)
    buffer = host if device.type == "cpu" else host.to(device, non_blocking=True)
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


def build_flat_batch(step: ScheduledStep, block_size: int, device: torch.device) -> FlatBatch:
    """Pack every entry's new tokens into one flat batch with its attention metadata.

    Everything the device needs goes over in two copies (one int64, one int32 buffer).
    Per entry only its few scalars are read in Python; positions, slots and block tables are
    computed with array operations, so the cost does not grow with the sequences' lengths.
    """
    entries = step.entries
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
    width = 0
    row0 = 0
    for index, entry in enumerate(entries):
        seq, start, n = entry.seq, entry.start, entry.num_new_tokens
        if n == 1:
            input_ids.append(seq.token_ids[start])
        else:
            input_ids.extend(seq.token_ids[start : start + n])
        drafts = entry.draft_token_ids
        if drafts:
            input_ids.extend(drafts)
            n += len(drafts)
        first_positions.append(start)
        counts.append(n)
        table_len = len(seq.block_table)
        if table_len > width:
            width = table_len
        first = len(logits_indices)
        if entry.prompt_logprobs:
            rows = entry.prompt_rows()
            logits_indices.extend(row0 + (p - start) for p in rows)
            prompt_targets.extend(seq.token_ids[p + 1] for p in rows)
        prompt_rows.append(range(first, len(logits_indices)))
        row0 += n
        if drafts:  # a verify: the last known token's row and each draft's
            first = len(logits_indices)
            verify_rows.append(range(first, first + len(drafts) + 1))
            verify_entries.append(index)
            verify_index.extend(verify_rows[-1])
            logits_indices.extend(range(row0 - len(drafts) - 1, row0))
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
    tables = _gather_block_tables(step, width)
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
