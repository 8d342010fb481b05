"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Parameters map onto TGI's (and so go through TGI's validation and error JSON): temperature 0
means greedy, no temperature means sampling at 1.0 (OpenAI's default), ``top_p`` 1.0 means
off, ``top_logprobs`` is ``top_n_tokens``. Stop sequences are cut from the returned text.
``tools`` are read and answered by :mod:`lmport.server.tools`; ``response_format``
(``json_object``, ``json_schema``) becomes the engine's constraint (:mod:`lmport.server.structured`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lmport.engine.api import OutputStream, RequestOutput, TokenInfo
from lmport.server.auth import require_api_key
from lmport.server.chat import render_chat
from lmport.server.errors import ApiError, ValidationFailed
from lmport.server.generation import GenerationResult, RouteScope, SequenceResult, collect, stream_outputs, until_disconnect
from lmport.server.routes_tgi import ERRORS, simple_tokens, state_of
from lmport.server.images import validate_with_images
from lmport.server.schemas_openai import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChatTokenizeRequest,
    ChoiceLogprobs,
    AssistantMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from lmport.server.schemas_tgi import ChatTokenizeResponse, GenerateParameters
from lmport.server.strict_json import StrictJsonRoute
from lmport.server.state import ServerState
from lmport.server.structured import response_format_constraint
from lmport.server.streaming import ChunkTemplate, EventStreamResponse, finite_or_none, sse_data, token_texts
from lmport.server.tool_stream import StreamedCalls, read_tool_calls
from lmport.server.tools import ToolPlan, constrain, plan_tools, tool_calls_of
from lmport.server.validation import ValidRequest

router = APIRouter(tags=["OpenAI compatible"], route_class=StrictJsonRoute)

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "abort": "stop", None: "stop"}


def openai_parameters(
    *, temperature: float | None, top_p: float | None, max_tokens: int | None, stop: str | list[str] | None,
    seed: int | None, frequency_penalty: float | None, repetition_penalty: float | None, top_logprobs: int | None,
) -> GenerateParameters:
    greedy = temperature == 0.0
    return GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if top_p is None or top_p >= 1.0 else top_p,
        max_new_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=seed,
        frequency_penalty=frequency_penalty or None,
        repetition_penalty=repetition_penalty,
        top_n_tokens=top_logprobs or None,
        details=True,
    )


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------------------- chat


async def chat_request_to_valid(state: ServerState, body: ChatRequest) -> tuple[ValidRequest, ToolPlan | None]:
    tools = plan_tools(body)
    if body.top_logprobs and not body.logprobs:
        raise ValidationFailed("`top_logprobs` needs `logprobs` set to true")
    prompt = await state.off_loop(
        render_chat, state.tokenizer, body.messages, state.model.chat_template, images=state.image_prompts is not None, tools=tools,
    )
    params = openai_parameters(
        temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=body.stop, seed=body.seed, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, top_logprobs=body.top_logprobs if body.logprobs else None,
    )
    valid = await validate_with_images(
        state, params, inputs=prompt, add_special_tokens=False, n=body.n or 1, presence_penalty=body.presence_penalty or None,
        extra_stop_token_ids=() if body.ignore_eos else state.model.chat_stop_token_ids, ignore_eos=body.ignore_eos,
        constraint=response_format_constraint(body.response_format),
    )
    if tools is not None:
        valid = await state.off_loop(constrain, state, valid, tools)
    return valid, tools


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS, dependencies=[Depends(require_api_key)])
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    """Chat completion through the model's chat template; ``stream`` gives OpenAI's chunks."""
    state = state_of(request)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    scope = RouteScope(state)
    if body.stream:
        with scope.opening():
            valid, tools = await chat_request_to_valid(state, body)
            (stream,) = scope.open([valid])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_events(scope, stream, valid, completion_id, include_usage, bool(body.logprobs), body.top_logprobs or 0, tools)
        return EventStreamResponse(events)
    with scope:
        valid, tools = await chat_request_to_valid(state, body)
        (stream,) = scope.open([valid])
        timings = scope.timings(stream)
        result = await until_disconnect(request, collect(stream, valid, timings))
    scope.succeeded(timings, result.generated_tokens)
    choices = []
    for seq in result.sequences:
        message = chat_message(seq.text_before_stop, tools)
        choices.append(ChatChoice(
            index=seq.index,
            message=message,
            logprobs=chat_logprobs(seq.tokens, seq.token_texts, body.top_logprobs or 0) if body.logprobs else None,
            finish_reason=chat_finish(seq.finish_reason, bool(message.tool_calls)),
        ))
    completion = ChatCompletion(
        id=completion_id, created=now(), model=state.model.model_id, system_fingerprint=state.system_fingerprint,
        choices=choices, usage=usage(result),
    )
    return JSONResponse(completion.model_dump())


