"""Fixtures for server tests: a tiny llama with a trained tokenizer and a chat template, served
by the real engine over a real socket (uvicorn on 127.0.0.1, port 0, in a thread).

- ``tiny_llama``: ``(path, hf_model, tokenizer)``, built once per session.
- ``start_server(**settings)``: a running :class:`ServerThread` for a ``LaunchConfig`` with those
  settings (cached per settings for the session); ``.url``, ``.state`` (the ServerState).
- ``server``: the default one.
- ``hf_reference(prompt_ids, max_new_tokens)``: transformers' greedy continuation (token ids,
  stopping at EOS as the server does) and its text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lmport.server.serve import ServerThread
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.http_checks import start_server_thread
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[Path, Any, Any]:
    path = tmp_path_factory.mktemp("tiny-llama-chat")
    hf_model = make_checkpoint("llama", path)
    tokenizer = train_tiny_tokenizer(chat=True)
    tokenizer.save_pretrained(path)
    return path, hf_model, tokenizer


@pytest.fixture(scope="session")
def start_server(tiny_llama) -> Callable[..., ServerThread]:
    running: dict[tuple, ServerThread] = {}

    def start(**settings: Any) -> ServerThread:
        key = tuple(sorted(settings.items()))
        if key not in running:
            settings.setdefault("max_batch_total_tokens", 16384)
            settings.setdefault("max_total_tokens", 512)
            running[key] = start_server_thread(tiny_llama[0], "tiny-llama", **settings)
        return running[key]

    torch.set_num_threads(1)  # tiny models on a shared 2-core box
    yield start
    for thread in running.values():
        thread.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerThread:
    return start_server()


@pytest.fixture(scope="session")
def hf_reference(tiny_llama) -> Callable[[list[int], int], tuple[list[int], str]]:
    _, hf_model, tokenizer = tiny_llama

    def reference(prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        tokens, _ = hf_greedy_generate(hf_model, prompt_ids, max_new_tokens, stop_at_eos=True)
        return tokens, tokenizer.decode(tokens, skip_special_tokens=True)

    return reference
