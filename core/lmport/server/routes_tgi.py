"""TGI's generation routes: ``/``, ``/generate``, ``/generate_stream``, ``/tokenize``.

Bodies, headers, SSE events and errors follow TGI's router (router/src/server.rs). One
deliberate difference: a request that fails validation before any token is produced gets its
HTTP status (422, 429 ...) even on the streaming route, where TGI sends a 200 followed by an
error event; clients handle both, and a status is easier to act on.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lmport.engine.api import OutputStream, TokenInfo
from lmport.server.auth import require_api_key
from lmport.server.errors import ApiError, ValidationFailed
from lmport.server.generation import (
    GenerationResult,
    RouteScope,
    SequenceResult,
    collect,
    stream_outputs,
    until_disconnect,
)
from lmport.server.images import validate_with_images
from lmport.server.schemas_tgi import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateRequest,
    GenerateResponse,
    ErrorResponse,
    PrefillToken,
    SimpleToken,
    Token,
    TokenizeRequest,
)
from lmport.server.strict_json import StrictJsonRoute
from lmport.server.state import ServerState
from lmport.server.streaming import (
    EventStreamResponse,
    finite_or_none,
    sse_data,
    tgi_event,
    token_json,
    token_texts,
    top_tokens_json,
)
from lmport.server.validation import ValidRequest

router = APIRouter(tags=["Text Generation Inference"], route_class=StrictJsonRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation Error"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
    500: {"model": ErrorResponse, "description": "Incomplete generation"},
}


def state_of(request: Request) -> ServerState:
    return request.app.state.lmport


# ---------------------------------------------------------------------------- routes


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS, dependencies=[Depends(require_api_key)])
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Generate tokens; TGI's timing headers (``x-*-time``) come with the answer."""
    response, headers = await generate_one(state_of(request), body, request)
    return JSONResponse(response.model_dump(), headers=headers)


@router.post(
    "/generate_stream",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events of StreamResponse"}, **ERRORS},
    dependencies=[Depends(require_api_key)],
)
async def generate_stream(body: GenerateRequest, request: Request) -> Response:
    """Generate a stream of tokens as server-sent events (``data:{StreamResponse}``)."""
    return await start_stream(state_of(request), body)


@router.post(
    "/",
    responses={200: {"model": list[GenerateResponse], "description": "Generated text (a list of one)"}, **ERRORS},
    dependencies=[Depends(require_api_key)],
)
async def compat_generate(body: CompatGenerateRequest, request: Request) -> Response:
    """``/generate`` (answer wrapped in a list) or ``/generate_stream`` when ``stream`` is true.

    Like TGI for a model without a hub pipeline tag, ``return_full_text`` defaults to true here.
    """
    if body.parameters.return_full_text is None:
        body.parameters.return_full_text = True
    state = state_of(request)
    if body.stream:
        return await start_stream(state, body)
    response, headers = await generate_one(state, body, request)
    return JSONResponse([response.model_dump()], headers=headers)


