"""What the engine asks of speculative decoding each step, and the counts it keeps.

Per step: the scheduler asks :meth:`Speculator.lookahead` how many draft tokens a decoding
sequence may get (and reserves their KV slots when the blocks are there), the engine calls
:meth:`Speculator.propose` to fill each entry's ``draft_token_ids`` (never more than its
lookahead; fewer, or none, when the proposer has nothing), the executor verifies them in the
step's one forward (``k + 1`` query tokens per speculative row) and the engine keeps the
accepted run (:meth:`record` counts it).

A sequence speculates only where verification keeps the target's distribution exactly with
row-wise processing: not when its sampling reads its own past tokens (repetition, frequency
or presence penalties, the watermark: the k+1 positions would each need a different history)
nor when a constraint (grammar) or other logits processor shapes its tokens. Those rows decode
plainly in the same batch.
"""

from __future__ import annotations

from typing import Any, Protocol

from lmport.engine.sequence import Sequence


# per finished sequence: how many of its tokens were accepted drafts (TGI's tgi_request_skipped_tokens)
SKIPPED_TOKENS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Proposer(Protocol):
    """Proposes draft tokens for a step's speculative entries (those with ``num_lookahead > 0``).

    ``propose(step, entries)`` returns one list of draft token ids per entry of ``entries``
    (at most ``entry.num_lookahead`` each). A proposer with per-sequence state also has
    ``release(seq_ids)``, called every step with the sequences whose blocks were freed since the
    last one (finished, aborted, preempted), before ``propose``.
    """

    def propose(self, step: Any, entries: list[Any]) -> list[list[int]]: ...


class NgramStepProposer:
    """:class:`~lmport.engine.speculative.ngram.NgramProposer` over a step's entries (host only)."""

    def __init__(self, ngram) -> None:
        self.ngram = ngram

    def propose(self, step: Any, entries: list[Any]) -> list[list[int]]:
        return [self.ngram.propose(entry.seq.token_ids, entry.num_lookahead) for entry in entries]


def can_speculate(seq: Sequence) -> bool:
    """Whether verification keeps ``seq``'s distribution exactly (see the module docstring)."""
    params = seq.params
    return (
        not seq.reads_own_tokens
        and not getattr(seq, "processors", ())
        and getattr(params, "constraint", None) is None
        and not getattr(params, "logits_processors", None)
    )


class Speculator:
    """Speculative decoding for one engine: ``num_tokens`` drafts per step from ``proposer``."""

    def __init__(self, proposer: Proposer, num_tokens: int, method: str) -> None:
        if num_tokens < 1:
            raise ValueError(f"speculation needs at least one draft token per step, got {num_tokens}")
        self.proposer = proposer
        self.num_tokens = num_tokens
        self.method = method  # "ngram" or "draft", for /info and the logs
        self._accepted_by_seq: dict[int, int] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        """Counts from zero (after the warm-up)."""
        self.num_draft_tokens = 0  # drafts verified
        self.num_accepted_tokens = 0  # drafts kept
        self.num_verify_rows = 0  # speculative rows verified (each emits accepted + 1 tokens)
        self._skipped_buckets = [0] * (len(SKIPPED_TOKENS_BUCKETS) + 1)  # the last: +Inf
        self._skipped_sum = 0

    def lookahead(self, seq: Sequence) -> int:
        """Drafts ``seq`` may get this step: never past its ``max_new_tokens`` (the run ends there)."""
        if not can_speculate(seq):
            return 0
        left = seq.params.max_new_tokens - seq.num_output_tokens - 1  # the step emits drafts + 1
        return max(0, min(self.num_tokens, left))

    def propose(self, step: Any) -> None:
        """Fill ``draft_token_ids`` of the step's entries that have a lookahead."""
        release = getattr(self.proposer, "release", None)
        if release is not None and step.released_seq_ids:
            release(step.released_seq_ids)
        entries = [e for e in step.entries if e.num_lookahead > 0]
        if not entries:
            return
        for entry, drafts in zip(entries, self.proposer.propose(step, entries)):
            entry.draft_token_ids = list(drafts[: entry.num_lookahead])

    def record(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """A verify of ``seq`` kept ``num_accepted`` of its ``num_drafts`` drafts."""
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.num_verify_rows += 1
        self._accepted_by_seq[seq.seq_id] = self._accepted_by_seq.get(seq.seq_id, 0) + num_accepted

    def finished(self, seq: Sequence) -> None:
        """``seq`` ended: count its accepted drafts in the per-sequence histogram (a normal end only)."""
        accepted = self._accepted_by_seq.pop(seq.seq_id, 0)
        if seq.finish_reason is None or seq.finish_reason == "abort":
            return
        index = next((i for i, le in enumerate(SKIPPED_TOKENS_BUCKETS) if accepted <= le), len(SKIPPED_TOKENS_BUCKETS))
        self._skipped_buckets[index] += 1
        self._skipped_sum += accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def stats(self) -> dict[str, Any]:
        """The counts for ``EngineStats.extra`` (and so ``/metrics``)."""
        return {
            "spec_method": self.method,
            "spec_num_tokens": self.num_tokens,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_verify_rows": self.num_verify_rows,
            # per finished sequence, non-cumulative counts per bucket of SKIPPED_TOKENS_BUCKETS (+Inf last)
            "spec_skipped_buckets": tuple(self._skipped_buckets),
            "spec_skipped_sum": self._skipped_sum,
        }