def chat_message(text: str, tools: ToolPlan | None) -> AssistantMessage:
    """The reply: its text, or (with tools) the calls read from it."""
    if tools is None:
        return AssistantMessage(content=text)
    calls, content = read_tool_calls(text, tools.text_allowed)
    return AssistantMessage(content=content, tool_calls=tool_calls_of(calls) or None)


def chat_finish(finish_reason: str | None, called: bool) -> str:
    """OpenAI's finish reason; ``tool_calls`` for a reply of calls that was not cut by the length limit."""
    if called and finish_reason != "length":
        return "tool_calls"
    return FINISH.get(finish_reason, "stop")


def usage(result: GenerationResult | None, prompt_tokens: int = 0, completion_tokens: int = 0) -> Usage:
    if result is not None:
        prompt_tokens, completion_tokens = result.input_length, result.generated_tokens
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def chat_logprobs(tokens: list[TokenInfo], texts: list[str], top: int) -> ChoiceLogprobs:
    content = []
    for token, text in zip(tokens, texts):
        shown = token.text if token.special else text
        content.append(TokenLogprob(
            token=shown,
            logprob=finite_or_none(token.logprob) or 0.0,
            bytes=list(shown.encode()),
            top_logprobs=[
                TopLogprob(token=t_text, logprob=finite_or_none(lp) or 0.0, bytes=list(t_text.encode()))
                for _, lp, t_text in token.top_tokens[:top]
            ],
        ))
    return ChoiceLogprobs(content=content)


async def chat_events(
    scope: RouteScope, stream: OutputStream, valid: ValidRequest, completion_id: str,
    include_usage: bool, logprobs: bool, top: int, tools: ToolPlan | None = None,
) -> AsyncIterator[bytes]:
    """``ChatCompletionChunk`` events, one per engine output (see :class:`ChunkTemplate`: this runs per token).

    With ``tools``, each sequence's text goes through a :class:`StreamedCalls`: calls stream as
    ``delta.tool_calls`` and outputs that add nothing visible send no chunk."""
    state = scope.state
    created, model = now(), state.model.model_id
    chunks = ChunkTemplate(completion_id, "chat.completion.chunk", created, model, state.system_fingerprint)
    started: set[int] = set()
    generated = 0
    stop_cutter = StopCutter(valid.params.stop)
    calls = StreamedCalls(tools.text_allowed) if tools is not None else None
    timings = scope.timings(stream)
    try:
        async for output in stream_outputs(stream, timings, valid.params.n):
            tokens = output.tokens
            generated += len(tokens)
            texts = token_texts(output)
            if len(tokens) == 1:
                plain = "" if tokens[0].special else texts[0]
            else:
                plain = "".join(t for t, tok in zip(texts, tokens) if not tok.special)
            content = stop_cutter.feed(output.index, plain, output)
            finish = FINISH.get(output.finish_reason, "stop") if output.finished else None
            if calls is None:
                delta = {"content": content}
            else:
                delta = calls.delta(output.index, content, output.finished)
                if output.finished:
                    finish = chat_finish(output.finish_reason, calls.called(output.index))
                if not delta and output.index in started and finish is None and not (logprobs and tokens):
                    continue
            if output.index not in started:
                started.add(output.index)
                delta = {"role": "assistant", **delta}
            yield chunks.event({
                "index": output.index,
                "delta": delta,
                "logprobs": chat_logprobs(tokens, texts, top).model_dump() if logprobs and tokens else None,
                "finish_reason": finish,
            })
        scope.succeeded(timings, generated)
        if include_usage:
            chunk = ChatCompletionChunk(
                id=completion_id, created=created, model=model, system_fingerprint=state.system_fingerprint,
                choices=[], usage=usage(None, valid.input_length, generated),
            )
            yield sse_data(chunk)
        yield sse_data("[DONE]")
    except ApiError as exc:
        scope.failed(exc)
        yield sse_data(exc.openai_body())
    finally:
        scope.close()


