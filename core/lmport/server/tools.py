"""OpenAI's ``tools`` on ``/v1/chat/completions``: the request's functions and ``tool_choice``
turned into a prompt, a constraint on the reply, and the reply read back as ``tool_calls``.

- :func:`plan_tools` checks ``tools`` / ``tool_choice`` (422 naming what is not supported) and
  gives a :class:`ToolPlan`, or None when the reply is plain text (no tools, ``tool_choice:
  "none"``).
- The prompt: a chat template that takes ``tools`` receives them (transformers'
  ``apply_chat_template(tools=...)``); TGI's ``tool_prompt`` is appended to the last message, after
  the tools' JSON when the template does not take them (:meth:`ToolPlan.prompt_suffix`, as TGI).
- The reply's text is ``{"name": ..., "arguments": {...}}`` (a JSON array of them with
  ``parallel_tool_calls: true``). ``required`` and a named function constrain it to that JSON
  with the functions' parameter schemas (a ``json_schema`` constraint); ``auto`` to a grammar
  that allows either such a call or plain text that does not begin with ``{``/``[``
  (:meth:`ToolPlan.constraint`). :mod:`lmport.server.tool_stream` reads the calls back, streamed
  or whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from lmport.engine.api import Constraint
from lmport.engine.constraints import check_constraint
from lmport.engine.errors import RequestValidationError
from lmport.server.errors import ValidationFailed
from lmport.server.schemas_openai import FunctionCall, NamedToolChoice, ToolCall, ToolFields
from lmport.server.tool_stream import ToolCallText, new_call_id
from lmport.server.validation import ValidRequest

# The instruction appended after the tools' JSON (TGI's ``tool_prompt``), in the reply format
# the constraint enforces.
DEFAULT_TOOL_PROMPT = (
    "\nTo call one of the functions above, reply only with a JSON object "
    '{"name": <the function\'s name>, "arguments": <an object of its arguments>}; '
    "otherwise answer in plain text.\n"
)

Choice = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON Schema of type object

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's tool object, as templates and the prompt show it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    functions: tuple[Function, ...]  # shown to the model
    choice: Choice
    callable: tuple[Function, ...]  # what the reply may call (the named one, or all)
    parallel: bool
    tool_prompt: str

    @property
    def text_allowed(self) -> bool:
        return self.choice == "auto"

    def tools_json(self) -> list[dict[str, Any]]:
        return [f.as_tool() for f in self.functions]

    def prompt_suffix(self, template_takes_tools: bool) -> str:
        """What TGI appends to the last message: the tools' JSON (unless the template shows
        them) and the tool prompt."""
        if template_takes_tools:
            return f"\n---\n{self.tool_prompt}"
        return f"\n---\n{json.dumps(self.tools_json(), ensure_ascii=False)}\n{self.tool_prompt}"

    def reply_schema(self) -> dict[str, Any]:
        """The JSON Schema of a tool-call reply."""
        calls = [call_schema(f, i) for i, f in enumerate(self.callable)]
        defs: dict[str, Any] = {}
        for schema in calls:
            defs.update(schema.pop("$defs", {}))
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {"type": "array", "items": one, "minItems": 1} if self.parallel else one
        if defs:
            schema = {**schema, "$defs": defs}
        # compact JSON, no free whitespace: shorter replies, and a model cannot loop on spaces
        # (llguidance's keyword; other backends ignore it as an unknown keyword)
        return {**schema, "x-guidance": {"whitespace_flexible": False}}

    def constraint(self) -> tuple[str, str]:
        """``(kind, value)`` of the engine constraint for the reply (see the module doc)."""
        schema = json.dumps(self.reply_schema(), ensure_ascii=False)
        if self.choice != "auto":
            return "json_schema", schema
        return "lark", auto_grammar(schema)


def auto_grammar(call_schema_json: str) -> str:
    """A Lark grammar (llguidance's dialect, ``%json``) for ``tool_choice: "auto"``: a call, or
    text whose first non-space character is not ``{`` or ``[`` (so the first such character
    decides which), or nothing."""
    return (
        "start: call | TEXT | \n"
        f"call: %json {call_schema_json}\n"
        "TEXT: /\\s*[^\\s{\\[](.|\\n)*/ | /\\s+/\n"
    )


def call_schema(function: Function, position: int) -> dict[str, Any]:
    """``{"name": <const>, "arguments": <the parameters' schema>}``. A parameters schema with
    ``$ref`` s has its definitions moved to the root (as ``$defs/tool<position>...``) and its
    references rewritten, so they still resolve inside the reply's schema."""
    parameters = function.parameters
    defs: dict[str, Any] = {}
    if _has_refs(parameters):
        prefix = f"tool{position}"
        body = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
        for section in ("$defs", "definitions"):
            for name, sub in (parameters.get(section) or {}).items():
                defs[f"{prefix}__{name}"] = _rewrite_refs(sub, prefix)
        defs[prefix] = _rewrite_refs(body, prefix)
        parameters = {"$ref": f"#/$defs/{prefix}"}
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"type": "string", "const": function.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def _has_refs(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "$ref" in schema or "$defs" in schema or "definitions" in schema or any(_has_refs(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_refs(v) for v in schema)
    return False


def _rewrite_refs(schema: Any, prefix: str) -> Any:
    if isinstance(schema, list):
        return [_rewrite_refs(v, prefix) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rewrite_refs(v, prefix) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        pointer = ref[1:]
        for section in ("/$defs/", "/definitions/"):
            if pointer.startswith(section):
                name, _, rest = pointer[len(section):].partition("/")
                out["$ref"] = f"#/$defs/{prefix}__{name}" + (f"/{rest}" if rest else "")
                break
        else:
            out["$ref"] = f"#/$defs/{prefix}{pointer}"
    return out


# ---------------------------------------------------------------------------- the request


def plan_tools(body: ToolFields) -> ToolPlan | None:
    """The request's tool plan, or None for a plain-text reply; 422 for what is not supported."""
    if body.functions is not None or body.function_call is not None:
        raise ValidationFailed(
            "`functions` and `function_call` (OpenAI's deprecated function calling) are not supported: use `tools` and `tool_choice`",
            param="functions" if body.functions is not None else "function_call",
        )
    choice = body.tool_choice
    if not body.tools:
        if choice is None or choice in ("none", "auto"):
            return None
        raise ValidationFailed("`tool_choice` needs `tools`", param="tool_choice")
    functions = _functions(body)
    if choice is None or choice == "auto":
        kind: Choice = "auto"
        callable_ = functions
    elif choice == "none":
        return None
    elif choice == "required":
        kind, callable_ = "required", functions
    else:
        kind, callable_ = "named", (_named(choice, functions),)
    response_format = getattr(body, "response_format", None)  # a chat request's (not /chat_tokenize's)
    if response_format is not None and not _is_text_format(response_format):
        raise ValidationFailed("`response_format` and `tools` cannot be used together", param="response_format")
    return ToolPlan(
        functions=callable_ if kind == "named" else functions,  # TGI shows only the named function
        choice=kind,
        callable=callable_,
        parallel=body.parallel_tool_calls is True,
        tool_prompt=body.tool_prompt or DEFAULT_TOOL_PROMPT,
    )


def _is_text_format(response_format: Any) -> bool:
    kind = response_format.get("type") if isinstance(response_format, dict) else getattr(response_format, "type", None)
    return kind == "text"


def _functions(body: ToolFields) -> tuple[Function, ...]:
    out: list[Function] = []
    seen: set[str] = set()
    for i, tool in enumerate(body.tools or ()):  # the schema holds `type` to "function" and needs `function`
        name = tool.function.name
        if name in seen:
            raise ValidationFailed(f"`tools` holds two functions named {name!r}", param=f"tools.{i}.function.name")
        seen.add(name)
        parameters = tool.function.parameters
        if not parameters:
            parameters = {"type": "object", "properties": {}}
        elif parameters.get("type", "object") != "object":
            raise ValidationFailed(
                f"`tools[{i}].function.parameters` must be a JSON Schema of type `object`. Given type: {parameters.get('type')!r}",
                param=f"tools.{i}.function.parameters",
            )
        out.append(Function(name=name, description=tool.function.description, parameters=parameters))
    return tuple(out)


def _named(choice: str | NamedToolChoice, functions: tuple[Function, ...]) -> Function:
    # TGI: a bare string that is no keyword names a function
    name = choice if isinstance(choice, str) else choice.function.name
    for function in functions:
        if function.name == name:
            return function
    raise ValidationFailed(f"`tool_choice` names the function {name!r}, which is not in `tools`", param="tool_choice")


# ---------------------------------------------------------------------------- the reply


def tool_calls_of(calls: list[ToolCallText]) -> list[ToolCall]:
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def constrain(state: Any, valid: ValidRequest, plan: ToolPlan) -> ValidRequest:
    """``valid`` with the plan's constraint on its reply, compile-checked (422 naming what the
    grammar backend cannot do). With ``--disable-grammar-support`` the reply is not constrained
    and is read as calls when it is one."""
    if state.limits.disable_grammar_support:
        return valid
    kind, value = plan.constraint()
    constraint = Constraint(kind=kind, value=value)
    try:
        check_constraint(constraint, state.tokenizer, eos_token_ids=state.validator.eos_token_ids, host=state.host)
    except RequestValidationError as exc:
        raise ValidationFailed(f"the tools' parameters cannot be used: {exc}", param="tools") from exc
    return replace(valid, params=replace(valid.params, constraint=constraint))
