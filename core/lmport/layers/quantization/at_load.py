"""Formats quantized from an unquantized checkpoint as it loads: EETQ int8, bitsandbytes int8/nf4/fp4.

Each weight (each shard of a merged one) is quantized when its tensor arrives, so the full
precision model is never held whole.

- ``eetq`` and ``bitsandbytes`` (int8): symmetric per-output-channel int8 (``absmax / 127``, as
  EETQ and LLM.int8 quantize weights), run through ``layer_ops.linear_wq`` (8 bit, one group).
  LLM.int8's int8 activations with fp16 outlier columns are not reproduced: activations stay
  in the model dtype (weight-only int8).
- ``bitsandbytes-nf4`` / ``bitsandbytes-fp4``: bitsandbytes' 4-bit codebooks over blocks of 64
  weights with a float32 absmax per block; the forward dequantizes and runs ``layer_ops.linear``
  (no fused 4-bit kernel).
"""

from __future__ import annotations

import torch

from lmport.layers.linear import Linear, LinearMethod, WeightSpec
from lmport.layers.quantization.config import QuantizationConfig
from lmport.layers.quantization.int_weights import CanonicalIntMethod

# bitsandbytes' codebooks (bitsandbytes/functional.py: get_4bit_type)
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_CODE = (0.0, 0.0052083333, 0.6666667, 1.0, 0.3333333, 0.5, 0.1666667, 0.25,
            -0.0, -0.0052083333, -0.6666667, -1.0, -0.3333333, -0.5, -0.1666667, -0.25)
BLOCK = 64


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int [K, N] in [1, 255] (value + 128), scale [N] float32)`` for ``weight [N, K]``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int32) + 128
    return q.t(), scale


class AtLoadConfig(QuantizationConfig):
    """``--quantize eetq|bitsandbytes|bitsandbytes-nf4|bitsandbytes-fp4`` on an unquantized checkpoint."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ("eetq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"):
            raise ValueError(f"'{name}' is not quantized at load")
        self.name = name

    def linear_method(self, layer: Linear) -> LinearMethod:
        if self.name in ("eetq", "bitsandbytes"):
            return Int8AtLoadMethod(self.name)
        return Bnb4bitMethod(NF4_CODE if self.name == "bitsandbytes-nf4" else FP4_CODE, self.name)

    def describe(self) -> str:
        return f"{self.name}, quantized at load"


class Int8AtLoadMethod(CanonicalIntMethod):
    """Writes the canonical int8 layout directly: ``qweight [K / 4, N]``, ``scales``/``zeros`` ``[1, N]``."""

    repacks = False  # the layout is final as it loads
    tensor_aliases = {"weight": "qweight"}

    def __init__(self, name: str):
        self.name = name

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        if k % 4:
            raise ValueError(f"{self.name}: in_features {k} does not pack into int32 words of four int8")
        layer.add_weight("qweight", torch.empty(k // 4, n, dtype=torch.int32), WeightSpec(1, 0, input_pack=4))
        layer.add_weight("scales", torch.empty(1, n), WeightSpec(1, None, optional=True))
        layer.add_weight("zeros", torch.empty(1, n), WeightSpec(1, None, optional=True))
        layer.wq_bits, layer.wq_group_size = 8, k

    def load(self, layer: Linear, name: str, tensor: torch.Tensor, shard) -> None:
        if name != "qweight":
            raise ValueError(f"'{name}' is not a tensor of an unquantized checkpoint")
        from lmport.layers.quant_ops import pack_int_rows

        q, scale = quantize_int8_rows(tensor)
        layer.load_param("qweight", pack_int_rows(q, 8), shard)
        layer.load_param("scales", scale[None].to(layer.scales.dtype), shard)
        layer.load_param("zeros", torch.full_like(scale[None], 128.0).to(layer.zeros.dtype), shard)

    def after_loading(self, layer: Linear) -> None:
        if layer.output_order is not None:
            from lmport.layers.quant_ops import unpack_int_rows
            from lmport.layers.quantization.int_weights import set_canonical

            q = unpack_int_rows(layer.qweight.data, 8)
            set_canonical(layer, q, layer.scales.data, layer.zeros.data, 8, layer.in_features)


class Bnb4bitMethod(LinearMethod):
    """``codes`` uint8 ``[N, K / 2]`` (two 4-bit codebook indices a byte, high nibble first, as
    bitsandbytes packs them) and ``absmax`` float32 ``[N, K / 64]``."""

    tensor_aliases = {"weight": "codes"}

    def __init__(self, code: tuple[float, ...], name: str):
        self.code = code
        self.name = name

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        if k % BLOCK:
            raise ValueError(f"{self.name}: in_features {k} is not a multiple of the {BLOCK}-weight block")
        layer.add_weight("codes", torch.empty(n, k // 2, dtype=torch.uint8), WeightSpec(0, 1, input_pack=2))
        layer.add_weight("absmax", torch.empty(n, k // BLOCK, dtype=torch.float32), WeightSpec(0, 1, input_pack=BLOCK, optional=True, keep_dtype=True))

    def load(self, layer: Linear, name: str, tensor: torch.Tensor, shard) -> None:
        if name != "codes":
            raise ValueError(f"'{name}' is not a tensor of an unquantized checkpoint")
        codes, absmax = quantize_4bit_blocks(tensor, self.code)
        layer.load_param("codes", codes, shard)
        layer.load_param("absmax", absmax, shard)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_4bit_blocks(layer.codes, layer.absmax, self.code).to(x.dtype)
        return layer.layer_ops.linear(x, weight, layer.bias)


def quantize_4bit_blocks(weight: torch.Tensor, code: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> ``(codes uint8 [N, K / 2], absmax float32 [N, K / 64])``: each value the
    nearest codebook entry of ``value / absmax`` of its block."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // BLOCK, BLOCK)
    absmax = blocks.abs().amax(dim=-1).clamp(min=1e-12)
    table = torch.tensor(code, dtype=torch.float32, device=weight.device)
    normed = (blocks / absmax[..., None]).reshape(n, k, 1)
    index = (normed - table).abs().argmin(dim=-1).to(torch.uint8)  # [N, K]
    pairs = index.reshape(n, k // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1], absmax


def dequantize_4bit_blocks(codes: torch.Tensor, absmax: torch.Tensor, code: tuple[float, ...]) -> torch.Tensor:
    n = codes.shape[0]
    table = torch.tensor(code, dtype=torch.float32, device=codes.device)
    index = torch.stack([codes >> 4, codes & 0xF], dim=-1).reshape(n, -1).long()
    values = table[index].reshape(n, absmax.shape[1], BLOCK)
    return (values * absmax[..., None]).reshape(n, -1)
