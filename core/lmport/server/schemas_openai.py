"""OpenAI-compatible request and response bodies (chat completions, completions, models).

Requests accept what the ``openai`` SDK and ``huggingface_hub.InferenceClient`` send (unknown
fields are ignored, as OpenAI-compatible servers usually do); responses follow OpenAI's shape.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat

from lmport.server.schemas_tgi import JsonNumbers, OmitEmpty


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: Any = None  # {"url": "data:image/png;base64,..." or "https://..."} for models that take images


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(JsonNumbers):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the server serves one model")
    messages: list[ChatMessage] = Field(min_length=1)
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: Union[str, list[str], None] = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    response_format: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    tool_prompt: str | None = None
    user: str | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: generate max_tokens even past EOS")


class ChatTokenizeRequest(BaseModel):
    """``/chat_tokenize``'s body: a chat request, of which only ``messages`` count (the other
    fields are accepted and ignored, so a chat completion's body works here too)."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(JsonNumbers):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(examples=["Say this is a test"])
    max_tokens: int | None = Field(None, ge=0)
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0)
    echo: StrictBool = False
    stop: Union[str, list[str], None] = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: generate max_tokens even past EOS")


# ---------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("role", "content")

    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("usage",)

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("usage",)

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lmport"
    modality: str = "text"  # lmport's extension: "image-text" when prompts may carry images


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error or server_error")
    param: str | None = Field(None, description="the request field at fault, where known")
    code: str | None = Field(None, description="TGI's error_type (validation, overloaded, generation ...)")


class OpenAIErrorResponse(BaseModel):
    """The error body of every ``/v1/*`` route."""

    error: OpenAIErrorDetail
