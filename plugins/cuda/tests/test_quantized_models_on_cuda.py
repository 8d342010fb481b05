"""Quantized checkpoints on a CUDA GPU, through the whole engine, against transformers holding the dequantized weights.

Each format's checkpoint comes from :mod:`lmport.testing.quantize_checkpoint` (its real on-disk
layout), so this runs the core's loading and repacking plus ``lmport_cuda``'s ``linear_wq`` /
``linear_fp8`` kernels, with decode graphs:

- int formats (GPTQ act-order, AWQ, compressed-tensors W4A16, EETQ at load), fp32: greedy tokens
  equal transformers' (fp32, CPU) token for token, with the kernels + graphs and with
  ``--disable-custom-kernels`` (the core's reference kernels on the GPU);
- fp8 formats (FBGEMM per channel, compressed-tensors FP8, ``--quantize fp8`` at load), bf16: the
  last-prompt-token logits stay close to transformers' fp32 logits (fp8 batches may quantize
  activations per token, so tokens are not required to match).

Needs a CUDA GPU (skipped otherwise).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.factory import check_quantization
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy as run_engine_greedy
from lmport.testing.cached_logits import native_last_logits
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.quantize_checkpoint import input_square_sums, quantize_checkpoint
from lmport.testing.tiny_models import COMMON, VOCAB, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_NEW = 8
PROMPT_LENGTHS = (5, 17, 9, 1)
INT_FORMATS = {
    "gptq-4b-g32-actorder": ("gptq", None, dict(bits=4, group_size=32, sym=False, act_order=True, checkpoint_format="gptq_v2")),
    "gptq-8b-g128": ("gptq", None, dict(bits=8, group_size=128, sym=True)),
    "awq-g64": ("awq", None, dict(group_size=64)),
    "ct-w4a16-g32": ("pack-quantized", None, dict(bits=4, group_size=32, sym=True)),
    "eetq-at-load": (None, "eetq", {}),
}
FP8_FORMATS = {
    "fbgemm-fp8": ("fbgemm_fp8", None, {}),
    "ct-fp8": ("float-quantized", None, {}),
    "fp8-at-load": (None, "fp8", {}),
}


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def cuda_host(custom_kernels: bool = True) -> PluginHost:
    host = PluginHost(environ={})
    assert host.select_backend("cuda").backend.name == "cuda"
    host.set_custom_kernels(custom_kernels)
    return host


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(label)`` -> ``(path, --quantize value, oracle)`` for a tiny Llama whose projections split into 128-groups."""
    from transformers import LlamaConfig

    src = tmp_path_factory.mktemp("cuda-quant-src")
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, **COMMON)  # fmt: skip
    hf_model = make_checkpoint("llama", src, config=config)
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(src)
    built: dict = {}

    def get(label: str):
        if label not in built:
            fmt, forced, opts = {**INT_FORMATS, **FP8_FORMATS}[label]
            if fmt in ("pack-quantized", "float-quantized"):
                pytest.importorskip("compressed_tensors")
            if fmt is None:  # quantized at load from the unquantized checkpoint
                built[label] = (src, forced, None)
            else:
                diags = None
                if opts.get("act_order"):
                    diags = input_square_sums(hf_model, torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)))
                dst = tmp_path_factory.mktemp(f"cuda-{label}")
                dequantized = quantize_checkpoint(src, dst, fmt, hessian_diags=diags, **opts)
                oracle = copy.deepcopy(hf_model)
                oracle.load_state_dict(dequantized, strict=False)
                built[label] = (dst, None, oracle.eval())
        return built[label]

    return get, hf_model


def at_load_oracle(hf_model, fmt: str):
    """transformers with the weights rounded as ``--quantize fmt`` rounds them (per-row absmax)."""
    oracle = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, module in oracle.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight.float()
                if fmt == "eetq":
                    scale = w.abs().amax(dim=1, keepdim=True) / 127
                    module.weight.copy_(torch.round(w / scale) * scale)
                else:
                    scale = w.abs().amax(dim=1, keepdim=True) / 448
                    module.weight.copy_((w / scale).to(torch.float8_e4m3fn).float() * scale)
    return oracle.eval()


def engine_greedy(path, host: PluginHost, **settings) -> list[list[int]]:
    return run_engine_greedy(path, host, prompts(), MAX_NEW, **settings)


@pytest.mark.parametrize("label", list(INT_FORMATS))
def test_int_formats_fp32_greedy_equals_transformers(checkpoint, label):
    get, hf_model = checkpoint
    path, forced, oracle = get(label)
    oracle = oracle or at_load_oracle(hf_model, forced)
    expected = [hf_greedy_generate(oracle, p, MAX_NEW)[0] for p in prompts()]
    assert engine_greedy(path, cuda_host(), quantize=forced, cuda_graphs=(1, 2, 4)) == expected, f"{label}: kernels + graphs"
    assert engine_greedy(path, cuda_host(custom_kernels=False), quantize=forced) == expected, f"{label}: reference kernels"


@pytest.mark.parametrize("label", list(FP8_FORMATS))
def test_fp8_formats_bf16_logits_close_to_transformers(checkpoint, label):
    get, hf_model = checkpoint
    path, forced, oracle = get(label)
    oracle = oracle or at_load_oracle(hf_model, forced)
    host = cuda_host()
    info = resolve_model_info(path)
    method, quantization = check_quantization(LaunchConfig(model_id=str(path), quantize=forced), info, host)
    model = build_native_model(info, host, torch.bfloat16, torch.device("cuda"), quant_method=method, quantization=quantization)
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    ours = native_last_logits(model, prompts(), host, block_size=16).float().cpu()
    with torch.inference_mode():
        theirs = torch.stack([oracle(torch.tensor([p])).logits[0, -1].float() for p in prompts()])
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 0.05 * scale, f"{label}: bf16 logits drift"
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() > 0.999, f"{label}: bf16 logits direction, cosine {cosine.tolist()}"
