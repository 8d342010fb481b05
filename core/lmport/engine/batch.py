"""What the scheduler hands the executor each step, and the flat batch built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmport.engine.block_manager import slot_mapping
from lmport.engine.sequence import Sequence
from lmport.layers.attention import AttentionMetadata


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: tokens ``start .. start+num_new_tokens-1`` are fed.

    ``sample`` is set when this chunk reaches the sequence's last known token, so the step
    yields its next token; a prompt chunk that stops short of that samples nothing.
    ``prompt_logprobs`` asks for the logprob of every prompt token this chunk predicts.
    Executors read ``seq`` and never change it; the engine updates it after the step.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool
    prompt_logprobs: bool = False

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
    """Per scheduled entry, in step order: the sampled token (or None) and prompt logprobs (or None)."""

    sampled: list[SampledToken | None]
    prompt_logprobs: list[PromptLogprobs | None]


@dataclass
class FlatBatch:
    """The tensors the model runs on, and which hidden rows need logits.

    ``logits_indices`` lists hidden-state rows to turn into logits: for each entry, its
    prompt-logprob rows, then its sample row. ``sample_rows[i]``/``prompt_rows[i]`` index
    into those logits for entry ``i`` (None / empty when it has none).
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


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied without blocking the host where that is possible."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


_ALIGN = 16  # elements: each packed segment starts 64/128-byte aligned, as kernels like it


class _Packer:
    """Collects int lists for the device and sends them in one copy; hands back device views."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.values: list[int] = []
        self.spans: list[tuple[int, int]] = []

    def add(self, values: list[int]) -> int:
        start = len(self.values)
        self.values.extend(values)
        self.spans.append((start, len(values)))
        self.values.extend([0] * (-len(self.values) % _ALIGN))
        return len(self.spans) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        buffer = to_device(self.values, self.dtype, device)
        return [buffer[start : start + size] for start, size in self.spans]


def build_flat_batch(step: ScheduledStep, block_size: int, device: torch.device) -> FlatBatch:
    """Pack every entry's new tokens into one flat batch with its attention metadata.

    Everything the device needs goes over in two copies (one int64, one int32 buffer).
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    logits_indices: list[int] = []
    sample_rows: list[int | None] = []
    prompt_rows: list[range] = []
    prompt_targets: list[int] = []
    prompt_index: list[int] = []
    for entry in step.entries:
        seq, start, n = entry.seq, entry.start, entry.num_new_tokens
        row0 = starts[-1]
        input_ids.extend(seq.token_ids[start : start + n])
        positions.extend(range(start, start + n))
        table = seq.block_table
        slots.extend(slot_mapping(table, start, n, block_size))
        starts.append(row0 + n)
        seq_lens.append(start + n)
        tables.append(table)
        rows = entry.prompt_rows()
        first = len(logits_indices)
        logits_indices.extend(row0 + (p - start) for p in rows)
        prompt_rows.append(range(first, len(logits_indices)))
        prompt_index.extend(range(first, len(logits_indices)))
        prompt_targets.extend(seq.token_ids[p + 1] for p in rows)
        if entry.sample:
            sample_rows.append(len(logits_indices))
            logits_indices.append(row0 + n - 1)
        else:
            sample_rows.append(None)
    width = max(len(t) for t in tables)
    flat_tables: list[int] = []
    for t in tables:
        flat_tables.extend(t)
        flat_tables.extend([0] * (width - len(t)))
    longs, ints = _Packer(torch.int64), _Packer(torch.int32)
    for values in (input_ids, positions, slots, logits_indices, [r for r in sample_rows if r is not None], prompt_index, prompt_targets):
        longs.add(values)
    for values in (starts, seq_lens, flat_tables):
        ints.add(values)
    ids_t, pos_t, slots_t, logits_t, sample_t, prompt_t, targets_t = longs.send(device)
    starts_t, seq_lens_t, tables_t = ints.send(device)
    metadata = AttentionMetadata(
        query_start_loc=starts_t,
        seq_lens=seq_lens_t,
        block_tables=tables_t.view(len(tables), width),
        slot_mapping=slots_t,
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
        max_query_len=max(e.num_new_tokens for e in step.entries),
        max_seq_len=max(seq_lens),
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
    )
