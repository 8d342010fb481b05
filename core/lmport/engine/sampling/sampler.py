"""The batched sampler: one call turns a step's ``[rows, vocab]`` logits into next tokens.

The logits go through :data:`PIPELINE`, one stage after another (TGI's order): watermark,
repetition penalty, frequency/presence penalties, the requests' own processors (grammar masks,
resolved from ``SamplingParams.constraint`` through the ``lmport_logits_processors`` hook,
one batch ``apply`` per processor type), then, for rows that sample, temperature, top-k, top-p
and typical-p. Greedy rows take the argmax after the penalties, the watermark and their
processors (as transformers' ``generate`` does with ``do_sample=False``: the warpers only apply
when sampling).

Every stage runs once over the rows it applies to, with per-row parameter tensors. The only
per-row Python loops are the seeded draws (each row has its own generator, so its tokens do
not depend on the rest of the batch) and the watermark's green lists.

Reported log-probabilities (``logprobs``, ``top_logprobs``) are ``log_softmax`` of the
*processed* logits, as TGI reports them: for a sampled row that is the distribution the token
was drawn from (after temperature, top-k ...), for a greedy row the raw model distribution
(after penalties and watermark, when the request asks for them).

Sampling uses the exponential-race form of the categorical draw, ``argmax(p / E)`` with
``E ~ Exp(1)`` per token: one batched kernel instead of ``multinomial`` per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmport.engine.sampling import processors as P
from lmport.engine.sampling.state import SamplingRow
from lmport.engine.sampling.watermark import apply_watermark


@dataclass
class SamplerOutput:
    """What the sampler returns; every tensor stays on the logits' device (no host sync)."""

    token_ids: torch.Tensor  # int64 [rows]
    logprobs: torch.Tensor  # float32 [rows]
    top_ids: torch.Tensor | None = None  # int64 [rows, k], k = max top_n_tokens in the batch
    top_logprobs: torch.Tensor | None = None  # float32 [rows, k]


def _is_set(value: float | None, neutral: float) -> bool:
    return value is not None and value != neutral


class Sampler:
    """Stateless; keeps no per-request data between calls (that lives in :class:`SamplingRow`)."""

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        processed = self.process(logits, rows)
        log_probs = torch.log_softmax(processed, dim=-1)
        token_ids = self._choose(processed, log_probs, rows)
        chosen = log_probs.gather(1, token_ids[:, None]).squeeze(1)
        top_n = max((r.params.top_n_tokens for r in rows), default=0)
        top_ids = top_logprobs = None
        if top_n > 0:
            top_logprobs, top_ids = torch.topk(log_probs, min(top_n, log_probs.shape[-1]), dim=-1)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)

    # ------------------------------------------------------------------ processing

    def begin(self, rows: list[SamplingRow]) -> None:
        """Let the rows' request processors start their work for this step (called before the
        model's forward pass, so a grammar's masks are computed while the device runs it)."""
        for cls, which in _processor_groups(rows).items():
            cls.begin([rows[i].processors[k] for i, k in which])

    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The processed float32 logits every row is chosen from (``-inf`` = filtered out):
        :data:`PIPELINE`, each stage over the rows it applies to."""
        logits = logits.to(torch.float32)
        vocab = logits.shape[-1]
        for stage in PIPELINE:
            which = [i for i, r in enumerate(rows) if stage.applies(r, vocab)]
            if which:
                logits = stage.run(logits, rows, which)
        return logits

    # ------------------------------------------------------------------ choosing

    def _choose(self, processed: torch.Tensor, log_probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        token_ids = processed.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
        if not sampled:
            return token_ids
        probs = log_probs.exp() if len(sampled) == len(rows) else log_probs[sampled].exp()
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        if len(unseeded) == len(sampled):
            noise.exponential_()
        else:
            if unseeded:
                noise[unseeded] = torch.empty_like(noise[unseeded]).exponential_()
            for j, i in enumerate(sampled):
                if rows[i].generator is not None:
                    noise[j].exponential_(generator=rows[i].generator)
        # a zero draw would turn a filtered token's 0/0 into NaN, which argmax picks
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        drawn = (probs / noise).argmax(dim=-1)
        if len(sampled) == len(rows):
            return drawn
        token_ids[torch.tensor(sampled, device=token_ids.device)] = drawn
        return token_ids



def _param(rows: list[SamplingRow], which: list[int], name: str, device, default: float | None = None) -> torch.Tensor:
    values = [getattr(rows[i].params, name) for i in which]
    values = [default if v is None else v for v in values]
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def _on_rows(logits: torch.Tensor, which: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to the rows ``which`` only (all rows without a copy when it is all of them)."""
    if len(which) == logits.shape[0]:
        return fn(logits)
    index = torch.tensor(which, device=logits.device)
    out = logits.clone()
    out[index] = fn(logits[index])
    return out


