"""Chat messages -> prompt text, through the tokenizer's own chat template.

The template comes from the checkpoint (``tokenizer_config.json``'s ``chat_template`` or
``chat_template.jinja``, which transformers loads into ``tokenizer.chat_template``); the
server only passes a fallback template for checkpoints that carry none (GGUF files).
"""

from __future__ import annotations

from typing import Any

from lmport.server.errors import TemplateFailed, ValidationFailed
from lmport.server.schemas_openai import ChatMessage


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
            entry["tool_calls"] = message.tool_calls
        out.append(entry)
    return out


def image_part_url(part: Any) -> str:
    """An OpenAI ``image_url`` part's URL: ``{"url": ...}`` (or a bare string, as some clients send)."""
    value = getattr(part, "image_url", None)
    url = value.get("url") if isinstance(value, dict) else getattr(value, "url", value)
    if not isinstance(url, str) or not url:
        raise ValidationFailed("an `image_url` content part needs `image_url.url`")
    if ")" in url:  # it would end the markdown early; no data URI or sane URL holds one unescaped
        url = url.replace(")", "%29")
    return url


def render_chat(tokenizer: Any, messages: list[ChatMessage], fallback_template: str | None = None, images: bool = False) -> str:
    """The prompt text for ``messages`` with the generation prompt appended."""
    template = getattr(tokenizer, "chat_template", None) or fallback_template
    if not template:
        raise TemplateFailed(
            "this model has no chat template (tokenizer_config.json has no `chat_template` and there is no "
            "chat_template.jinja); use /generate or /v1/completions with a raw prompt"
        )
    try:
        return tokenizer.apply_chat_template(
            message_dicts(messages, images), chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except ValidationFailed:
        raise
    except Exception as exc:  # jinja's TemplateError, raise_exception(...) in the template
        raise TemplateFailed(f"chat template error: {exc}") from exc