@router.post("/tokenize", response_model=list[SimpleToken], dependencies=[Depends(require_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> list[SimpleToken]:
    """Token ids of ``inputs`` with each token's text and character offsets; at most ``max_input_tokens`` of them."""
    state = state_of(request)
    return await state.off_loop(simple_tokens, state.tokenizer, body.inputs, body.add_special_tokens, state.limits.max_input_tokens)


def simple_tokens(tokenizer: Any, text: str, add_special_tokens: bool, most: int) -> list[SimpleToken]:
    """The tokens of ``text`` (a 422 past ``most``: a 2 MB text made a 52 MB answer)."""
    try:
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except Exception as exc:  # a tokenizer that chokes on the input is the client's 422
        raise ValidationFailed(f"tokenizer error {exc}") from exc
    if len(encoding["input_ids"]) > most:
        raise ValidationFailed(f"`inputs` must have less than {most} tokens. Given: {len(encoding['input_ids'])}")
    return [
        SimpleToken(id=token_id, text=text[start:stop], start=start, stop=stop)
        for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]


# ---------------------------------------------------------------------------- /generate


async def generate_one(state: ServerState, body: GenerateRequest, request: Request) -> tuple[GenerateResponse, dict[str, str]]:
    with RouteScope(state) as scope:
        valid = await validate_with_images(state, body.parameters, inputs=body.inputs, add_special_tokens=body.add_special_tokens)
        (stream,) = scope.open([valid])
        timings = scope.timings(stream)
        result = await until_disconnect(request, collect(stream, valid, timings))
    prefix = body.inputs if body.parameters.return_full_text else ""
    response = build_generate_response(state, valid, result, prefix)
    best = result.best() if valid.best_of > 1 else result.sequences[0]
    split = scope.succeeded(timings, best.generated_tokens)
    return response, timing_headers(state, body.inputs, split, valid.input_length, best.generated_tokens)


def build_generate_response(state: ServerState, valid: ValidRequest, result: GenerationResult, prefix: str) -> GenerateResponse:
    best = result.best() if valid.best_of > 1 else result.sequences[0]
    text = prefix + best.text
    if not valid.details:
        return GenerateResponse(generated_text=text)
    prefill = prefill_tokens(state, valid, result) if valid.decoder_input_details else []
    others = [s for s in result.sequences if s is not best] if valid.best_of > 1 else None
    return GenerateResponse(
        generated_text=text,
        details=Details(
            finish_reason=tgi_finish_reason(best.finish_reason),
            generated_tokens=best.generated_tokens,
            seed=best.seed if best.seed is not None else valid.params.seed,
            prefill=prefill,
            tokens=sequence_tokens(best),
            top_tokens=sequence_top_tokens(state, best) if valid.top_n_tokens else [],
            best_of_sequences=[
                BestOfSequence(
                    generated_text=prefix + s.text,
                    finish_reason=tgi_finish_reason(s.finish_reason),
                    generated_tokens=s.generated_tokens,
                    seed=s.seed,
                    prefill=prefill,
                    tokens=sequence_tokens(s),
                    top_tokens=sequence_top_tokens(state, s) if valid.top_n_tokens else [],
                )
                for s in others
            ] if others is not None else None,
        ),
    )


def tgi_finish_reason(reason: str | None) -> str:
    # "abort" only happens when the client left; anything unknown reads as "length"
    return reason if reason in ("length", "eos_token", "stop_sequence") else "length"


def sequence_tokens(seq: SequenceResult) -> list[Token]:
    return [Token(**token_json(t, text)) for t, text in zip(seq.tokens, seq.token_texts)]


def sequence_top_tokens(state: ServerState, seq: SequenceResult) -> list[list[Token]]:
    special = state.special_ids
    return [[Token(**t) for t in top_tokens_json(token, special)] for token in seq.tokens]


def prefill_tokens(state: ServerState, valid: ValidRequest, result: GenerationResult) -> list[PrefillToken]:
    tokenizer = state.tokenizer
    if result.prompt_tokens:
        tokens: list[TokenInfo] = result.prompt_tokens
        return [
            PrefillToken(id=t.token_id, text=t.text or tokenizer.decode([t.token_id]), logprob=None if i == 0 else finite_or_none(t.logprob))
            for i, t in enumerate(tokens)
        ]
    # The engine gave no prompt logprobs: ids and texts are still known.
    return [PrefillToken(id=i, text=tokenizer.decode([i]), logprob=None) for i in valid.prompt_ids]


def timing_headers(state: ServerState, inputs: str, split: dict[str, float], input_length: int, generated: int) -> dict[str, str]:
    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": state.compute_type,
        "x-compute-time": repr(split["total"]),
        "x-compute-characters": str(len(inputs)),
        "x-total-time": ms(split["total"]),
        "x-validation-time": ms(split["validation"]),
        "x-queue-time": ms(split["queue"]),
        "x-inference-time": ms(split["inference"]),
        "x-time-per-token": ms(split["inference"] / max(generated, 1)),
        "x-prompt-tokens": str(input_length),
        "x-generated-tokens": str(generated),
    }


# ---------------------------------------------------------------------------- /generate_stream


async def start_stream(state: ServerState, body: GenerateRequest) -> Response:
    """Validate and submit now (so refusals get their status), then stream; the scope lives with the stream."""
    scope = RouteScope(state)
    with scope.opening():
        state.validator.check_stream(body.parameters)
        valid = await validate_with_images(state, body.parameters, inputs=body.inputs, add_special_tokens=body.add_special_tokens)
        (stream,) = scope.open([valid])
    prefix = body.inputs if body.parameters.return_full_text else ""
    headers = {"x-compute-type": state.compute_type, "x-compute-characters": str(len(body.inputs))}
    return EventStreamResponse(tgi_events(scope, stream, valid, prefix, body.parameters.details), headers=headers)


async def tgi_events(scope: RouteScope, stream: OutputStream, valid: ValidRequest, prefix: str, details: bool) -> AsyncIterator[bytes]:
    """``StreamResponse`` events, one per token; the last carries the text and (with ``details``) its details.

    Built as dicts by :func:`tgi_event`: this runs once per streamed token.
    """
    index = 0
    text_parts: list[str] = []
    last_id = 0
    special_ids = scope.state.special_ids if valid.top_n_tokens else None
    timings = scope.timings(stream)
    try:
        async for output in stream_outputs(stream, timings, valid.params.n):
            text_parts.append(output.text)
            tokens = output.tokens
            texts = token_texts(output)
            if output.finished and not tokens:  # finished without a new token: close with an empty one
                tokens, texts = [TokenInfo(token_id=last_id, logprob=0.0, text="", special=True)], [""]
            last = len(tokens) - 1
            for position, token in enumerate(tokens):
                index += 1
                last_id = token.token_id
                generated_text = event_details = None
                if output.finished and position == last:
                    generated_text = prefix + "".join(text_parts)
                    if details:
                        event_details = {  # StreamDetails
                            "finish_reason": tgi_finish_reason(output.finish_reason),
                            "generated_tokens": output.num_generated_tokens or index,
                            "seed": output.seed if output.seed is not None else valid.params.seed,
                            "input_length": valid.input_length,
                        }
                    scope.succeeded(timings, output.num_generated_tokens or index)
                top = top_tokens_json(token, special_ids) if special_ids is not None else None
                yield tgi_event(index, token_json(token, texts[position]), top, generated_text, event_details)
    except ApiError as exc:
        scope.failed(exc)
        yield sse_data(exc.body())
    finally:
        scope.close()
