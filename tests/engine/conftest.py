"""Fixtures for engine tests: tiny checkpoints with a real (trained) tokenizer, the HF oracle.

- ``cpu_host``: a PluginHost with the CPU backend selected (no entry points loaded).
- ``tiny_model_dir(name)``: ``(path, hf_model)`` of a tiny random checkpoint of ``name``
  (from ``lmport.testing.tiny_models``) with the byte-level BPE of ``lmport.testing.tiny_tokenizer``
  saved next to it; built once per session.
- ``make_engine(name, **config)``: a synchronous LLMEngine through ``build_llm_engine``.
- ``hf_greedy(hf_model, prompt, max_new_tokens)``: transformers ``generate`` tokens (no EOS stop)
  and the log-softmax of each step's logits.
- ``random_prompts(lengths, seed)``: token-id prompts (ids 3.. so no special token appears).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tiny_models import VOCAB, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


def make_cpu_host() -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    assert host.select_backend().backend.name == "cpu"
    return host


@pytest.fixture
def cpu_host() -> PluginHost:
    return make_cpu_host()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    built: dict[str, tuple[Path, Any]] = {}
    tokenizer = train_tiny_tokenizer()

    def get(name: str) -> tuple[Path, Any]:
        if name not in built:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            hf_model = make_checkpoint(name, path)
            tokenizer.save_pretrained(path)
            built[name] = (path, hf_model)
        return built[name]

    return get


@pytest.fixture
def make_engine(tiny_model_dir):
    def make(name: str = "llama", **settings: Any):
        path, hf_model = tiny_model_dir(name)
        settings.setdefault("block_size", 4)
        settings.setdefault("max_batch_total_tokens", 2048)
        config = LaunchConfig(model_id=str(path), **settings)
        engine, tokenizer, info = build_llm_engine(config, make_cpu_host())
        return engine, hf_model

    return make


@pytest.fixture(name="random_prompts")
def random_prompts_fixture():
    return random_prompts


@pytest.fixture(name="hf_greedy")
def hf_greedy_fixture():
    return hf_greedy


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(hf_model: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens from transformers ``generate`` (EOS ignored) and each step's log-softmax."""
    tokens, logits = hf_greedy_generate(hf_model, prompt, max_new_tokens)
    return tokens, [torch.log_softmax(step, dim=-1) for step in logits]
