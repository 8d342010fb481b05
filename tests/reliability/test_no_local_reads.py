"""No request field makes the server read a local file or fetch a URL (unless a flag allows
it): every field that could name one is given a sentinel file's path and a loopback URL, and a
Python audit hook (``open``, ``socket.connect``) sees whether the server touched either."""

from __future__ import annotations

import asyncio
import socket
import sys

import httpx
import pytest

from lmport.server.errors import ValidationFailed
from lmport.server.images import ImagePolicy, load_image

_watch: dict[str, object] = {"active": False, "path": None, "port": None, "seen": []}


def _audit(event: str, args: tuple) -> None:
    if not _watch["active"]:
        return
    if event == "open" and args and isinstance(args[0], (str, bytes)) and str(_watch["path"]) in str(args[0]):
        _watch["seen"].append((event, args[0]))
    elif event == "socket.connect" and len(args) > 1 and isinstance(args[1], tuple) and args[1][1:2] == (_watch["port"],):
        _watch["seen"].append((event, args[1]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; _watch["active"] gates this one


@pytest.fixture
def watched(tmp_path):
    secret = tmp_path / "secret-weights.txt"
    secret.write_text("do not read me")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    _watch.update(active=True, path=secret, port=listener.getsockname()[1], seen=[])
    secret.read_text()  # the hook's own check: it sees a read and a connection
    socket.create_connection(listener.getsockname()).close()
    assert [event for event, _ in _watch["seen"]] == ["open", "socket.connect"]
    _watch["seen"] = []
    try:
        yield secret, f"http://127.0.0.1:{listener.getsockname()[1]}/image.png"
    finally:
        _watch["active"] = False
        listener.close()


@pytest.fixture(scope="module")
def text_server(serve_module):
    return serve_module(max_total_tokens=128, max_batch_total_tokens=2048)


def bodies(path: str, url: str) -> list[tuple[str, dict]]:
    refs = [path, f"file://{path}", url]
    out: list[tuple[str, dict]] = []
    for ref in refs:
        out += [
            ("/generate", {"inputs": f"![]({ref}) hi", "parameters": {"max_new_tokens": 2, "adapter_id": ref}}),
            ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "grammar": {"type": "json", "value": {"$ref": ref}}}}),
            ("/tokenize", {"inputs": ref}),
            ("/v1/chat/completions", {"model": ref, "max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": "hi"}]}]}),
            ("/v1/chat/completions", {"model": ref, "max_tokens": 2, "messages": [{"role": "user", "content": f"![]({ref})"}],
                                      "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": ref}}},
                                      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": ref}}}]}),
            ("/v1/completions", {"model": ref, "prompt": ref, "max_tokens": 2, "suffix": ref}),
            ("/chat_tokenize", {"messages": [{"role": "user", "content": ref}], "chat_template": ref, "tokenizer": ref}),
        ]
    return out


def test_no_field_reads_a_file_or_fetches_a_url(text_server, watched):
    secret, url = watched
    with httpx.Client(base_url=text_server.url, timeout=60) as client:
        for path, body in bodies(str(secret), url):
            response = client.post(path, json=body)
            assert response.status_code < 500, (path, response.text)
    assert _watch["seen"] == []


def test_image_loading_refuses_paths_and_urls_without_the_flag(watched):
    secret, url = watched
    for ref in (str(secret), f"file://{secret}", url):
        with pytest.raises(ValidationFailed, match="not fetched by this server"):
            asyncio.run(load_image(ref, ImagePolicy()))
    with pytest.raises(ValidationFailed):  # even with remote images allowed, a path is no URL to fetch
        asyncio.run(load_image(str(secret), ImagePolicy(allow_remote=True)))
    assert _watch["seen"] == []
