"""The engine: ``step()`` = schedule -> execute -> process outputs.

With ``async_scheduling`` (an executor with ``launch``) one step stays in flight: ``step()``
schedules and launches step N+1, then waits for step N's tokens and processes them, so the
host work of one step overlaps the device work of the next. A decode sequence of step N+1
feeds the token step N sampled, read on the device; on the host it is a placeholder until
step N's outputs are processed. Scheduling is deterministic given one more token per decode
sequence, so it runs ahead unchanged; a sequence that turns out to end at step N (EOS, a stop
string) had one more token computed in step N+1, which is discarded. Requests whose sampling
reads their own past tokens (penalties, watermark) make the engine wait for step N first.
A grammar's sequences need step N's tokens only to sample step N+1: with an executor that
``supports_late_tokens``, step N+1 is launched first and step N's outputs are processed inside
the launch (``before_sample``), after its forward pass is queued, so the device runs the
forward while the host reads the tokens and computes the masks.

With a ``speculator`` (speculative decoding) steps run synchronously: how many tokens a verify
step keeps is known only once it ran, and the next step's positions depend on it. A verify
emits a run of tokens per speculative sequence; they are processed one by one, so EOS, a stop
string or ``max_new_tokens`` inside the run ends the sequence there and drops the rest.

There is one step path: the synchronous engine is the asynchronous one that waits at once
(schedule, run, then the same ``_advance``/``_process`` bookkeeping a launched step gets). An
executor with ``takes_plan`` receives each step as a plain :class:`~lmport.plan.StepPlan`.

It owns the scheduler, the block manager and the output processor, and drives one
:class:`~lmport.executor.ModelExecutor`. Nothing here is thread-safe: the
:class:`~lmport.engine.async_engine.AsyncEngine` calls it from its one loop thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Iterable

from lmport.engine.api import EngineStats, GenerationRequest, RequestOutput, SamplingParams
from lmport.engine.block_manager import BlockManager
from lmport.engine.constraints import ProcessorContext, ProcessorResolver, processor_resolver
from lmport.engine.errors import RequestValidationError
from lmport.executor import ExecutorOutput, ModelExecutor
from lmport.engine.limits import EngineLimits
from lmport.engine.outputs import OutputProcessor
from lmport.engine.rules import validate_request
from lmport.engine.scheduler import Scheduler
from lmport.engine.sequence import Sequence

log = logging.getLogger(__name__)


class LLMEngine:
    """Continuous batching over one executor; call :meth:`step` until nothing is unfinished.

    Construction initialises the executor's KV cache with ``limits.num_blocks`` blocks.
    """

    def __init__(
        self,
        executor: ModelExecutor,
        tokenizer: Any,
        limits: EngineLimits,
        *,
        eos_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        async_scheduling: bool = False,
        processors: ProcessorResolver | None = None,
        speculator: Any = None,
    ) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.limits = limits
        # prompt ids must lie in 0..vocab_size-1: one id past the embedding fails the whole
        # batch's step (and on CUDA, the device); default: the tokenizer's size
        if vocab_size is None and tokenizer is not None and hasattr(tokenizer, "__len__"):
            vocab_size = len(tokenizer)
        self.vocab_size = vocab_size
        self.clock = clock
        executor.initialize_cache(limits.num_blocks)
        self.block_manager = BlockManager(limits.num_blocks, limits.block_size, limits.enable_prefix_caching,
                                          sliding_window=getattr(executor, "kv_window", None))  # fmt: skip
        self.scheduler = Scheduler(limits, self.block_manager)
        self.outputs = OutputProcessor(tokenizer, set(eos_token_ids))
        # constraint -> a new per-sequence logits processor (the lmport_logits_processors hook
        # through the factory's host; by default the core's llguidance backend)
        self._processors = processors or processor_resolver(
            ProcessorContext(tokenizer, vocab_size, tuple(sorted(set(eos_token_ids))))
        )
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._last_batch_size = 0
        self.num_steps = 0
        self.speculator = speculator
        if speculator is not None:
            self.scheduler.lookahead = speculator.lookahead
        self.async_scheduling = bool(async_scheduling and getattr(executor, "supports_async_scheduling", False))
        if async_scheduling and not self.async_scheduling:
            log.info("async scheduling off: executor %s has no launch()", type(executor).__name__)
        if self.async_scheduling and speculator is not None:
            self.async_scheduling = False
            log.info("async scheduling off: speculative decoding plans each step on the tokens the last one kept")
        self._in_flight: _InFlight | None = None
        # the executor's launch takes ``before_sample``: a grammar's sequences need the previous
        # step's tokens only to sample, so they are read while the next forward runs
        self._late_tokens = bool(getattr(executor, "supports_late_tokens", False))
        self._takes_plan = bool(getattr(executor, "takes_plan", False))
        self._release_states = getattr(executor, "release", None) if self._takes_plan else None
        # an encoder-decoder executor turns a prompt into the encoder's input and a decoder start
        self._prepare_sequence = getattr(executor, "prepare_sequence", None)

    # ------------------------------------------------------------------ requests

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`RequestValidationError` for a request that can never run; pure, thread-safe."""
        validate_request(request, self.limits, self.vocab_size)

    def add_request(self, request: GenerationRequest) -> None:
        """Validate and queue a request as ``params.n`` sequences (seeds ``seed + i`` when a seed is given)."""
        self.validate(request)
        self.add_validated(request)

    def _constrained(self, params: SamplingParams):
        """A new processor for ``params.constraint``; the request's own stop token ids (a chat
        template's end-of-turn, say) also end it once the constraint is satisfied."""
        processor = self._processors(params.constraint)
        if params.stop_token_ids and hasattr(processor, "allow_ending_with"):
            processor.allow_ending_with(params.stop_token_ids)
        return processor

    def add_validated(self, request: GenerationRequest) -> None:
        """Queue a request its frontend validated already (by the same rules, in ``submit``)."""
        if request.request_id in self._requests:
            raise RequestValidationError(f"request id {request.request_id!r} is already in flight")
        arrival = request.arrival_time if request.arrival_time is not None else self.clock()
        params = request.params
        # one processor per sequence, all built before any is queued (a constraint that does not compile is refused whole)
        processors = [(self._constrained(params),) if params.constraint is not None else () for _ in range(params.n)]
        seqs = []
        for index in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request.request_id,
                index=index,
                prompt_token_ids=list(request.prompt_token_ids),
                params=params,
                arrival_time=arrival,
                seed=None if params.seed is None else params.seed + index,
                images=request.images,
                processors=processors[index],
            )
            if self._prepare_sequence is not None:
                self._prepare_sequence(seq)
            self.outputs.add(seq)
            self.scheduler.add(seq)
            seqs.append(seq)
        self._requests[request.request_id] = seqs

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now; its blocks are freed before this returns."""
        seqs = self._requests.pop(request_id, [])
        now = self.clock()
        outputs = []
        for seq in seqs:
            if not seq.is_finished:
                outputs.append(self.outputs.finished_output(seq, "abort", now))
                self._release(seq)
        return outputs

    def abort_all(self, error: str | None = None) -> list[RequestOutput]:
        """End every request (``error`` set: as failed rather than aborted)."""
        outputs = []
        now = self.clock()
        for request_id in list(self._requests):
            for seq in self._requests.pop(request_id):
                if not seq.is_finished:
                    outputs.append(self.outputs.finished_output(seq, None if error else "abort", now, error))
                    self._release(seq)
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def executor_failure(self) -> str | None:
        """Why the executor can run no more steps (a tensor-parallel worker died), or None."""
        failure = getattr(self.executor, "failure", None)
        return failure() if failure is not None else None

    def close(self) -> None:
        """Release what the executor holds outside this process (tensor-parallel workers)."""
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one step; returns one output per sequence that produced a token or ended.

        With async scheduling the outputs are those of the step launched by the previous call.
        """
        lim = self.limits
        expired = self._expire() if lim.request_timeout is not None or lim.max_queue_time is not None else []
        return expired + self._step_pipelined(wait=not self.async_scheduling)

    def _expire(self) -> list[RequestOutput]:
        """End the requests past ``request_timeout``, and those never scheduled within ``max_queue_time``.

        Oldest first, stopping at the first one within its deadline (requests are kept in
        arrival order), so a step pays for the requests that expire, not for all of them.
        """
        lim, now = self.limits, self.clock()
        ended: dict[str, tuple[str, str]] = {}
        if lim.request_timeout is not None:
            for request_id, seqs in self._requests.items():
                if now - seqs[0].arrival_time <= lim.request_timeout:
                    break
                ended[request_id] = (f"Request timed out after {lim.request_timeout:g} s (--request-timeout)", "timeout")
        if lim.max_queue_time is not None:
            for seq in self.scheduler.waiting:
                if seq.first_scheduled_time is not None:
                    continue  # preempted: it was served, and goes on first
                if now - seq.arrival_time <= lim.max_queue_time:
                    break
                if all(s.first_scheduled_time is None for s in self._requests.get(seq.request_id, ())):
                    ended.setdefault(seq.request_id, (
                        f"Model is overloaded: not scheduled within {lim.max_queue_time:g} s (--max-queue-time)",
                        "queue_timeout",
                    ))
        outputs: list[RequestOutput] = []
        for request_id, (message, kind) in ended.items():
            log.info("request %s: %s", request_id, message)
            outputs += self._fail(self._requests.get(request_id, []), message, kind)
        return outputs

    def _execute(self, step) -> list[RequestOutput]:
        """Execute ``step`` synchronously and process its results; a failure fails only its culprits."""
        outputs: list[RequestOutput] = []
        entries, result = self._execute_isolating(step, outputs)
        return outputs + self._process(entries, self._advance(entries), result)

    def _execute_isolating(self, step, failed: list[RequestOutput]) -> tuple[list, ExecutorOutput]:
        """``executor.execute(step)``; when it raises, the halves of the step are executed apart
        (recursively), so only the sequences that fail alone fail (their outputs go to ``failed``).

        Returns the entries that ran and their results, in step order. A retry feeds the same
        tokens at the same positions and writes their K/V slots again, so the sequences that
        did not cause the failure get the tokens they would have got (only a seeded sampler
        that drew before the failure draws its next numbers).
        """
        try:
            return step.entries, self.executor.execute(self._work(step))
        except Exception as exc:
            if len(step.entries) == 1:
                seq = step.entries[0].seq
                log.exception("request %s failed its step alone; failing it", seq.request_id)
                failed.extend(self._fail([seq], f"{type(exc).__name__}: {exc}"))
                return [], ExecutorOutput(sampled=[], prompt_logprobs=[])
            log.warning("a step of %d sequences failed (%s: %s); running its halves apart to find the culprit",
                        len(step.entries), type(exc).__name__, exc)
        mid = len(step.entries) // 2
        entries: list = []
        merged = ExecutorOutput(sampled=[], prompt_logprobs=[], runs=[])
        for part in (step.entries[:mid], step.entries[mid:]):
            ran, result = self._execute_isolating(dataclasses.replace(step, entries=part), failed)
            entries += ran
            merged.sampled += result.sampled
            merged.prompt_logprobs += result.prompt_logprobs
            merged.runs += result.runs or [None] * len(result.sampled)
        return entries, merged

    def _schedule(self):
        """The next step from the scheduler, counted, with its sequences' first scheduling time set."""
        step = self.scheduler.schedule()
        if step.is_empty and step.finished_seq_ids and self._release_states is not None:
            self._release_states(step.finished_seq_ids)  # a step that never runs: its delta goes now
        self._last_batch_size = len(step.entries)
        if not step.is_empty:
            self.num_steps += 1
            now = self.clock()
            for entry in step.entries:
                if entry.seq.first_scheduled_time is None:
                    entry.seq.first_scheduled_time = now
        return step

    # ------------------------------------------------------------------ the one step path

    def _step_pipelined(self, wait: bool) -> list[RequestOutput]:
        """Schedule and launch a step, then process the step launched before it (async
        scheduling); ``wait``: the synchronous engine, which processes the step it launched at once."""
        outputs: list[RequestOutput] = []
        previous = self._in_flight
        late = False  # the previous step's tokens are read inside the launch, once the forward is queued
        if previous is not None and previous.needs_tokens():
            if self._late_tokens and not previous.needs_tokens(before_forward=True):
                late = True  # only request processors (grammars) need them, and only to sample
            else:
                self._in_flight = None  # a sampler reads the sequences' own tokens: they must be known first
                outputs += self._finish_step(previous)
                previous = None
        step = self._schedule()
        if wait:  # nothing is ever in flight: run it, and process it as a launched step is processed
            if step.is_empty:
                return outputs
            if self.speculator is not None:
                self.speculator.propose(step)
            return outputs + self._execute(step)
        launched, failed = None, False
        finished_previous = False

        def finish_previous() -> None:
            nonlocal finished_previous
            if not finished_previous:
                finished_previous = True
                outputs.extend(self._finish_step(previous))

        if not step.is_empty:
            try:
                extra = {"before_sample": finish_previous} if late else {}
                pending = self._launch(step, previous, **extra)
            except Exception as exc:  # run it again synchronously, once the previous step's tokens are known
                log.warning("launching a step of %d sequences failed (%s: %s); executing it synchronously",
                            len(step.entries), type(exc).__name__, exc)
                failed = True
            else:
                launched = _InFlight(step, pending, self._advance(step.entries))
        self._in_flight = launched
        if previous is not None:
            finish_previous()
        if failed:  # the sequences that ended in the previous step drop out; only culprits fail
            live = [e for e in step.entries if not e.seq.is_finished]
            if live:
                outputs += self._execute(dataclasses.replace(step, entries=live))
        if launched is not None and not self._requests:
            self._in_flight = None  # nothing left to read from it (its sequences ended); the device finishes it
        return outputs

    def _launch(self, step, previous: "_InFlight | None", **extra):
        feed = self._feed(step, previous)
        return self.executor.launch(self._work(step), feed, previous.pending if previous else None, **extra)

    def _work(self, step):
        """What the executor receives: the plain plan for one that ``takes_plan``, else the step itself."""
        return step.plan() if self._takes_plan else step

    def _feed(self, step, previous: "_InFlight | None") -> list[tuple[int, int]]:
        """(entry index, row of the previous step's sampled tokens) for each input token the host does not know."""
        feed = []
        for i, entry in enumerate(step.entries):
            seq = entry.seq
            if entry.start + entry.num_new_tokens <= seq.num_known_tokens:
                continue
            row = previous.sample_row(seq, entry.start) if previous is not None else None
            if entry.num_new_tokens != 1 or row is None:
                raise RuntimeError(f"sequence {seq.seq_id}: input token at {entry.start} is not known and not in flight")
            feed.append((i, row))
        return feed

    def _advance(self, entries) -> list[int | None]:
        """Book a launched step as done: computed counts, a placeholder per sampled token, cached blocks.

        Returns, per entry, the position of its placeholder (None when it samples nothing).
        """
        positions: list[int | None] = []
        for entry in entries:
            seq = entry.seq
            if seq.is_finished:  # ended while the step was launched (its previous token was read late)
                positions.append(None)
                continue
            seq.num_computed_tokens = entry.start + entry.num_new_tokens
            if seq.num_computed_tokens >= seq.num_prompt_tokens - 1:
                seq.wants_prompt_logprobs = False
            self.block_manager.commit_computed(seq)  # full blocks of known tokens only
            positions.append(seq.append_placeholder() if entry.sample else None)
        return positions

    def _finish_step(self, flight: "_InFlight") -> list[RequestOutput]:
        """Wait for a launched step's results and turn them into outputs."""
        step = flight.step
        try:
            result = flight.pending.result()
        except Exception as exc:
            log.exception("step failed; failing the %d sequences in it", len(step.entries))
            return self._fail([e.seq for e in step.entries], f"{type(exc).__name__}: {exc}")
        return self._process(step.entries, flight.positions, result)

    def _process(self, entries, positions: list[int | None], result: ExecutorOutput) -> list[RequestOutput]:
        """Fill in the tokens a step sampled (at the placeholders ``_advance`` made) and emit its outputs."""
        now = self.clock()
        outputs: list[RequestOutput] = []
        texts = self._detokenize(entries, result.sampled)
        runs = result.runs or [None] * len(entries)
        for entry, position, sampled, prompt, run in zip(entries, positions, result.sampled, result.prompt_logprobs, runs):
            seq = entry.seq
            if seq.is_finished:
                continue  # ended (stop, abort, failure) after this step was launched: its token is dropped
            if sampled is not None:
                seq.fill_placeholder(position, sampled.token_id)
                self.block_manager.commit_computed(seq)  # a block that ended on that token is known now
            if run is not None:
                self.speculator.record(seq, len(entry.draft_token_ids), len(run) - 1)
            self._emit(seq, sampled, prompt, now, outputs, texts)
            if run is not None:
                self._emit_run(entry, run, now, outputs)
        return outputs

    def _emit_run(self, entry, run: list, now: float, outputs: list[RequestOutput]) -> None:
        """The rest of a verify's tokens (the first was emitted): each follows a kept draft, whose
        K/V are valid; then the blocks past the kept drafts go back to the pool."""
        seq = entry.seq
        for sampled in run[1:]:
            if seq.is_finished:
                return  # released: its blocks are free
            seq.num_computed_tokens += 1
            seq.append_token(sampled.token_id)
            self._emit(seq, sampled, None, now, outputs)
        if not seq.is_finished:
            self.block_manager.commit_computed(seq)
            self.block_manager.rewind(seq)

    def _detokenize(self, entries, sampled: list) -> dict[int, str | Exception]:
        """The new text of every live sequence that sampled a token this step, in one batched decode."""
        pairs = [(e.seq, s.token_id) for e, s in zip(entries, sampled) if s is not None and not e.seq.is_finished]
        if not pairs:
            return {}
        return self.outputs.detokenize([seq for seq, _ in pairs], [token for _, token in pairs])

    def _emit(self, seq: Sequence, sampled, prompt, now: float, outputs: list[RequestOutput], texts=None) -> None:
        """Turn one sequence's step result into its output (appended to ``outputs``); release it when finished."""
        try:
            out = self.outputs.process(seq, sampled, prompt, now, texts)
        except Exception as exc:  # e.g. a detokenizer error: only this sequence fails
            log.exception("output processing failed for request %s", seq.request_id)
            outputs.extend(self._fail([seq], f"{type(exc).__name__}: {exc}"))
            return
        if out is not None:
            outputs.append(out)
            if out.finished:
                self._release(seq)

    def _fail(self, seqs: list[Sequence], error: str, kind: str | None = None) -> list[RequestOutput]:
        now = self.clock()
        outputs = []
        for seq in list(seqs):
            if seq.is_finished:
                continue
            seq.error = error
            outputs.append(self.outputs.finished_output(seq, None, now, error, kind))
            self._release(seq)
        return outputs

    def _release(self, seq: Sequence) -> None:
        """Free a finished sequence's blocks and state; forget its request once all siblings end."""
        self.scheduler.finish(seq)
        self.outputs.drop(seq)
        if self.speculator is not None:
            self.speculator.finished(seq)
        siblings = self._requests.get(seq.request_id)
        if siblings is not None and all(s.is_finished for s in siblings):
            del self._requests[seq.request_id]

    # ------------------------------------------------------------------ introspection

    def stats(self) -> EngineStats:
        bm = self.block_manager
        cache = bm.prefix_cache
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            prefix_cache_queries=cache.queried_tokens if cache else 0,
            prefix_cache_hits=cache.hit_tokens if cache else 0,
            batch_size=self._last_batch_size,
            extra={
                "requests": len(self._requests),
                "preemptions": self.scheduler.num_preemptions,
                "steps": self.num_steps,
                "kv_blocks_cached": len(cache) if cache else 0,
                "block_size": bm.block_size,
                **(self.speculator.stats() if self.speculator is not None else {}),
            },
        )

    def generate(self, requests: Iterable[GenerationRequest]) -> dict[str, list[RequestOutput]]:
        """Run ``requests`` to completion (a convenience for tests and offline use)."""
        collected: dict[str, list[RequestOutput]] = {}
        for request in requests:
            self.add_request(request)
            collected[request.request_id] = []
        while self.has_unfinished():
            for out in self.step():
                collected.setdefault(out.request_id, []).append(out)
        return collected



