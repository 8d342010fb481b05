"""Every native family on a CUDA GPU, through the whole engine, against transformers.

- fp32: the engine's greedy tokens equal transformers' ``generate`` (fp32, on the CPU) token
  for token — with the CUDA backend's Triton attention, fused layer ops and decode graphs, and
  again with ``--disable-custom-kernels`` (the core's reference attention on the GPU). Prompts
  of different lengths run concurrently; 4-token blocks and a 12-token prefill budget make
  sequences span many blocks and prompts prefill in chunks mixed with decodes.
- bf16: the native model's last-prompt-token logits on the GPU stay close to transformers'
  bf16 logits on the GPU.
- Graph replay vs eager: the fp32 run with graphs and the one with ``cuda_graphs=()`` give
  identical tokens.

Needs a CUDA GPU (skipped otherwise); the families come from the registry, so a new family is
covered as soon as it is registered.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lmport.models.loader import build_native_model, model_registry, resolve_model_info
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy as run_engine_greedy
from lmport.testing.cached_logits import native_last_logits
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tiny_models import TINY_MODELS, VOCAB, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_NEW = 8
PROMPT_LENGTHS = (5, 17, 9, 1)


def _registered() -> list[str]:
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend("cpu")
    archs = set(model_registry(host).architectures())
    return [n for n, make in TINY_MODELS.items() if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(make().model_type) in archs]


def cuda_host(custom_kernels: bool = True) -> PluginHost:
    host = PluginHost(environ={})
    assert host.select_backend("cuda").backend.name == "cuda"
    host.set_custom_kernels(custom_kernels)
    return host


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    built: dict = {}
    tokenizer = train_tiny_tokenizer()

    def get(name: str):
        if name not in built:
            path = tmp_path_factory.mktemp(f"cuda-{name}")
            hf_model = make_checkpoint(name, path)
            tokenizer.save_pretrained(path)
            built[name] = (path, hf_model)
        return built[name]

    return get


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def engine_greedy(path, host: PluginHost, **settings) -> list[list[int]]:
    return run_engine_greedy(path, host, prompts(), MAX_NEW, **settings)


@pytest.mark.parametrize("name", _registered())
def test_fp32_greedy_equals_transformers(checkpoint, name):
    path, hf_model = checkpoint(name)
    expected = [hf_greedy_generate(hf_model, p, MAX_NEW)[0] for p in prompts()]
    with_graphs = engine_greedy(path, cuda_host(), cuda_graphs=(1, 2, 4))  # decode batches here hold <= 4
    assert with_graphs == expected, f"{name}: CUDA kernels + graphs"
    eager = engine_greedy(path, cuda_host(), cuda_graphs=())
    assert eager == with_graphs, f"{name}: graph replay differs from eager"
    reference = engine_greedy(path, cuda_host(custom_kernels=False))
    assert reference == expected, f"{name}: --disable-custom-kernels (reference attention on the GPU)"


@pytest.mark.parametrize("name", _registered())
def test_bf16_logits_close_to_transformers(checkpoint, name):
    path, _ = checkpoint(name)
    host = cuda_host()
    model = build_native_model(resolve_model_info(path), host, torch.bfloat16, torch.device("cuda"))
    ours = native_last_logits(model, prompts(), host, block_size=16).float()
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda").eval()
    with torch.inference_mode():
        theirs = torch.stack([hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts()])
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 0.05 * scale, f"{name}: bf16 logits drift"
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() > 0.999, f"{name}: bf16 logits direction, cosine {cosine.tolist()}"