class StopCutter:
    """Streams text without the stop sequence: holds back the last ``len(longest stop) - 1``
    characters of each sequence until it is clear they do not start a stop string, and cuts
    the last output where the engine says the stop string began (``stop_text_offset``)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending: dict[int, str] = {}
        self.sent: dict[int, int] = {}  # characters of each sequence's text already streamed

    def feed(self, index: int, text: str, output: RequestOutput) -> str:
        if not self.stops:
            return text
        pending = self.pending.get(index, "") + text
        sent = self.sent.get(index, 0)
        if output.finished:
            self.pending.pop(index, None)
            if output.stop_text_offset is not None:
                return pending[: max(output.stop_text_offset - sent, 0)]
            return pending
        cut = len(pending) - self.hold
        if cut <= 0:
            self.pending[index] = pending
            return ""
        self.pending[index] = pending[cut:]
        self.sent[index] = sent + cut
        return pending[:cut]


@router.post("/chat_tokenize", response_model=ChatTokenizeResponse, responses=ERRORS, tags=["Text Generation Inference"], dependencies=[Depends(require_api_key)])
async def chat_tokenize(body: ChatTokenizeRequest, request: Request) -> ChatTokenizeResponse:
    """The chat request's templated prompt (with its tools, as a chat completion renders it) and its tokens."""
    state = state_of(request)
    state.metrics.request()
    prompt = await state.off_loop(render_chat, state.tokenizer, body.messages, state.model.chat_template, tools=plan_tools(body))
    tokens = await state.off_loop(simple_tokens, state.tokenizer, prompt, False, state.limits.max_input_tokens)
    return ChatTokenizeResponse(tokenize_response=tokens, templated_text=prompt)


# ---------------------------------------------------------------------------- completions


def completion_prompts(state: ServerState, body: CompletionRequest) -> list[tuple[str, list[int] | None]]:
    """(text, ids) per prompt: text prompts are tokenized later, id prompts are decoded for echo."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise ValidationFailed("`prompt` cannot be empty")
    if all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]  # type: ignore[misc]
    id_prompts = [list(prompt)] if all(isinstance(p, int) for p in prompt) else [list(p) for p in prompt]  # type: ignore[arg-type]
    for ids in id_prompts:
        state.validator.check_token_ids(ids)  # before decode: a negative id makes the tokenizer raise
    return [(state.tokenizer.decode(ids), ids) for ids in id_prompts]


async def completion_requests(state: ServerState, body: CompletionRequest) -> list[tuple[str, ValidRequest]]:
    """Each prompt's engine request; tokenizing and decoding run on the tokenize pool (off the loop)."""
    if body.suffix is not None:
        raise ApiError("Suffix is not supported and can be achieved by preprocessing the prompt.", status_code=422, error_type="suffix not supported")
    if body.best_of is not None and body.best_of > 1:
        raise ValidationFailed("`best_of` is not supported on /v1/completions; use `n` or /generate's best_of")
    prompts = await state.off_loop(completion_prompts, state, body)
    if len(prompts) > state.limits.max_client_batch_size:
        raise ApiError(
            f"Number of prompts exceeds the maximum allowed batch size of {state.limits.max_client_batch_size}",
            status_code=422, error_type="batch size exceeded",
        )
    if body.logprobs is not None and body.logprobs > state.limits.max_top_n_tokens:
        raise ValidationFailed(f"`logprobs` must be >= 0 and <= {state.limits.max_top_n_tokens}. Given: {body.logprobs}")
    params = openai_parameters(
        temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_tokens if body.max_tokens is not None else 100,
        stop=body.stop, seed=body.seed, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, top_logprobs=body.logprobs,
    )
    want_prompt_logprobs = body.echo and body.logprobs is not None
    out = []
    options = dict(
        n=body.n or 1, presence_penalty=body.presence_penalty or None, prompt_logprobs=want_prompt_logprobs,
        ignore_eos=body.ignore_eos, constraint=response_format_constraint(body.response_format),
    )
    for text, ids in prompts:
        if ids is None:  # a text prompt may hold markdown images, as /generate's
            valid = await validate_with_images(state, params, inputs=text, add_special_tokens=True, **options)
        else:
            valid = await state.off_loop(state.validator.validate, params, prompt_ids=ids, add_special_tokens=True, **options)
        out.append((text, valid))
    return out


