"""One TGI ``/generate_stream`` read to its end by an asyncio client (reliability tests, the soak benchmark)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamResult:
    status: int
    token_ids: list[int] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # each token event's ``index`` (1, 2, 3 ... when none is lost)
    generated_text: str | None = None  # set by the final event
    error: dict | None = None  # an error event (or the error body of a non-200 answer)
    events: int = 0


async def read_stream(client: httpx.AsyncClient, body: dict, *, on_token=None) -> StreamResult:
    """POST ``/generate_stream`` and read every event; ``on_token(result)`` after each token event."""
    async with client.stream("POST", "/generate_stream", json=body) as response:
        if response.status_code != 200:
            return StreamResult(response.status_code, error=json.loads(await response.aread()))
        result = StreamResult(200)
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            result.events += 1
            if "error" in event:
                result.error = event
                continue
            result.token_ids.append(event["token"]["id"])
            result.indexes.append(event["index"])
            if event.get("generated_text") is not None:
                result.generated_text = event["generated_text"]
            if on_token is not None:
                await on_token(result)
        return result


async def open_streams(client: httpx.AsyncClient, bodies: list[dict]) -> list[asyncio.Task]:
    """Start one stream per body; return their tasks once each has had its first token (all in flight)."""
    started, seen = asyncio.Event(), set()

    async def on_token(result: StreamResult) -> None:
        seen.add(id(result))
        if len(seen) == len(bodies):
            started.set()

    tasks = [asyncio.create_task(read_stream(client, body, on_token=on_token)) for body in bodies]
    await started.wait()
    return tasks
