"""TGI's request and response bodies (router/src/lib.rs), as pydantic models.

Field names, defaults and what is omitted when empty follow TGI, so TGI's own clients
(``text-generation``, ``huggingface_hub.InferenceClient``) parse our answers unchanged.
Range checks live in the engine's rules so their messages can match TGI's. Booleans are strict,
as TGI's serde is: ``"details": 0`` or ``"stream": "yes"`` is a 422, not a guess; so are
``"top_k": true`` and ``"temperature": "0.5"``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, ValidationInfo, field_validator, model_serializer



class JsonNumbers(BaseModel):
    """A request's integers as JSON Schema reads "integer": 9 and 9.0, not ``true`` or ``"9"``,
    which pydantic's lax int would take (its numbers are StrictFloat: not ``true`` or ``"0.5"``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _integers_are_json_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (bool, str)) and info.field_name in _integer_fields(cls):
            raise ValueError("Input should be a valid integer")
        return value


@functools.cache
def _integer_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, field in model.model_fields.items()
                     if field.annotation is int or int in get_args(field.annotation))

class OmitEmpty(BaseModel):
    """Drops the fields named in ``omit_if_empty`` from the JSON when they are None or []."""

    omit_if_empty: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_if_empty:
            if data.get(name) is None or data.get(name) == []:
                data.pop(name, None)
        return data


# ---------------------------------------------------------------------------- requests


class JsonGrammar(BaseModel):
    """TGI's ``{"type": "json", "value": <JSON schema>}`` (``json_object`` is its alias); the
    schema as an object or as its JSON text."""

    type: Literal["json", "json_object"]
    value: Union[dict[str, Any], str] = Field(description="the JSON schema the output follows")


class NamedJsonSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output follows")


class JsonSchemaGrammar(BaseModel):
    """TGI 3's ``{"type": "json_schema", "value": {"name": ..., "schema": <JSON schema>}}``."""

    type: Literal["json_schema"]
    value: NamedJsonSchema


class RegexGrammar(BaseModel):
    """``{"type": "regex", "value": "<regex the whole output matches>"}``."""

    type: Literal["regex"]
    value: str


Grammar = Union[JsonGrammar, JsonSchemaGrammar, RegexGrammar]  # anyOf (a oneOf with a discriminator trips OpenAPI tools)


class GenerateParameters(JsonNumbers):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(None, ge=0, description="Generate best_of sequences and return the one with the highest log probability")
    temperature: StrictFloat | None = Field(None, examples=[0.5])
    repetition_penalty: StrictFloat | None = Field(None, examples=[1.03])
    frequency_penalty: StrictFloat | None = Field(None, examples=[0.1])
    top_k: int | None = Field(None, examples=[10])
    top_p: StrictFloat | None = Field(None, examples=[0.95])
    typical_p: StrictFloat | None = Field(None, examples=[0.95])
    do_sample: StrictBool = False
    max_new_tokens: int | None = Field(None, ge=0, examples=[20], description="None: up to max_total_tokens, at most 1024")
    return_full_text: StrictBool | None = None
    stop: list[str] = Field(default_factory=list, examples=[["photographer"]])
    truncate: int | None = Field(None, ge=0)
    watermark: StrictBool = False
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    seed: int | None = Field(None, ge=0, lt=2**64)
    top_n_tokens: int | None = Field(None, ge=0, examples=[5])
    grammar: Grammar | None = None
    adapter_id: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(examples=["My name is Olivier and I"])
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    add_special_tokens: StrictBool = True

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters_none_is_default(cls, value: Any) -> Any:
        return {} if value is None else value


class TokenizeRequest(BaseModel):
    """``/tokenize``'s body: ``/generate``'s, whose ``parameters`` it accepts and ignores."""

    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(examples=["My name is Olivier and I"])
    add_special_tokens: StrictBool = True
    parameters: dict[str, Any] | None = Field(None, description="ignored (accepted, so /generate's body works here too)")


class CompatGenerateRequest(GenerateRequest):
    stream: StrictBool = False


# ---------------------------------------------------------------------------- responses

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class BestOfSequence(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("top_tokens",)

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("top_tokens", "best_of_sequences")

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("details",)

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(OmitEmpty):
    omit_if_empty: ClassVar[tuple[str, ...]] = ("top_tokens",)

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
