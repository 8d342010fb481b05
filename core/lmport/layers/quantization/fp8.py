"""float8 (e4m3) weights with per-tensor or per-output-channel float32 scales.

Read from checkpoints written by llm-compressor / compressed-tensors (``float-quantized``),
FBGEMM-style ``fbgemm_fp8`` configs and AutoFP8/vLLM ``fp8`` configs: ``weight`` float8_e4m3fn
``[N, K]`` and ``weight_scale`` (``[]``/``[1]`` per tensor, ``[N]``/``[N, 1]`` per channel);
``input_scale`` (static activation scales) is read and not used. With ``--quantize fp8`` on an
unquantized checkpoint each weight is quantized as it loads (per output channel, absmax / 448).
The forward is ``layer_ops.linear_fp8``: fp8 matrix units where the backend has them, a
dequantizing kernel elsewhere, the torch reference on CPU. Block-wise scales
(``weight_block_size``, DeepSeek-style) are not read.
"""

from __future__ import annotations

from typing import Any

import torch

from lmport.layers.linear import Linear, LinearMethod, WeightSpec
from lmport.layers.quantization.config import QuantizationConfig

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 quantization: ``(weight_fp8 [N, K], scale float32 [N])``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Config(QuantizationConfig):
    """``from_checkpoint``: the weights on disk are fp8; otherwise they are quantized at load."""

    name = "fp8"

    def __init__(self, from_checkpoint: bool, ignore=()):
        super().__init__(ignore)
        self.from_checkpoint = from_checkpoint

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "Fp8Config":
        if cfg.get("weight_block_size"):
            raise ValueError("fp8: block-wise scales (weight_block_size) are not read; per-tensor and per-channel are")
        ignore = cfg.get("modules_to_not_convert") or cfg.get("ignored_layers") or ()
        return cls(from_checkpoint=True, ignore=ignore)

    def linear_method(self, layer: Linear) -> LinearMethod:
        return Fp8LinearMethod() if self.from_checkpoint else Fp8AtLoadMethod()

    def describe(self) -> str:
        return "fp8 e4m3 (checkpoint)" if self.from_checkpoint else "fp8 e4m3, quantized at load"


class Fp8LinearMethod(LinearMethod):
    """``weight`` fp8 ``[N, K]`` + ``weight_scale`` float32 ``[N]`` (a per-tensor scale fills its shard's rows)."""

    name = "fp8"
    ignored_tensors = ("input_scale",)

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        layer.add_weight("weight", torch.empty(n, k, dtype=FP8), WeightSpec(0, 1, keep_dtype=True))
        layer.add_weight("weight_scale", torch.empty(n, dtype=torch.float32), WeightSpec(output_dim=0, keep_dtype=True))

    def load(self, layer: Linear, name: str, tensor: torch.Tensor, shard) -> None:
        if name == "weight":
            if tensor.dtype != FP8:
                raise ValueError(f"fp8 weight has dtype {tensor.dtype}, expected {FP8}")
            layer.load_param("weight", tensor, shard)
            return
        if tensor.numel() == 1:  # per tensor: every row of this shard gets it (as a whole checkpoint tensor would)
            rows = layer.shard_rows(shard)[1]
            if layer.partition.dim == "output":
                rows *= layer.partition.world
            tensor = tensor.reshape(1).float().expand(rows)
        layer.load_param("weight_scale", tensor.reshape(-1).float(), shard)

    def after_loading(self, layer: Linear) -> None:
        finish_fp8(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = layer.layer_ops.linear_fp8(x.reshape(-1, shape[-1]), layer.weight, layer.weight_scale, layer.bias)
        return y.reshape(*shape[:-1], y.shape[-1])


def finish_fp8(layer: Linear) -> None:
    """Reorder rows (``output_order``) and collapse a scale that is one value into a per-tensor ``[]`` scale."""
    weight, scale = layer.weight.data, layer.weight_scale.data
    if layer.output_order is not None:
        order = layer.output_order.to(weight.device)
        weight, scale = weight.view(torch.uint8)[order].view(FP8), scale[order]
    if scale.numel() and bool((scale == scale[0]).all()):
        scale = scale[0].clone()
    layer.weight.data, layer.weight_scale.data = weight, scale


class Fp8AtLoadMethod(Fp8LinearMethod):
    """``--quantize fp8`` on an unquantized checkpoint: each (shard of a) weight is quantized as it arrives."""

    name = "fp8 (at load)"
    ignored_tensors = ()

    def load(self, layer: Linear, name: str, tensor: torch.Tensor, shard) -> None:
        if name != "weight" or tensor.dtype == FP8:
            raise ValueError(f"'{name}' is not a tensor of an unquantized checkpoint")
        weight, scale = quantize_fp8_rows(tensor)
        layer.load_param("weight", weight, shard)
        layer.load_param("weight_scale", scale, shard)

    def create_weights(self, layer: Linear) -> None:
        super().create_weights(layer)
        # the checkpoint has no weight_scale: it comes with the weight
        layer.weight_specs["weight_scale"] = WeightSpec(output_dim=0, keep_dtype=True, optional=True)