def weights_dtype(engine: LLMEngine) -> str | None:
    """The dtype of the loaded weights, for ``/info`` (None when the executor shows no model)."""
    model = getattr(engine.executor, "model", None)  # executors need not expose one
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return None


class _InFlight:
    """A step launched but not yet processed (async scheduling)."""

    def __init__(self, step, pending, positions: list[int | None]) -> None:
        self.step = step
        self.pending = pending
        self.positions = positions
        self._rows = {
            (entry.seq.seq_id, position): pending.sample_row[i]
            for i, (entry, position) in enumerate(zip(step.entries, positions))
            if position is not None
        }

    def sample_row(self, seq: Sequence, position: int) -> int | None:
        """The row of the token this step samples for ``seq`` at ``position``, if it does."""
        return self._rows.get((seq.seq_id, position))

    def needs_tokens(self, before_forward: bool = False) -> bool:
        """Whether a live sequence of this step samples from its own past tokens next
        (``before_forward``: needs them before the next step's forward is launched, as the
        penalties do; a grammar needs them only to sample)."""
        return any(
            position is not None and not entry.seq.is_finished
            and (entry.seq.penalties_read_tokens if before_forward else entry.seq.reads_own_tokens)
            for entry, position in zip(self.step.entries, self.positions)
        )
