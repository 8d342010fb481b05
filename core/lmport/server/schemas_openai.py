"""OpenAI-compatible request and response bodies (chat completions, completions, models).

Requests accept what the ``openai`` SDK and ``huggingface_hub.InferenceClient`` send (unknown
fields are ignored, as OpenAI-compatible servers usually do); responses follow OpenAI's shape.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, field_validator

from lmport.server.schemas_tgi import JsonNumbers, OmitEmpty, RegexGrammar


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: Any = None  # {"url": "data:image/png;base64,..." or "https://..."} for models that take images


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    type: Literal["json_object"]
    value: Union[dict[str, Any], str, None] = Field(None, description="TGI's form (what huggingface_hub sends): a JSON schema the object follows")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = Field(None, description="The format's name (not used for decoding)")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema every reply follows")
    strict: StrictBool | None = Field(None, description="Accepted; replies always follow the schema")


class ResponseFormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


class ResponseFormatJson(BaseModel):
    """TGI's chat form: ``{"type": "json", "value": <JSON schema>}``."""

    type: Literal["json"]
    value: Union[dict[str, Any], str] = Field(description="the JSON schema the reply follows")


ResponseFormat = Union[ResponseFormatText, ResponseFormatJsonObject, ResponseFormatJsonSchema, ResponseFormatJson, RegexGrammar]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, user, assistant, tool (or any role the chat template knows)")
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[Any] | None = Field(None, description="an assistant turn's calls: [{id, type: function, function: {name, arguments}}]")
    tool_call_id: str | None = Field(None, description="a `tool` message: the id of the call it answers")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="a JSON Schema of type object (none: no arguments)",
        json_schema_extra={"properties": {"type": {"const": "object"}}},
    )
    strict: StrictBool | None = Field(None, description="accepted; arguments always follow `parameters` (constrained decoding)")


def _only_function_type(value: Any, what: str) -> Any:
    """A 422 that names an unsupported tool type (web_search, custom, allowed_tools ...)."""
    if isinstance(value, str) and value != "function":
        raise ValueError(f"{what} of type {value!r} are not supported: only `function`")
    return value


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = Field("function", description="only `function` tools are supported")
    function: FunctionDefinition

    @field_validator("type", mode="before")
    @classmethod
    def _only_functions(cls, value: Any) -> Any:
        return _only_function_type(value, "tools")


class FunctionName(BaseModel):
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``; ``type`` may be left out (huggingface_hub sends it so)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionName

    @field_validator("type", mode="before")
    @classmethod
    def _only_functions(cls, value: Any) -> Any:
        return _only_function_type(value, "tool_choice")


class ToolFields(JsonNumbers):
    """Function calling's request fields (docs/api.md, Tools), on chat requests and ``/chat_tokenize``."""

    tools: list[ToolDefinition] | None = Field(None, description="functions the model may call (docs/api.md, Tools)")
    tool_choice: Union[str, NamedToolChoice, None] = Field(
        None, description="`auto` (the default with tools), `none`, `required`, or a named function; a bare string "
        "naming a function works as in TGI",
    )
    tool_prompt: str | None = Field(None, description="TGI's: the text appended to the last message after the tools' JSON")
    parallel_tool_calls: StrictBool | None = Field(None, description="true: the reply may hold several calls (a JSON array)")
    functions: list[Any] | None = Field(None, description="OpenAI's deprecated form of `tools`: 422, use `tools`")
    function_call: Any = Field(None, description="OpenAI's deprecated form of `tool_choice`: 422, use `tool_choice`")


class ChatRequest(ToolFields):
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
    response_format: ResponseFormat | None = Field(None, description="Constrained output: JSON object or JSON schema (docs/api.md)")
    user: str | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: generate max_tokens even past EOS")


class ChatTokenizeRequest(ToolFields):
    """``/chat_tokenize``'s body: a chat request, of which only ``messages`` and the tool fields
    count (the other fields are accepted and ignored, so a chat completion's body works here too)."""

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
    response_format: ResponseFormat | None = Field(None, description="Constrained output: JSON object or JSON schema (docs/api.md)")
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


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="the reply's text; null when it is tool calls")
    tool_calls: list[ToolCall] | None = Field(None, description="the calls the reply made (with `tools`), else null")


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


class FunctionCallDelta(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("name", "arguments")

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(OmitEmpty):
    """A streamed call: the first delta of a call has ``id``, ``type`` and ``function.name``
    (with ``arguments: ""``); the later ones only ``index`` and an ``arguments`` fragment."""

    omit_if_empty: ClassVar[tuple[str, ...]] = ("id", "type")

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("role", "content", "tool_calls")

    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
