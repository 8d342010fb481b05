"""The HTTP side of request validation: TGI's wire format turned into the engine's request.

Checks here are the ones about the wire format only (``best_of`` and what streaming refuses,
``truncate``, an empty ``inputs``, the tokenizer failing, a grammar or response format that does
not compile); TGI's ranges and limits
(temperature, top-p, stop sequences, lengths, ``n`` ...) are the engine's rules
(:mod:`lmport.engine.rules`), applied once when the request is submitted
(:meth:`EngineClient.submit <lmport.engine.api.EngineClient.submit>`). Every refusal answers
422 ``error_type: "validation"`` with TGI's exact wording. The result is a
:class:`ValidRequest`: prompt token ids and the engine's :class:`SamplingParams`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from lmport.engine.api import Constraint, ImageInputs, SamplingParams
from lmport.engine.constraints import check_constraint
from lmport.engine.errors import RequestValidationError, check_token_ids
from lmport.engine.limits import EngineLimits
from lmport.server.errors import ValidationFailed
from lmport.server.schemas_tgi import GenerateParameters
from lmport.server.structured import grammar_constraint

DEFAULT_GENERATION_LENGTH = 1024  # TGI: max_new_tokens when the client sets none


@dataclass(frozen=True)
class ValidRequest:
    """A request in the engine's terms, with what the route needs to answer it."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    input_length: int
    best_of: int = 1
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int = 0
    images: ImageInputs | None = None  # the prompt's images (lmport.server.images)


class Validator:
    """Builds :class:`ValidRequest` s from TGI's parameters under the engine's ``limits``."""

    def __init__(
        self, limits: EngineLimits, tokenizer: Any, eos_token_ids: Sequence[int] = (), vocab_size: int | None = None,
        host: Any = None,
    ):
        self.limits = limits
        self.host = host  # the PluginHost whose lmport_logits_processors compile-checks constraints
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        if vocab_size is None and hasattr(tokenizer, "__len__"):
            vocab_size = len(tokenizer)
        self.vocab_size = vocab_size  # client-given prompt ids must lie in 0..vocab_size-1

    # ------------------------------------------------------------------ parameters

    def check_stream(self, p: GenerateParameters) -> None:
        if (p.best_of or 1) != 1:
            raise ValidationFailed("`best_of` != 1 is not supported when streaming tokens")
        if p.decoder_input_details:
            raise ValidationFailed("`decoder_input_details` == true is not supported when streaming tokens")

    def check_best_of(self, best_of: int) -> None:
        if self.limits.max_best_of == 1 and best_of != 1:
            raise ValidationFailed("`best_of` != 1 is not allowed for this endpoint")
        if best_of < 1 or best_of > self.limits.max_best_of:
            raise ValidationFailed(f"`best_of` must be > 0 and <= {self.limits.max_best_of}. Given: {best_of}")

    @staticmethod
    def wants_sampling(p: GenerateParameters) -> bool:
        # TGI samples when any warper is set, even with do_sample false
        return p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))

    def check_best_of_rules(self, p: GenerateParameters) -> None:
        """TGI's ``best_of`` rules (a field of TGI's wire format; the engine sees only ``n``)."""
        best_of = p.best_of if p.best_of is not None else 1
        if best_of != 1:
            self.check_best_of(best_of)
        if best_of > 1 and not self.wants_sampling(p):
            raise ValidationFailed("you must use sampling when `best_of` is > 1")
        if p.seed is not None and best_of > 1:
            raise ValidationFailed("`seed` must not be set when `best_of` > 1")

    def check_truncate(self, p: GenerateParameters) -> None:
        if p.truncate is not None and (p.truncate == 0 or p.truncate > self.limits.max_input_tokens):
            raise ValidationFailed(
                f"`truncate` must be strictly positive and less than {self.limits.max_input_tokens}. Given: {p.truncate}"
            )

    def check_constraint(self, p: GenerateParameters, constraint: Constraint | None) -> Constraint | None:
        """The request's constraint (``constraint``, else TGI's ``grammar``), compile-checked
        here so a schema the backend cannot serve answers 422 and never reaches the engine."""
        if constraint is None and p.grammar is not None:
            constraint = grammar_constraint(p.grammar)
        if constraint is None:
            return None
        if self.limits.disable_grammar_support:
            raise ValidationFailed("grammar is not supported")
        try:
            check_constraint(constraint, self.tokenizer, host=self.host)
        except RequestValidationError as exc:
            raise ValidationFailed(str(exc)) from exc
        return constraint

    # ------------------------------------------------------------------ tokens

    def check_token_ids(self, ids: Sequence[int]) -> None:
        """A client's prompt ids must be ids of this model (before anything decodes or runs them)."""
        try:
            check_token_ids(ids, self.vocab_size)
        except RequestValidationError as exc:
            raise ValidationFailed(str(exc)) from exc

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as exc:  # a tokenizer that chokes on the input is the client's 422
            raise ValidationFailed(f"tokenizer error {exc}") from exc

    def validate(
        self,
        p: GenerateParameters,
        *,
        inputs: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        add_special_tokens: bool = True,
        n: int = 1,
        presence_penalty: float | None = None,
        prompt_logprobs: bool | None = None,
        extra_stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        constraint: Constraint | None = None,
    ) -> ValidRequest:
        """Check ``p``'s wire format and the prompt (text or ids) and build the engine request
        (the engine's rules check it when it is submitted)."""
        self.check_best_of_rules(p)
        if prompt_ids is None:
            if not inputs:
                raise ValidationFailed("`inputs` cannot be empty")
        elif not prompt_ids:
            raise ValidationFailed("`inputs` cannot be empty")
        else:
            self.check_token_ids(prompt_ids)
        self.check_truncate(p)
        if prompt_ids is None:
            prompt_ids = self.tokenize(inputs or "", add_special_tokens)
        ids = list(prompt_ids)
        if p.truncate is not None:
            ids = ids[-p.truncate:]  # TGI keeps the end of the prompt
        input_length = len(ids)
        max_new_tokens = p.max_new_tokens
        if max_new_tokens is None:  # up to the budget (0 when the prompt fills it: the engine refuses that)
            max_new_tokens = min(max(self.limits.max_total_tokens - input_length, 0), DEFAULT_GENERATION_LENGTH)
        constraint = self.check_constraint(p, constraint)

        best_of = p.best_of if p.best_of is not None else 1
        sampling = self.wants_sampling(p)
        seed = p.seed
        if sampling and seed is None and best_of == 1 and n == 1:
            seed = random.getrandbits(63)  # TGI reports the seed it drew in `details.seed`
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=presence_penalty,
            seed=seed,
            watermark=p.watermark,
            stop=tuple(p.stop),
            stop_token_ids=tuple(dict.fromkeys((*self.eos_token_ids, *extra_stop_token_ids))),
            ignore_eos=ignore_eos,
            logprobs=True,
            top_n_tokens=p.top_n_tokens or 0,
            prompt_logprobs=p.decoder_input_details if prompt_logprobs is None else prompt_logprobs,
            n=max(best_of, n),
            constraint=constraint,
        )
        return ValidRequest(
            prompt_ids=tuple(ids),
            params=params,
            input_length=input_length,
            best_of=best_of,
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            top_n_tokens=p.top_n_tokens or 0,
        )
