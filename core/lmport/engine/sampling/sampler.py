"""The batched sampler: one call turns a step's ``[rows, vocab]`` logits into next tokens.

Order of processing (TGI's): watermark, repetition penalty, frequency/presence penalties,
then, for rows that sample, temperature, top-k, top-p and typical-p. Greedy rows take the
argmax after the penalties and the watermark (as transformers' ``generate`` does with
``do_sample=False``: the warpers only apply when sampling).

Every processor runs once over the rows that use it, with per-row parameter tensors. The only
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

    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The processed float32 logits every row is chosen from (``-inf`` = filtered out)."""
        logits = logits.to(torch.float32)
        vocab, device = logits.shape[-1], logits.device

        marked = [i for i, r in enumerate(rows) if r.params.watermark and r.last_token_id is not None]
        if marked:
            logits = self._on_rows(logits, marked, lambda x: apply_watermark(x, [rows[i].last_token_id for i in marked]))

        rep = [i for i, r in enumerate(rows) if _is_set(r.params.repetition_penalty, 1.0)]
        if rep:
            seen = P.token_presence([rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep], vocab, device)
            penalty = self._param(rows, rep, "repetition_penalty", device)
            logits = self._on_rows(logits, rep, lambda x: P.apply_repetition_penalty(x, seen, penalty))

        pen = [
            i for i, r in enumerate(rows)
            if _is_set(r.params.frequency_penalty, 0.0) or _is_set(r.params.presence_penalty, 0.0)
        ]
        if pen:
            counts = P.token_counts([rows[i].output_token_ids for i in pen], vocab, device)
            frequency = self._param(rows, pen, "frequency_penalty", device, default=0.0)
            presence = self._param(rows, pen, "presence_penalty", device, default=0.0)
            logits = self._on_rows(logits, pen, lambda x: P.apply_frequency_presence(x, counts, frequency, presence))

        sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
        return self._warp(logits, rows, sampled) if sampled else logits

    def _warp(self, logits: torch.Tensor, rows: list[SamplingRow], sampled: list[int]) -> torch.Tensor:
        device = logits.device
        temp = [i for i in sampled if _is_set(rows[i].params.temperature, 1.0)]
        if temp:
            t = self._param(rows, temp, "temperature", device)
            logits = self._on_rows(logits, temp, lambda x: P.apply_temperature(x, t))
        vocab = logits.shape[-1]
        top_k = [i for i in sampled if rows[i].params.top_k and rows[i].params.top_k < vocab]
        if top_k:
            ks = [rows[i].params.top_k for i in top_k]
            k = torch.tensor(ks, dtype=torch.int64).to(device, non_blocking=True)
            logits = self._on_rows(logits, top_k, lambda x: P.apply_top_k(x, k, max(ks)))
        # after a top-k filter at most k tokens (plus ties) remain: start the candidate search there
        start = max([P.INITIAL_CANDIDATES] + [rows[i].params.top_k for i in top_k])
        top_p = [i for i in sampled if _is_set(rows[i].params.top_p, 1.0)]
        if top_p:
            p = self._param(rows, top_p, "top_p", device)
            logits = self._on_rows(logits, top_p, lambda x: P.apply_top_p(x, p, start))
        typical = [i for i in sampled if _is_set(rows[i].params.typical_p, 1.0)]
        if typical:
            mass = self._param(rows, typical, "typical_p", device)
            logits = self._on_rows(logits, typical, lambda x: P.apply_typical_p(x, mass, start))
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

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _param(rows: list[SamplingRow], which: list[int], name: str, device, default: float | None = None) -> torch.Tensor:
        values = [getattr(rows[i].params, name) for i in which]
        values = [default if v is None else v for v in values]
        return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)

    @staticmethod
    def _on_rows(logits: torch.Tensor, which: list[int], fn) -> torch.Tensor:
        """Apply ``fn`` to the rows ``which`` only (all rows without a copy when it is all of them)."""
        if len(which) == logits.shape[0]:
            return fn(logits)
        index = torch.tensor(which, device=logits.device)
        out = logits.clone()
        out[index] = fn(logits[index])
        return out
