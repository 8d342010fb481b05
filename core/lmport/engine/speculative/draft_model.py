"""Draft-model proposals: a small model with the target's tokenizer proposes ``k`` tokens
greedily, on the same paged engine.

The draft runs on its own :class:`~lmport.engine.model_runner.PagedModelRunner` with its own KV
cache of the same number of blocks, addressed through the target's block tables: the
scheduler's reservation for a verify step (the last token and ``k`` drafts) covers every slot
the draft writes, and the target's rewind of rejected tokens frees the draft's K/V with them.
Per sequence the proposer remembers which positions its cache holds: the tokens known when it
last ran and the drafts it fed after them; on the next step the fed drafts that the target kept
still count, and the draft recomputes from the first one it did not. A sequence whose blocks were
freed (finished, aborted, preempted) starts again from its first token (prefix-cache hits are
not trusted: the draft cache of a shared block may never have been written).

Each step runs ``k`` draft forwards: the first feeds everything the draft cache lacks (the
whole prompt for a new sequence, else one or two tokens), the others one token per sequence,
so they replay the draft runner's decode graphs where it has them. Each round feeds the token
the round before drew, on the device (the runner's ``launch`` with ``feed``): the host waits
once per step, after launching every round. Proposals are greedy (a
deterministic proposal: the verify step's rejection sampler keeps the target distribution
exactly for sampled requests too).
"""

from __future__ import annotations

from typing import Any

from lmport.engine.api import SamplingParams
from lmport.engine.batch import ScheduledSequence, ScheduledStep
from lmport.engine.sequence import Sequence

_GREEDY = SamplingParams(max_new_tokens=1, do_sample=False, ignore_eos=True)


class DraftModelProposer:
    """Proposes with ``runner`` (a paged runner over the draft model, its cache initialised)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        # seq_id -> (positions whose draft K/V hold known tokens, the drafts fed after them)
        self._cached: dict[int, tuple[int, list[int]]] = {}
        self._released: list[int] = []  # for the draft runner's next step

    def release(self, seq_ids: list[int]) -> None:
        """Their blocks were freed: the draft K/V in them is gone."""
        for seq_id in seq_ids:
            self._cached.pop(seq_id, None)
        self._released.extend(seq_ids)

    def propose(self, step: Any, entries: list[ScheduledSequence]) -> list[list[int]]:
        shadows = [self._shadow(entry.seq) for entry in entries]
        wanted = [entry.num_lookahead for entry in entries]
        released, self._released = self._released, []
        launched = []  # per round: (the rows it ran, its pending step)
        previous = None
        for round_ in range(max(wanted)):
            live = [i for i, k in enumerate(wanted) if k > round_]
            plan, feed = [], []
            for j, i in enumerate(live):
                shadow = shadows[i]
                if round_:  # the token the last round drew for it, still on the device
                    shadow.append_placeholder()
                    feed.append((j, previous[1].sample_row[previous[0].index(i)]))
                n = shadow.num_tokens - shadow.num_computed_tokens
                plan.append(ScheduledSequence(shadow, shadow.num_computed_tokens, n, True))
                shadow.num_computed_tokens = shadow.num_tokens
            # released sequences never come back as they were: the draft runner drops their state
            work = ScheduledStep(entries=plan, released_seq_ids=released, finished_seq_ids=released)
            previous = (live, self.runner.launch(work, feed, previous[1] if previous else None))
            launched.append(previous)
            released = []
        drafts: list[list[int]] = [[] for _ in entries]
        for live, pending in launched:  # one wait per round, after all of them were launched
            for i, sampled in zip(live, pending.result().sampled):
                drafts[i].append(sampled.token_id)
        for entry, shadow, own in zip(entries, shadows, drafts):
            seq = entry.seq
            known = seq.num_tokens
            # the drafts fed (all but the last drawn), so the next step knows what the cache holds
            self._cached[seq.seq_id] = (known, own[: shadow.num_computed_tokens - known])
        return drafts

    def _shadow(self, seq: Sequence) -> Sequence:
        """A sequence for the draft runner: ``seq``'s tokens and blocks, the draft cache's computed count."""
        shadow = Sequence(seq.seq_id, seq.request_id, seq.index, seq.prompt_token_ids, _GREEDY, seq.arrival_time)
        shadow.token_ids = list(seq.token_ids)
        shadow.block_table = seq.block_table
        shadow.num_computed_tokens = self._valid(seq)
        return shadow

    def _valid(self, seq: Sequence) -> int:
        """How many leading positions of ``seq`` the draft cache holds right now (at most all but the last)."""
        cached = self._cached.get(seq.seq_id)
        if cached is None:
            return 0
        known, fed = cached
        valid = known
        tokens = seq.token_ids
        for j, token in enumerate(fed):
            if known + j >= len(tokens) or tokens[known + j] != token:
                break
            valid += 1
        return min(valid, seq.num_tokens - 1)
