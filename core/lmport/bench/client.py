"""One streamed ``/v1/completions`` request and the timings the metrics are built from."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from lmport.bench.dataset import BenchRequest


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0  # from the usage chunk, else one per streamed chunk
    ttft: float = 0.0  # seconds from sending to the first chunk with a choice
    itl: list[float] = field(default_factory=list)  # gaps between successive chunks
    latency: float = 0.0  # seconds from sending to the end of the stream
    error: str = ""
    start: float = 0.0  # perf_counter at sending (for timelines)


def completion_payload(request: BenchRequest, model: str | None) -> dict:
    """vLLM's ``bench serve`` payload for the OpenAI completions API."""
    payload = {
        "prompt": request.prompt_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,  # vLLM's extension: every request generates exactly max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        payload["model"] = model
    return payload


async def stream_completion(client: httpx.AsyncClient, url: str, request: BenchRequest, model: str | None = None) -> RequestResult:
    """Send one request and time its server-sent events; failures are results, not exceptions."""
    result = RequestResult(prompt_len=len(request.prompt_ids))
    chunks = 0
    usage_tokens: int | None = None
    start = result.start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=completion_payload(request, model)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:300]
                    return result
                now = time.perf_counter()
                if event.get("choices"):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.success = chunks > 0
    if not result.success:
        result.error = "the stream ended without a token"
    return result
