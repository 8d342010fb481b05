"""Formats quantized from an unquantized checkpoint as it loads (``--quantize``): EETQ and
bitsandbytes int8, bitsandbytes nf4/fp4, fp8. The oracle is transformers holding the weights
rounded by the format's formula, written out here."""

from __future__ import annotations

import copy

import pytest
import torch

from lmport.layers.quantization.at_load import FP4_CODE, NF4_CODE


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale) * scale


def _fp8_rows(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def _codebook(code):
    table = torch.tensor(code)

    def rounded(w: torch.Tensor) -> torch.Tensor:
        blocks = w.reshape(w.shape[0], -1, 64)
        absmax = blocks.abs().amax(dim=-1, keepdim=True)
        nearest = table[(blocks / absmax).unsqueeze(-1).sub(table).abs().argmin(dim=-1)]
        return (nearest * absmax).reshape(w.shape)

    return rounded


ROUNDING = {
    "eetq": _int8_rows,
    "bitsandbytes": _int8_rows,
    "fp8": _fp8_rows,
    "bitsandbytes-nf4": _codebook(NF4_CODE),
    "bitsandbytes-fp4": _codebook(FP4_CODE),
}


def _oracle(hf_model, rounding):
    oracle = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, module in oracle.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.copy_(rounding(module.weight.float()))
    return oracle.eval()


@pytest.mark.parametrize("fmt", list(ROUNDING))
def test_quantized_at_load(tiny_source, load_quantized, assert_serves_like, fmt):
    path, hf_model = tiny_source("llama")
    model = load_quantized(path, quantize=fmt)
    methods = {type(m.method).__name__ for m in model.modules() if hasattr(m, "method")}
    assert "UnquantizedLinearMethod" in methods and len(methods) == 2  # the head stays unquantized
    assert_serves_like(_oracle(hf_model, ROUNDING[fmt]), model)


def test_mixtral_experts_quantize_and_the_router_does_not(tiny_source, load_quantized, assert_serves_like):
    path, hf_model = tiny_source("mixtral")
    model = load_quantized(path, quantize="eetq")
    moe = model.model.layers[0].mlp
    assert moe.experts.w13[0].method.name == "eetq" and moe.gate.method.name == "unquantized"
    oracle = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            if ".experts." in name:  # transformers 5 stacks experts: [experts, out, in]
                param.copy_(torch.stack([_int8_rows(expert) for expert in param.float()]))
            elif name.endswith("proj.weight"):
                param.copy_(_int8_rows(param.float()))
    assert_serves_like(oracle.eval(), model)


def test_a_quantized_checkpoint_is_not_quantized_again(quantized, load_quantized):
    path, _ = quantized("awq", group_size=64)
    with pytest.raises(ValueError, match="already 'awq'"):
        load_quantized(path, quantize="eetq")
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization 'awq'"):
        load_quantized(path, quantize="gptq")


@pytest.mark.parametrize("name, code", [("nf4", NF4_CODE), ("fp4", FP4_CODE)])
def test_4bit_codes_equal_bitsandbytes_where_it_is_installed(name, code):
    """bitsandbytes' own quantize_4bit (it runs on the CPU): same codes, same dequantized weights."""
    functional = pytest.importorskip("bitsandbytes.functional")
    from lmport.layers.quantization.at_load import dequantize_4bit_blocks, quantize_4bit_blocks

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type=name)
    codes, absmax = quantize_4bit_blocks(weight, code)
    theirs = functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(dequantize_4bit_blocks(codes, absmax, code), theirs, atol=1e-6, rtol=0)
    agree = (packed.view(-1) == codes.view(-1)).float().mean().item()
    assert agree > 0.99  # fp4: a value halfway between two codes may round either way
