"""Continuous batching over the paged KV cache, planned with TGI's knobs.

Every step the scheduler first serves the running sequences (one decode token each, or the
next chunk of a prompt that did not fit the prefill budget), then admits waiting ones:

* ``max_batch_prefill_tokens`` bounds the prompt tokens fed per step; a longer prompt is
  prefilled in chunks over several steps (chunked prefill). An encoder-decoder sequence's
  encoder input (T5) runs whole in the step that admits it and counts in that step's budget:
  one that does not fit what is left waits for the next step, where it comes first.
* ``max_batch_total_tokens`` is the KV cache itself: admission needs free blocks.
* ``waiting_served_ratio``: while sequences are running, waiting ones are admitted only if at
  least ``floor(running * ratio)`` of them fit, unless they have waited
  ``max_waiting_tokens`` steps (TGI's rule: don't stall a big batch for one newcomer), or
  they fill the step's prefill budget (a burst of arrivals: holding them back could not make
  the prefill bigger, and decodes ride along in the same step anyway).
* ``max_batch_size`` bounds the running sequences.
* ``fixed_slots`` (a backend without continuous batching, whose graphs run a fixed batch): a
  step either prefills, whole, the prompts of sequences admitted into free slots (the running
  ones pause for it, as TGI's Neuron backend does) or decodes every running sequence; never
  both in one step. A sequence keeps its slot until it ends.
* speculative decoding (``lookahead``): a decoding sequence gets KV slots for its draft tokens
  too when the blocks are free; otherwise it decodes one token (drafts never preempt anyone).

The ``n`` sequences of one request share their prompt: the first is prefilled alone, the
others come in a step later and find its full blocks in the prefix cache.

When a running sequence needs a block and none is left, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the queue, to be recomputed
(prefix-cache hits make that cheap). Nothing fails for lack of memory.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from lmport.engine.batch import ScheduledSequence, ScheduledStep
from lmport.engine.block_manager import BlockManager
from lmport.engine.limits import EngineLimits
from lmport.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides, each step, which sequences run and how many of their tokens are fed."""

    def __init__(self, limits: EngineLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps_since_admission = 0
        self.num_preemptions = 0
        self._released: list[int] = []
        self._finished: list[int] = []
        self._announced: set[int] = set()  # sequences a plan named as new (the executor holds state for them)
        # speculative decoding: how many draft tokens a decoding sequence may get (their KV slots
        # are reserved with its token's); None: no speculation
        self.lookahead: Callable[[Sequence], int] | None = None

    # ------------------------------------------------------------------ queue changes

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` (finished, aborted or failed) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        self._released.append(seq.seq_id)
        if seq.seq_id in self._announced:
            self._announced.discard(seq.seq_id)
            self._finished.append(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ planning

    def schedule(self) -> ScheduledStep:
        if self.limits.fixed_slots:
            prefill = self._schedule_prefill_only()
            if prefill is not None:
                return prefill
        budget = self.limits.max_batch_prefill_tokens
        entries: list[ScheduledSequence] = []
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_output_tokens >= seq.params.max_new_tokens:
                # async scheduling: its last token is still on the device and it ends on it; no more steps
                i += 1
                continue
            n = seq.num_uncomputed_tokens
            decoding = seq.is_decoding
            lookahead = self.lookahead(seq) if decoding and self.lookahead is not None else 0
            if lookahead and not self.block_manager.allocate(seq, n + lookahead):
                lookahead = 0  # no room for drafts: decode plainly (preempting only for that token)
            if not decoding:
                n = min(n, budget)
                if n == 0:
                    i += 1
                    continue
            while not self.block_manager.allocate(seq, n):
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                entries.append(self._entry(seq, n, lookahead))
                if not decoding:
                    budget -= n
                i += 1
                continue
            break  # ``seq`` preempted itself: it was the last running sequence
        admitted = 0
        if not preempted and self.waiting and not self.limits.fixed_slots and self._should_admit(budget):
            admitted = self._admit(budget, entries)
        if admitted or not self.running:
            self.steps_since_admission = 0
        else:
            self.steps_since_admission += 1
        return self._step(entries)

    def _step(self, entries: list[ScheduledSequence]) -> ScheduledStep:
        released, self._released = self._released, []
        finished, self._finished = self._finished, []  # an empty step's go to the executor's release()
        new = [e.seq for e in entries if e.seq.seq_id not in self._announced]
        self._announced.update(seq.seq_id for seq in new)
        return ScheduledStep(entries=entries, released_seq_ids=released, block_table_rows=self.block_manager.rows.array,
                             new_seqs=new, finished_seq_ids=finished)

    def _schedule_prefill_only(self) -> ScheduledStep | None:
        """``fixed_slots``: a step of prefills only (a resumed sequence's rest, then newcomers
        into free slots), or None when there is none and every running sequence decodes."""
        budget = self.limits.max_batch_prefill_tokens
        entries: list[ScheduledSequence] = []
        for seq in self.running:
            if seq.is_decoding or seq.num_uncomputed_tokens == 0:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0 or not self.block_manager.allocate(seq, n):
                break
            entries.append(self._entry(seq, n))
            budget -= n
        if self.waiting and len(self.running) < self.limits.max_batch_size:
            self._admit(budget, entries)
        if not entries:
            return None
        self.steps_since_admission = 0
        return self._step(entries)

    def _admit(self, budget: int, entries: list[ScheduledSequence]) -> int:
        """Admit waiting sequences in arrival order (preempted ones first) while they fit."""
        bm = self.block_manager
        admitted = 0
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_batch_size:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq, entries):
                break  # next step its prompt blocks are cached, and this sequence shares them
            encoder = seq.num_encoder_tokens  # encoded whole at admission (never chunked)
            if encoder and encoder + 1 > budget and budget < self.limits.max_batch_prefill_tokens:
                break  # next step, with the whole budget (a longer input still runs alone)
            prefix = [] if seq.wants_prompt_logprobs else bm.peek_prefix(seq)
            cached = len(prefix) * bm.block_size
            n = min(seq.num_tokens - cached, max(budget - encoder, 1))
            if not bm.allocate(seq, n, prefix):
                break  # no skipping ahead: the head of the queue would starve
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entries.append(self._entry(seq, n))
            budget -= n + encoder
            admitted += 1
        return admitted

    def _sibling_prefilling(self, seq: Sequence, entries: list[ScheduledSequence]) -> bool:
        """Whether another sequence of ``seq``'s request (``n > 1``) prefills the same prompt this step."""
        if seq.index == 0 or self.block_manager.prefix_cache is None or seq.wants_prompt_logprobs:
            return False
        return any(e.is_prefill and e.seq.request_id == seq.request_id for e in entries)

    def _should_admit(self, budget: int) -> bool:
        if not self.running or self.steps_since_admission >= self.limits.max_waiting_tokens:
            return True
        count, tokens = self._count_admissible(budget)
        if tokens >= budget:
            # the newcomers fill this step's prefill budget: waiting for more could not make the
            # prefill bigger, only later (under a burst, TGI's rule alone would run
            # max_waiting_tokens decode steps before each full prefill)
            return True
        min_size = int(len(self.running) * self.limits.waiting_served_ratio)
        return count >= max(min_size, 1)

    def _count_admissible(self, budget: int) -> tuple[int, int]:
        """How many waiting sequences would be admitted now, and their prompt tokens fed this step.

        Prefix-cache hits are ignored: a lower bound on the count, an upper bound on the tokens.
        """
        bm = self.block_manager
        blocks = bm.num_available_blocks
        seats = self.limits.max_batch_size - len(self.running)
        count = tokens = 0
        for seq in self.waiting:
            if seats <= 0 or budget <= tokens:
                break
            n = min(seq.num_tokens, max(budget - tokens - seq.num_encoder_tokens, 1))
            need = bm.blocks_for(n)
            if need > blocks:
                break
            blocks -= need
            tokens += n + seq.num_encoder_tokens
            seats -= 1
            count += 1
        return count, tokens

    def _entry(self, seq: Sequence, n: int, lookahead: int = 0) -> ScheduledSequence:
        start = seq.num_computed_tokens
        sample = start + n == seq.num_tokens
        return ScheduledSequence(seq, start, n, sample, prompt_logprobs=seq.wants_prompt_logprobs, num_lookahead=lookahead)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first, to be recomputed from its tokens."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._released.append(seq.seq_id)
