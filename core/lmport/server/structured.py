"""Structured output on the wire: TGI's ``parameters.grammar`` and OpenAI's ``response_format``
turned into the engine's :class:`~lmport.engine.api.Constraint` (plain data the engine resolves
into a grammar matcher; see :mod:`lmport.engine.constraints`).

- TGI: ``{"type": "json", "value": <schema object or its JSON text>}`` (``json_object`` is an alias),
  ``{"type": "json_schema", "value": {"name": ..., "schema": <schema>}}`` (TGI 3's form) and
  ``{"type": "regex", "value": "<regex>"}``.
- OpenAI: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON object),
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``; and,
  as TGI's chat API takes them, its grammars ``{"type": "json" | "json_object" | "regex", "value": ...}``
  (``huggingface_hub.InferenceClient.chat_completion`` turns a ``json_schema`` format into
  ``{"type": "json_object", "value": <schema>}``).

The server compile-checks the constraint before it submits the request
(:meth:`Validator.validate <lmport.server.validation.Validator.validate>`), so an unsupported
schema feature answers 422 naming it and never reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

from lmport.engine.api import Constraint
from lmport.server.errors import ValidationFailed


def schema_text(schema: Any, where: str) -> str:
    """A JSON schema (an object, or its JSON text) as JSON text; 422 for anything else."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValidationFailed(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(schema, (dict, bool)):
        raise ValidationFailed(f"{where} must be a JSON schema (an object)")
    return json.dumps(schema)


def grammar_constraint(grammar: Any) -> Constraint:
    """TGI's ``parameters.grammar`` (:data:`~lmport.server.schemas_tgi.Grammar`) as a constraint."""
    if grammar.type == "regex":
        return Constraint("regex", grammar.value)
    if grammar.type == "json_schema":
        return Constraint("json_schema", schema_text(grammar.value.schema_, "`grammar.value.schema`"))
    return Constraint("json_schema", schema_text(grammar.value, "`grammar.value`"))


def response_format_constraint(response_format: Any) -> Constraint | None:
    """OpenAI's ``response_format`` (:data:`~lmport.server.schemas_openai.ResponseFormat`) as a constraint."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        if response_format.value is not None:  # TGI's json_object carries a schema (huggingface_hub sends that)
            return Constraint("json_schema", schema_text(response_format.value, "`response_format.value`"))
        return Constraint("json_object", "")
    if response_format.type in ("json", "regex"):  # TGI's chat API takes its grammar here
        return grammar_constraint(response_format)
    spec = response_format.json_schema
    if spec.schema_ is None:  # a name without a schema: any JSON object
        return Constraint("json_object", "")
    return Constraint("json_schema", schema_text(spec.schema_, "`response_format.json_schema.schema`"))