@router.post("/v1/completions", response_model=Completion, responses=ERRORS, dependencies=[Depends(require_api_key)])
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Text completion for one prompt or several (strings or token ids); ``echo`` and ``logprobs``."""
    state = state_of(request)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    n = body.n or 1
    scope = RouteScope(state)
    if body.stream:
        with scope.opening():
            requests = await completion_requests(state, body)
            streams = scope.open([valid for _, valid in requests])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(completion_events(scope, requests, streams, n, completion_id, include_usage, body))
    with scope:
        requests = await completion_requests(state, body)
        streams = scope.open([valid for _, valid in requests])
        timings = [scope.timings(stream) for stream in streams]
        results = await until_disconnect(
            request, asyncio.gather(*(collect(s, valid, t) for (_, valid), s, t in zip(requests, streams, timings)))
        )
    choices = []
    for prompt_index, ((text, valid), result, t) in enumerate(zip(requests, results, timings)):
        scope.succeeded(t, result.generated_tokens)
        for seq in result.sequences:
            choices.append(completion_choice(state, body, prompt_index * n + seq.index, text, valid, result, seq))
    total_prompt = sum(r.input_length for r in results)
    total_generated = sum(r.generated_tokens for r in results)
    completion = Completion(
        id=completion_id, created=now(), model=state.model.model_id, system_fingerprint=state.system_fingerprint,
        choices=choices, usage=usage(None, total_prompt, total_generated),
    )
    return JSONResponse(completion.model_dump())


def completion_choice(
    state: ServerState, body: CompletionRequest, index: int, prompt_text: str, valid: ValidRequest,
    result: GenerationResult, seq: SequenceResult,
) -> CompletionChoice:
    text = seq.text_before_stop
    logprobs = None
    if body.logprobs is not None:
        tokens, texts = list(seq.tokens), list(seq.token_texts)
        first_is_prompt = False
        if body.echo:
            prompt_tokens = result.prompt_tokens or [
                TokenInfo(token_id=i, logprob=float("nan"), text=state.tokenizer.decode([i])) for i in valid.prompt_ids
            ]
            tokens = list(prompt_tokens) + tokens
            texts = [t.text for t in prompt_tokens] + texts
            first_is_prompt = True
        logprobs = completion_logprobs(tokens, texts, body.logprobs, first_is_prompt)
    return CompletionChoice(
        index=index,
        text=(prompt_text if body.echo else "") + text,
        logprobs=logprobs,
        finish_reason=FINISH.get(seq.finish_reason, "stop"),
    )


def completion_logprobs(tokens: list[TokenInfo], texts: list[str], top: int, first_is_prompt: bool) -> CompletionLogprobs:
    offsets, position = [], 0
    for text in texts:
        offsets.append(position)
        position += len(text)
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[None if (first_is_prompt and i == 0) else finite_or_none(t.logprob) for i, t in enumerate(tokens)],
        top_logprobs=[
            None if (first_is_prompt and i == 0) else {tt: finite_or_none(lp) or 0.0 for _, lp, tt in t.top_tokens[:top]}
            for i, t in enumerate(tokens)
        ],
        text_offset=offsets,
    )


async def completion_events(
    scope: RouteScope, requests: list[tuple[str, ValidRequest]], streams: list[OutputStream], n: int,
    completion_id: str, include_usage: bool, body: CompletionRequest,
) -> AsyncIterator[bytes]:
    """``Completion`` chunks, one per engine output of any prompt (see :class:`ChunkTemplate`: this runs per token)."""
    state = scope.state
    created, model = now(), state.model.model_id
    chunks = ChunkTemplate(completion_id, "text_completion", created, model, state.system_fingerprint)
    generated = [0] * len(requests)
    cutters = [StopCutter(valid.params.stop) for _, valid in requests]
    logprobs = body.logprobs
    try:
        if body.echo:
            for i, (text, _) in enumerate(requests):
                for seq_index in range(n):
                    yield chunks.event({"index": i * n + seq_index, "text": text, "logprobs": None, "finish_reason": None})
        async with aclosing(prompt_outputs(scope, requests, streams, generated)) as outputs:  # a client that leaves aborts now
            async for prompt_index, item in outputs:
                if isinstance(item, ApiError):
                    scope.failed(item)
                    yield sse_data(item.openai_body())
                    continue
                tokens = item.tokens
                texts = token_texts(item)
                if len(tokens) == 1:
                    plain = "" if tokens[0].special else texts[0]
                else:
                    plain = "".join(t for t, tok in zip(texts, tokens) if not tok.special)
                yield chunks.event({
                    "index": prompt_index * n + item.index,
                    "text": cutters[prompt_index].feed(item.index, plain, item),
                    "logprobs": completion_logprobs(tokens, texts, logprobs, False).model_dump() if logprobs is not None and tokens else None,
                    "finish_reason": FINISH.get(item.finish_reason, "stop") if item.finished else None,
                })
        if include_usage:
            prompt_tokens = sum(valid.input_length for _, valid in requests)
            yield sse_data(Completion(
                id=completion_id, created=created, model=model, system_fingerprint=state.system_fingerprint,
                choices=[], usage=usage(None, prompt_tokens, sum(generated)),
            ))
        yield sse_data("[DONE]")
    finally:
        scope.close()


async def prompt_outputs(
    scope: RouteScope, requests: list[tuple[str, ValidRequest]], streams: list[OutputStream], generated: list[int]
) -> AsyncIterator[tuple[int, RequestOutput | ApiError]]:
    """Every prompt's engine outputs as ``(prompt index, output)``, in the order they come.

    A prompt that fails gives its :class:`ApiError` and the others go on. Counts each prompt's
    tokens into ``generated`` and records each prompt's success when its stream ends. One
    prompt (the usual case) is read directly; several are merged through a queue, a task each.
    """
    if len(requests) == 1:  # no task and no queue hop per token
        timings = scope.timings(streams[0])
        try:
            async for output in stream_outputs(streams[0], timings, requests[0][1].params.n):
                generated[0] += len(output.tokens)
                yield 0, output
            scope.succeeded(timings, generated[0])
        except ApiError as exc:
            yield 0, exc
        return

    queue: asyncio.Queue[tuple[int, RequestOutput | ApiError | None]] = asyncio.Queue()

    async def pump(prompt_index: int, valid: ValidRequest, stream: OutputStream) -> None:
        timings = scope.timings(stream)
        try:
            async for output in stream_outputs(stream, timings, valid.params.n):
                generated[prompt_index] += len(output.tokens)
                await queue.put((prompt_index, output))
            scope.succeeded(timings, generated[prompt_index])
        except ApiError as exc:
            await queue.put((prompt_index, exc))
        finally:
            await queue.put((prompt_index, None))

    tasks = [asyncio.create_task(pump(i, valid, stream)) for i, ((_, valid), stream) in enumerate(zip(requests, streams))]
    try:
        running = len(tasks)
        while running:
            prompt_index, item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield prompt_index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------- models


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The one model this server serves."""
    state = state_of(request)
    return ModelList(data=[ModelCard(id=state.model.model_id, created=int(state.started_at), modality=state.model.modality)])
