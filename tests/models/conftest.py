"""Shared fixtures for native-model tests: tiny checkpoints, native loading, the HF oracle.

Tests run with ``--import-mode=importlib``, so helpers reach test modules as fixtures:

- ``cpu_host``: a :class:`PluginHost` with the CPU backend selected (entry points not loaded,
  so an installed third-party backend never changes what these tests run on).
- ``tiny_checkpoint(name, config=None)``: ``(path, hf_model)`` of a tiny random checkpoint from
  ``lmport.testing.tiny_models``, built once per session and cached by ``name`` (so a custom
  ``config`` needs a name of its own, e.g. ``"gpt_neox-serial"``).
- ``load_native(path, host=None, dtype=float32)``: the native model built through the registry
  and hooks (``host`` defaults to ``cpu_host``).
- ``assert_matches_hf(hf_model, model, prompts, max_new_tokens, ...)``: greedy tokens equal
  ``transformers`` ``generate`` token for token (one batch over the paged cache, HF per prompt
  unpadded) and last-prompt-token logits within ``atol``.
- ``native_last_logits(model, prompts)``: float32 logits at each prompt's last token, all prompts
  prefilled as one flat batch over the paged cache.
- ``random_prompts(lengths, seed=0)``: token-id prompts of the given lengths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lmport.models.base import CausalLM
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing import cached_logits
from lmport.testing.model_driver import greedy_generate
from lmport.testing.tiny_models import VOCAB, make_checkpoint


def make_cpu_host() -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    selection = host.select_backend()
    assert selection.backend.name == "cpu"
    return host


def load_native(path: str | Path, host: PluginHost, dtype: torch.dtype = torch.float32) -> CausalLM:
    """Build the native model of the checkpoint at ``path``; fail if no family claims it."""
    info = resolve_model_info(path)
    model = build_native_model(info, host, dtype=dtype, device=torch.device("cpu"))
    assert model is not None, f"no native model registered for {info.architecture}"
    return model


def make_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # skip the special ids 0..2 so prompts look like text
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(hf_model: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF ``generate`` greedy tokens (no EOS stop) and the logits of the last prompt token."""
    tokens, logits = hf_greedy_generate(hf_model, prompt, max_new_tokens)
    return tokens, logits[0]


def native_prefill_logits(model: CausalLM, prompts: list[list[int]], host: PluginHost, block_size: int = 4) -> torch.Tensor:
    """Logits of every prompt's last token from one flat prefill batch over the paged cache."""
    logits = cached_logits.native_last_logits(model, prompts, host, block_size)
    assert logits.dtype == torch.float32
    return logits


def check_matches_hf(
    hf_model: Any,
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    host: PluginHost,
    *,
    block_size: int = 4,
    prefill_chunks: tuple[int | None, ...] = (None, 3),
    atol: float = 1e-4,
) -> list[list[int]]:
    """Assert the native model reproduces HF greedy generation and last-prompt logits; return HF's tokens."""
    expected, hf_logits = zip(*(hf_greedy(hf_model, p, max_new_tokens) for p in prompts))
    expected = [list(t) for t in expected]
    for chunk in prefill_chunks:
        got = greedy_generate(model, prompts, max_new_tokens, host=host, block_size=block_size, prefill_chunk=chunk)
        if got != expected:
            raise AssertionError(_describe_mismatch(hf_model, prompts, expected, got, chunk))
    logits = native_prefill_logits(model, prompts, host, block_size)
    torch.testing.assert_close(logits, torch.stack(hf_logits), atol=atol, rtol=0)
    return expected


@torch.inference_mode()
def _describe_mismatch(hf_model, prompts, expected, got, chunk) -> str:
    """Where tokens first differ, and HF's top-2 logit margin there (a ~1e-6 margin is a near-tie, not a bug)."""
    lines = [f"greedy tokens differ from transformers (prefill_chunk={chunk}):"]
    for prompt, want, have in zip(prompts, expected, got):
        if want == have:
            continue
        step = next(i for i, (a, b) in enumerate(zip(want, have)) if a != b)
        logits = hf_model(torch.tensor([prompt + want[:step]])).logits[0, -1]
        top2 = logits.topk(2).values
        lines.append(
            f"  prompt of {len(prompt)} tokens, step {step}: HF {want} vs native {have}; "
            f"HF top-2 margin {float(top2[0] - top2[1]):.2e}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="session")
def cpu_host() -> PluginHost:
    return make_cpu_host()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., tuple[Path, Any]]:
    built: dict[str, tuple[Path, Any]] = {}

    def build(name: str, config: Any = None, **kwargs: Any) -> tuple[Path, Any]:
        key = name
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            hf_model = make_checkpoint(name, path, config=config, **kwargs)
            built[key] = (path, hf_model)
        return built[key]

    return build


@pytest.fixture(name="load_native")
def load_native_fixture(cpu_host) -> Callable[..., CausalLM]:
    """``load_native(path, host=None, dtype=float32)``; ``host`` defaults to ``cpu_host``."""
    return lambda path, host=None, dtype=torch.float32: load_native(path, host or cpu_host, dtype)


@pytest.fixture
def native_last_logits(cpu_host) -> Callable[..., torch.Tensor]:
    """``native_last_logits(model, prompts, block_size=4)``: last-token logits of one flat prefill."""
    return lambda model, prompts, block_size=4: native_prefill_logits(model, prompts, cpu_host, block_size)


@pytest.fixture
def random_prompts() -> Callable[..., list[list[int]]]:
    return make_prompts


@pytest.fixture
def assert_matches_hf(cpu_host) -> Callable[..., list[list[int]]]:
    def check(hf_model, model, prompts, max_new_tokens, **kwargs):
        return check_matches_hf(hf_model, model, prompts, max_new_tokens, cpu_host, **kwargs)

    return check