# ---------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Stage:
    """One logits processor of the pipeline: which rows it applies to, and how (on those rows)."""

    name: str
    applies: Callable[[SamplingRow, int], bool]  # (row, vocab size)
    run: Callable[[torch.Tensor, list[SamplingRow], list[int]], torch.Tensor]  # (logits, rows, which) -> logits


def _watermark(logits, rows, which):
    return _on_rows(logits, which, lambda x: apply_watermark(x, [rows[i].last_token_id for i in which]))


def _repetition(logits, rows, which):
    seen = P.token_presence([rows[i].prompt_token_ids + rows[i].output_token_ids for i in which], logits.shape[-1], logits.device)
    penalty = _param(rows, which, "repetition_penalty", logits.device)
    return _on_rows(logits, which, lambda x: P.apply_repetition_penalty(x, seen, penalty))


def _frequency_presence(logits, rows, which):
    counts = P.token_counts([rows[i].output_token_ids for i in which], logits.shape[-1], logits.device)
    frequency = _param(rows, which, "frequency_penalty", logits.device, default=0.0)
    presence = _param(rows, which, "presence_penalty", logits.device, default=0.0)
    return _on_rows(logits, which, lambda x: P.apply_frequency_presence(x, counts, frequency, presence))


def _processor_groups(rows: list[SamplingRow]) -> dict[type, list[tuple[int, int]]]:
    """The rows' request processors by type: type -> [(row, index in the row's processors)], in row order."""
    groups: dict[type, list[tuple[int, int]]] = {}
    for i, row in enumerate(rows):
        for k, processor in enumerate(row.processors):
            groups.setdefault(type(processor), []).append((i, k))
    return groups


def _request_processors(logits, rows, which):
    """Each type of request processor (grammars ...) once, over the rows that hold one."""
    for cls, members in _processor_groups([rows[i] for i in which]).items():
        index = [which[j] for j, _ in members]
        procs = [rows[which[j]].processors[k] for j, k in members]
        if len(set(index)) != len(index):  # a row holds two processors of one type: one call each
            for i, p in zip(index, procs):
                logits = _on_rows(logits, [i], lambda x, p=p: cls.apply(x, [p]))
            continue
        logits = _on_rows(logits, index, lambda x, procs=procs: cls.apply(x, procs))
    return logits


def _temperature(logits, rows, which):
    t = _param(rows, which, "temperature", logits.device)
    return _on_rows(logits, which, lambda x: P.apply_temperature(x, t))


def _wants_top_k(row: SamplingRow, vocab: int) -> bool:
    return row.params.do_sample and bool(row.params.top_k) and row.params.top_k < vocab


def _top_k(logits, rows, which):
    ks = [rows[i].params.top_k for i in which]
    k = torch.tensor(ks, dtype=torch.int64).to(logits.device, non_blocking=True)
    return _on_rows(logits, which, lambda x: P.apply_top_k(x, k, max(ks)))


def _candidates(rows: list[SamplingRow], vocab: int) -> int:
    """After a top-k filter at most k tokens (plus ties) remain: top-p and typical-p start there."""
    return max([P.INITIAL_CANDIDATES] + [r.params.top_k for r in rows if _wants_top_k(r, vocab)])


def _top_p(logits, rows, which):
    p = _param(rows, which, "top_p", logits.device)
    start = _candidates(rows, logits.shape[-1])
    return _on_rows(logits, which, lambda x: P.apply_top_p(x, p, start))


def _typical_p(logits, rows, which):
    mass = _param(rows, which, "typical_p", logits.device)
    start = _candidates(rows, logits.shape[-1])
    return _on_rows(logits, which, lambda x: P.apply_typical_p(x, mass, start))


# TGI's order: the penalties, then the requests' own processors (grammars: masks before the
# warpers, so top-p's mass is taken over the allowed tokens), then the warpers of sampling rows.
PIPELINE: tuple[Stage, ...] = (
    Stage("watermark", lambda r, v: r.params.watermark and r.last_token_id is not None, _watermark),
    Stage("repetition_penalty", lambda r, v: _is_set(r.params.repetition_penalty, 1.0), _repetition),
    Stage(
        "frequency_presence_penalty",
        lambda r, v: _is_set(r.params.frequency_penalty, 0.0) or _is_set(r.params.presence_penalty, 0.0),
        _frequency_presence,
    ),
    Stage("request_processors", lambda r, v: bool(r.processors), _request_processors),
    Stage("temperature", lambda r, v: r.params.do_sample and _is_set(r.params.temperature, 1.0), _temperature),
    Stage("top_k", _wants_top_k, _top_k),
    Stage("top_p", lambda r, v: r.params.do_sample and _is_set(r.params.top_p, 1.0), _top_p),
    Stage("typical_p", lambda r, v: r.params.do_sample and _is_set(r.params.typical_p, 1.0), _typical_p),
)
