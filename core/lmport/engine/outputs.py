"""Turning sampled tokens into :class:`RequestOutput` s: detokenize, stop, finish, time.

One :class:`OutputProcessor` serves the engine; it keeps, per sequence, the incremental
detokenizer, the stop criteria, the running logprob sum and the prompt's logprobs until the
first output carries them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lmport.engine.api import FinishReason, RequestOutput, TokenInfo
from lmport.executor import PromptLogprobs, SampledToken
from lmport.engine.detokenizer import IncrementalDetokenizer, push_batch, token_text
from lmport.engine.sequence import Sequence
from lmport.engine.stopping import StopCriteria


@dataclass
class _SequenceOutputState:
    detokenizer: IncrementalDetokenizer
    stop: StopCriteria
    cumulative_logprob: float = 0.0
    prompt_logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    prompt_sent: bool = False


class OutputProcessor:
    """Builds each step's outputs from the executor's sampled tokens."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self._special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._states: dict[int, _SequenceOutputState] = {}
        self._text_cache: dict[int, str] = {}

    def add(self, seq: Sequence) -> None:
        self._states[seq.seq_id] = _SequenceOutputState(
            detokenizer=IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens),
            stop=StopCriteria(seq.params, self.eos_token_ids),
        )

    def drop(self, seq: Sequence) -> None:
        self._states.pop(seq.seq_id, None)

    # ------------------------------------------------------------------ per step

    def detokenize(self, seqs: list[Sequence], token_ids: list[int]) -> dict[int, str | Exception]:
        """Each sequence's new text for its new token, decoded for the whole step at once.

        Pass the result to :meth:`process` (``texts``); a failed decode is an exception in its
        sequence's slot, raised there, so it fails that sequence only.
        """
        detokenizers = [self._states[seq.seq_id].detokenizer for seq in seqs]
        return {seq.seq_id: text for seq, text in zip(seqs, push_batch(detokenizers, token_ids))}

    def process(
        self,
        seq: Sequence,
        sampled: SampledToken | None,
        prompt: PromptLogprobs | None,
        now: float,
        texts: dict[int, str | Exception] | None = None,
    ) -> RequestOutput | None:
        """Record this step's results for ``seq``; an output if it produced a token.

        ``texts``: what :meth:`detokenize` returned for this step (else the token is decoded
        here). Sets ``seq.finish_reason`` when a stop condition is met (the caller frees it).
        """
        state = self._states[seq.seq_id]
        if prompt is not None:
            for pos, logprob, top in zip(prompt.positions, prompt.logprobs, prompt.top_tokens):
                state.prompt_logprobs[pos + 1] = (logprob, top)
        if sampled is None:
            return None
        if seq.first_token_time is None:
            seq.first_token_time = now
        token_id = sampled.token_id
        state.cumulative_logprob += sampled.logprob
        detokenizer, stop = state.detokenizer, state.stop
        text = texts.get(seq.seq_id) if texts is not None else None
        if text is None:
            text = detokenizer.push(token_id)
        elif isinstance(text, Exception):
            raise text
        # the whole text only where stop strings are searched in it (joining it costs per token)
        reason = stop.check(token_id, seq.num_known_output_tokens, detokenizer.text if stop.stop_strings else "")
        if reason is not None:
            text += detokenizer.flush()
        token_text = self._text_cache.get(token_id)
        if token_text is None:
            token_text = self._text(token_id)
        token = TokenInfo(
            token_id=token_id,
            logprob=sampled.logprob,
            text=token_text,
            special=token_id in self._special_ids,
            top_tokens=tuple((tid, lp, self._text(tid)) for tid, lp in sampled.top_tokens) if sampled.top_tokens else (),
        )
        out = self._output(seq, state, [token], text)
        if reason is not None:
            if reason == "stop_sequence" and stop.stop_match is not None:
                out.stop_text_offset = stop.stop_match[1]
            self._finish(seq, out, reason, now)
        return out

    def finished_output(
        self, seq: Sequence, reason: FinishReason | None, now: float, error: str | None = None, error_kind: str | None = None
    ) -> RequestOutput:
        """The last output of a sequence that ends without a new token (abort, failure)."""
        state = self._states.get(seq.seq_id)
        text = state.detokenizer.flush() if state is not None and error is None else ""
        out = self._output(seq, state, [], text)
        out.error = error
        out.error_kind = error_kind
        self._finish(seq, out, reason, now)
        return out

    # ------------------------------------------------------------------ helpers

    def _output(self, seq: Sequence, state: _SequenceOutputState | None, tokens: list[TokenInfo], text: str) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            tokens=tokens,
            text=text,
            num_prompt_tokens=seq.num_input_tokens,
            num_generated_tokens=seq.num_known_output_tokens,
            cumulative_logprob=state.cumulative_logprob if state else 0.0,
            seed=seq.seed,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
        )
        if state is not None and seq.params.prompt_logprobs and not state.prompt_sent and tokens:
            out.prompt_tokens = self._prompt_tokens(seq, state)
            state.prompt_sent = True
        return out

    def _prompt_tokens(self, seq: Sequence, state: _SequenceOutputState) -> list[TokenInfo]:
        """Every prompt token with its logprob; the first has none (NaN), as in TGI's prefill details."""
        tokens = []
        for pos, token_id in enumerate(seq.prompt_token_ids):
            logprob, top = state.prompt_logprobs.get(pos, (math.nan, []))
            tokens.append(
                TokenInfo(
                    token_id=token_id,
                    logprob=logprob,
                    text=self._text(token_id),
                    special=token_id in self._special_ids,
                    top_tokens=tuple((tid, lp, self._text(tid)) for tid, lp in top),
                )
            )
        return tokens

    def _finish(self, seq: Sequence, out: RequestOutput, reason: FinishReason | None, now: float) -> None:
        seq.finish_reason = reason
        seq.finished_time = now
        out.finished = True
        out.finish_reason = reason
        out.finished_time = now

    def _text(self, token_id: int) -> str:
        text = self._text_cache.get(token_id)
        if text is None:
            text = self._text_cache[token_id] = token_text(self.tokenizer, token_id)
        return text
