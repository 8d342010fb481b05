"""Images in prompts: TGI's markdown form, loading (data URIs; URLs where allowed), decoding.

TGI takes images inside ``inputs`` as markdown, ``![](data:image/png;base64,...)`` or
``![](https://...)``; an OpenAI chat ``image_url`` part becomes the same markdown before the
chat template runs (:func:`lmport.server.chat.message_dicts`), so both routes share this path.
For a model that takes images, each markdown image is loaded, decoded and replaced by the
processor's placeholder (``<image>``), and the model's processor builds the prompt
(:class:`lmport.models.image_prompts.ImagePrompts`). For a text-only model the markdown stays
text, as TGI does.

Limits (each breach is a 422 that says which): at most ``--max-images-per-request`` images
(the engine's rule, checked here before any fetch), at most ``max_bytes`` per image (encoded)
and ``max_pixels`` (decoded). URLs are fetched only with
``--allow-remote-images``: over http(s) only, redirects followed by hand (at most
``MAX_REDIRECTS``) and only to http(s), within ``fetch_timeout`` seconds, the body read up to
the byte cap and no further. Fetching lets clients make the server open connections to any
address it can reach, so it stays off unless the operator turns it on.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from lmport.models.image_prompts import ImagePromptError, PromptImage
from lmport.server.errors import ValidationFailed

MARKDOWN_IMAGE = re.compile(r"!\[\]\(([^)]*)\)")  # TGI's pattern: an empty alt text, the URL up to ")"
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImagePolicy:
    """How the server reads images (``--allow-remote-images``, ``--max-image-bytes``); the count per
    request is an engine rule (``EngineLimits.max_images_per_request``)."""

    allow_remote: bool = False
    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    fetch_timeout: float = 10.0


def markdown_image(url: str) -> str:
    return f"![]({url})"


def image_digest(image: Any) -> bytes:
    """A digest of the decoded pixels and the size: the same picture in PNG or JPEG-lossless
    shares a prefix; two different pictures never do."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


def decode_image(data: bytes, policy: ImagePolicy) -> Any:
    """Encoded bytes -> an RGB PIL image; 422 for anything PIL cannot decode or that is too large."""
    from PIL import Image

    if len(data) > policy.max_bytes:
        raise ValidationFailed(f"image is {len(data)} bytes, more than the limit of {policy.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > policy.max_pixels:
                raise ValidationFailed(
                    f"image is {image.width}x{image.height} pixels, more than the limit of {policy.max_pixels} pixels"
                )
            image.load()  # decode now: a truncated or corrupt file fails here, not in the engine
    except ValidationFailed:
        raise
    except Exception as exc:  # UnidentifiedImageError, OSError, DecompressionBomb*, ValueError ...
        raise ValidationFailed(f"image could not be decoded: {type(exc).__name__}: {exc}") from exc
    return image.convert("RGB")


def decode_data_uri(uri: str, policy: ImagePolicy) -> bytes:
    """``data:image/...;base64,<data>`` -> bytes (the size is checked before decoding)."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:"):
        raise ValidationFailed("image data URI is malformed (expected data:image/<type>;base64,<data>)")
    media = header[len("data:"):].split(";")
    if not media[0].startswith("image/") or "base64" not in media[1:]:
        raise ValidationFailed(f"image data URI must be base64-encoded image/* data, got `{header}`")
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise ValidationFailed(f"image is larger than the limit of {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationFailed(f"image data URI has invalid base64: {exc}") from exc


def _check_http(url: str) -> None:
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValidationFailed(f"image URL `{url[:100]}` is not http(s) or a data URI")


async def fetch_image(url: str, policy: ImagePolicy) -> bytes:
    """GET ``url`` with the policy's timeout, byte cap and redirect rules (see the module doc)."""
    import httpx

    _check_http(url)
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=policy.fetch_timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        _check_http(url)
                        continue
                    if response.status_code != 200:
                        raise ValidationFailed(f"image URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise ValidationFailed(f"image is {declared} bytes, more than the limit of {policy.max_bytes}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > policy.max_bytes:
                            raise ValidationFailed(f"image is larger than the limit of {policy.max_bytes} bytes")
                    return bytes(body)
    except httpx.HTTPError as exc:  # connection refused, timeout, invalid URL ...
        raise ValidationFailed(f"image URL could not be fetched: {type(exc).__name__}: {exc}") from exc
    raise ValidationFailed(f"image URL redirected more than {MAX_REDIRECTS} times")


async def load_image(url: str, policy: ImagePolicy) -> PromptImage:
    url = url.strip()
    if url.startswith("data:"):
        data = decode_data_uri(url, policy)
    elif not policy.allow_remote:
        raise ValidationFailed(
            "image URLs are not fetched by this server (start it with --allow-remote-images); send the image as a "
            "data URI (data:image/png;base64,...)"
        )
    else:
        data = await fetch_image(url, policy)
    image = decode_image(data, policy)
    return PromptImage(image, image_digest(image))


async def validate_with_images(state: Any, params: Any, *, inputs: str, add_special_tokens: bool = True, **kwargs: Any) -> Any:
    """``state.validator.validate(params, inputs=...)`` for a prompt that may hold markdown images.

    For a model that takes images, the images are loaded and the processor builds the prompt
    ids; the :class:`~lmport.server.validation.ValidRequest` carries them as ``images``. For a
    text-only model the text is validated as it is.
    """
    prompts = getattr(state, "image_prompts", None)
    if prompts is None:
        return await state.off_loop(state.validator.validate, params, inputs=inputs, add_special_tokens=add_special_tokens, **kwargs)
    urls = MARKDOWN_IMAGE.findall(inputs or "")
    if not urls and prompts.placeholder not in (inputs or ""):  # a text-only prompt: the usual path
        return await state.off_loop(state.validator.validate, params, inputs=inputs, add_special_tokens=add_special_tokens, **kwargs)
    policy: ImagePolicy = state.image_policy
    most = state.limits.max_images_per_request  # the engine's rule, checked here before anything is fetched
    if len(urls) > most:
        raise ValidationFailed(f"a request may hold at most {most} images. Given: {len(urls)}")
    images = [await load_image(url, policy) for url in urls]
    text = MARKDOWN_IMAGE.sub(lambda _: prompts.placeholder, inputs or "")
    if not text:
        raise ValidationFailed("`inputs` cannot be empty")
    try:
        ids, image_inputs = await state.off_loop(prompts.build, text, images, add_special_tokens)
    except ImagePromptError as exc:
        raise ValidationFailed(str(exc)) from exc
    valid = await state.off_loop(state.validator.validate, params, prompt_ids=ids, **kwargs)
    if image_inputs is None:
        return valid
    cut = len(ids) - len(valid.prompt_ids)  # `truncate` keeps the prompt's end
    if cut:
        if image_inputs.spans[0][0] < cut:
            raise ValidationFailed("`truncate` would cut into the prompt's images; raise it or drop the truncation")
        image_inputs = prompts.cut_front(image_inputs, cut)
    return dataclasses.replace(valid, images=image_inputs)
