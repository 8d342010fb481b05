"""Speculative decoding on CUDA: fp32 greedy through the whole engine equals the plain engine's and
transformers', with n-gram lookup and with draft models (the draft's one-token forwards replay its
decode graphs; verify steps run eager), and with the reference kernels. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tiny_models import VOCAB, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_NEW = 12


def cuda_host(custom_kernels: bool = True) -> PluginHost:
    host = PluginHost(environ={})
    assert host.select_backend("cuda").backend.name == "cuda"
    host.set_custom_kernels(custom_kernels)
    return host


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    target = tmp_path_factory.mktemp("spec-cuda-target")
    hf_model = make_checkpoint("llama", target)
    train_tiny_tokenizer().save_pretrained(target)
    draft = tmp_path_factory.mktemp("spec-cuda-draft")
    make_checkpoint("llama", draft, seed=1)
    return target, draft, hf_model


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    randoms = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 9, 1)]
    return randoms + [[5, 6, 7, 8] * 5]


@pytest.mark.parametrize("case", ["ngram", "same-draft", "other-draft"])
@pytest.mark.parametrize("custom_kernels", [True, False])
def test_speculative_greedy_equals_plain_and_transformers(checkpoints, case, custom_kernels):
    target, draft, hf_model = checkpoints
    settings = {"ngram": dict(speculate=3), "same-draft": dict(speculative_model=str(target), speculate=4),
                "other-draft": dict(speculative_model=str(draft), speculate=2)}[case]  # fmt: skip
    expected = [hf_greedy_generate(hf_model, p, MAX_NEW)[0] for p in prompts()]
    plain = engine_greedy(target, cuda_host(custom_kernels), prompts(), MAX_NEW, cuda_graphs=(1, 2, 4, 8))
    assert plain == expected
    got = engine_greedy(target, cuda_host(custom_kernels), prompts(), MAX_NEW, cuda_graphs=(1, 2, 4, 8), **settings)
    assert got == expected, case
