"""Chat messages -> prompt text, through the tokenizer's own chat template.

The template comes from the checkpoint (``tokenizer_config.json``'s ``chat_template`` or
``chat_template.jinja``, which transformers loads into ``tokenizer.chat_template``); the
server only passes a fallback template for checkpoints that carry none (GGUF files).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from lmport.server.errors import TemplateFailed, ValidationFailed
from lmport.server.schemas_openai import ChatMessage

if TYPE_CHECKING:
    from lmport.server.tools import ToolPlan


def message_dicts(messages: list[ChatMessage], images: bool = False) -> list[dict[str, Any]]:
    """Plain dicts for the template; text parts are joined, other modalities refused (422).

    With ``images`` (a model that takes them) an ``image_url`` part becomes TGI's markdown
    image ``![](url)`` in the text, as TGI does, so the prompt's images are read back from the
    rendered text in order (:mod:`lmport.server.images`) whatever the template does with text."""
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type == "image_url" and images:
                    texts.append(f"![]({image_part_url(part)})")
                    continue
                if part.type != "text":
                    modality = part.type.removesuffix("_url")
                    raise ValidationFailed(f"{modality} modality is not supported")
                texts.append(part.text or "")
            content = "".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content if content is not None else ""}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def template_tool_call(call: Any) -> Any:
    """An assistant turn's call as templates read it: OpenAI's object with its ``arguments``
    JSON text parsed into a dict (transformers' templates ``tojson`` them), as vLLM passes them."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return call
        return {**call, "function": {**call["function"], "arguments": parsed}}
    return call


@lru_cache(maxsize=8)
def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads the ``tools`` variable (TGI's test, on the template's variables)."""
    from jinja2 import Environment, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except Exception:  # a template jinja cannot parse without transformers' extensions: look for the name
        return "tools" in template


def image_part_url(part: Any) -> str:
    """An OpenAI ``image_url`` part's URL: ``{"url": ...}`` (or a bare string, as some clients send)."""
    value = getattr(part, "image_url", None)
    url = value.get("url") if isinstance(value, dict) else getattr(value, "url", value)
    if not isinstance(url, str) or not url:
        raise ValidationFailed("an `image_url` content part needs `image_url.url`")
    if ")" in url:  # it would end the markdown early; no data URI or sane URL holds one unescaped
        url = url.replace(")", "%29")
    return url


def render_chat(
    tokenizer: Any, messages: list[ChatMessage], fallback_template: str | None = None, images: bool = False,
    tools: ToolPlan | None = None,
) -> str:
    """The prompt text for ``messages`` with the generation prompt appended.

    With ``tools``, a template that reads ``tools`` receives them, and the last message gets the
    tool prompt appended (after the tools' JSON when the template does not show them), as TGI does."""
    template = getattr(tokenizer, "chat_template", None) or fallback_template
    if not template:
        raise TemplateFailed(
            "this model has no chat template (tokenizer_config.json has no `chat_template` and there is no "
            "chat_template.jinja); use /generate or /v1/completions with a raw prompt"
        )
    dicts = message_dicts(messages, images)
    extra: dict[str, Any] = {}
    if tools is not None:
        takes_tools = template_takes_tools(template)
        if takes_tools:
            extra["tools"] = tools.tools_json()
        dicts[-1] = {**dicts[-1], "content": (dicts[-1]["content"] or "") + tools.prompt_suffix(takes_tools)}
    try:
        return tokenizer.apply_chat_template(dicts, chat_template=template, tokenize=False, add_generation_prompt=True, **extra)
    except ValidationFailed:
        raise
    except Exception as exc:  # jinja's TemplateError, raise_exception(...) in the template
        raise TemplateFailed(f"chat template error: {exc}") from exc
