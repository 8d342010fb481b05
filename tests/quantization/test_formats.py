"""Every format, end to end on CPU: a tiny Llama quantized in the format's real on-disk layout,
loaded through the engine factory's quantization check, generates what transformers generates
with the dequantized weights."""

from __future__ import annotations

import pytest

from lmport.layers.quantization.int_weights import CanonicalIntMethod


def _int_layers(model):
    return [m for m in model.modules() if isinstance(getattr(m, "method", None), CanonicalIntMethod)]


@pytest.mark.parametrize(
    "opts",
    [
        dict(bits=4, group_size=128, sym=True),
        dict(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"),
        dict(bits=4, group_size=64, sym=False, checkpoint_format="gptq"),
        dict(bits=8, group_size=-1, sym=True),
        dict(bits=4, group_size=32, sym=True, act_order=True),
        dict(bits=8, group_size=64, sym=False, act_order=True, checkpoint_format="gptq_v2"),
    ],
    ids=["4b-g128-sym", "4b-g32-asym-v2", "4b-g64-asym-v1", "8b-channel", "4b-g32-actorder", "8b-g64-asym-actorder"],
)
def test_gptq(quantized, load_quantized, assert_serves_like, opts):
    path, oracle = quantized("gptq", **opts)
    model = load_quantized(path)
    layers = _int_layers(model)
    assert len(layers) == 2 * 4  # q/k/v, o, gate/up, down per layer; the head stays unquantized
    if opts.get("act_order"):
        assert all(layer.input_perm is not None for layer in layers)  # g_idx was a real permutation
    assert_serves_like(oracle, model)


def test_awq(quantized, load_quantized, assert_serves_like):
    path, oracle = quantized("awq", group_size=64)
    model = load_quantized(path)
    assert len(_int_layers(model)) == 8
    assert_serves_like(oracle, model)


@pytest.mark.parametrize("fmt", ["fbgemm_fp8", "fp8"], ids=["fbgemm-per-channel", "autofp8-per-tensor"])
def test_fp8_checkpoints(quantized, load_quantized, assert_serves_like, fmt):
    import torch

    path, oracle = quantized(fmt)
    model = load_quantized(path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.dtype == torch.float32
    # per-tensor scales of q, k and v stay apart: one per output row of the merged layer
    assert qkv.weight_scale.shape == (qkv.out_features,)
    assert_serves_like(oracle, model)


@pytest.mark.parametrize(
    "opts",
    [
        dict(bits=4, group_size=64, sym=True),
        dict(bits=4, group_size=32, sym=False),
        dict(bits=8, group_size=-1, sym=True),
        dict(bits=4, group_size=32, sym=True, act_order=True),
    ],
    ids=["w4a16-g64", "w4a16-g32-asym", "w8a16-channel", "w4a16-actorder-weight"],
)
def test_compressed_tensors_pack_quantized(quantized, load_quantized, assert_serves_like, opts):
    path, oracle = quantized("pack-quantized", **opts)
    model = load_quantized(path)
    assert len(_int_layers(model)) == 8
    assert_serves_like(oracle, model)


def test_compressed_tensors_fp8(quantized, load_quantized, assert_serves_like):
    path, oracle = quantized("float-quantized")
    model = load_quantized(path, quantize="compressed-tensors")
    assert model.model.layers[0].mlp.down_proj.method.name == "fp8"
    assert_serves_like(oracle, model)


@pytest.mark.parametrize("fmt, opts", [("pack-quantized", dict(bits=4, group_size=32, sym=True)), ("float-quantized", {})])
def test_compressed_tensors_matches_transformers_own_loader(quantized, load_quantized, assert_serves_like, fmt, opts):
    """transformers reads compressed-tensors checkpoints itself (decompressing on CPU): a second, independent oracle.
    (Symmetric only: transformers' model expects unpacked asymmetric zero points where compressed-tensors 0.20 packs them.)"""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, _ = quantized(fmt, **opts)
    decompress = CompressedTensorsConfig(run_compressed=False)
    hf_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, quantization_config=decompress).eval()
    assert_serves_like(hf_model, load_quantized(path), atol=1e-3)
