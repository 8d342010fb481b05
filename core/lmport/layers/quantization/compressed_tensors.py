"""compressed-tensors checkpoints (llm-compressor): ``pack-quantized`` W4A16/W8A16 and ``float-quantized`` FP8.

The ``quantization_config`` is validated with the ``compressed-tensors`` package's own pydantic
model (``pip install "lmport[compressed-tensors]"``). One weight scheme for every ``Linear``
(``targets: ["Linear"]``) is read; ``ignore`` lists the modules left in full precision.

``pack-quantized``, per layer: ``weight_packed`` int32 ``[N, K * bits / 32]`` (packed along K,
each value stored plus ``2**(bits-1)``), ``weight_scale`` ``[N, G]`` (``G = 1`` per channel),
``weight_zero_point`` int32 ``[N * bits / 32, G]`` (asymmetric only; packed along N, offset the
same way), ``weight_shape`` (``[N, K]``, checked). ``w = (q - zero_point) * scale``.
``actorder: weight`` needs nothing at load (groups stay in input order); ``actorder: group``
(a stored ``weight_g_idx``) is rejected by the compressed-tensors package itself since 0.20. ``float-quantized``: see :mod:`lmport.layers.quantization.fp8`.
"""

from __future__ import annotations

from typing import Any

import torch

from lmport.layers.linear import Linear, LinearMethod, WeightSpec
from lmport.layers.quantization.config import QuantizationConfig
from lmport.layers.quantization.fp8 import Fp8LinearMethod
from lmport.layers.quantization.int_weights import (
    CanonicalIntMethod,
    check_bits,
    resolve_group_size,
    set_canonical,
    unpack_int_cols,
)
from lmport.layers.quant_ops import unpack_int_rows

FORMATS = ("pack-quantized", "float-quantized")


def parse_config(cfg: dict[str, Any]) -> Any:
    try:
        from compressed_tensors.quantization import QuantizationConfig as CTQuantizationConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError(
            'compressed-tensors checkpoints need the compressed-tensors package: pip install "lmport[compressed-tensors]"'
        ) from exc
    return CTQuantizationConfig.model_validate(cfg)


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, cfg: dict[str, Any]):
        parsed = parse_config(cfg)
        super().__init__(parsed.ignore or ())
        schemes = list(parsed.config_groups.values())
        if len(schemes) != 1 or list(schemes[0].targets) != ["Linear"]:
            raise ValueError("compressed-tensors: only one scheme targeting every Linear is read (mixed precision is not)")
        scheme = schemes[0]
        self.format = str(getattr(scheme.format, "value", scheme.format) or getattr(parsed.format, "value", parsed.format))
        if self.format not in FORMATS:
            raise ValueError(f"compressed-tensors: format '{self.format}' is not read ({', '.join(FORMATS)} are)")
        weights = scheme.weights
        self.weights = weights
        strategy = str(getattr(weights.strategy, "value", weights.strategy))
        if self.format == "pack-quantized":
            if str(getattr(weights.type, "value", weights.type)) != "int" or scheme.input_activations is not None:
                raise ValueError("compressed-tensors: pack-quantized is read for int weights with float activations (W4A16/W8A16)")
            self.bits = check_bits(weights.num_bits, "compressed-tensors")
            if strategy not in ("group", "channel"):
                raise ValueError(f"compressed-tensors: int weights with strategy '{strategy}' are not read (group, channel are)")
            self.group_size = weights.group_size if strategy == "group" else -1
            self.symmetric = bool(weights.symmetric)
        else:
            if weights.num_bits != 8 or str(getattr(weights.type, "value", weights.type)) != "float":
                raise ValueError("compressed-tensors: float-quantized is read for 8-bit float weights (FP8)")
            if strategy not in ("tensor", "channel"):
                raise ValueError(f"compressed-tensors: fp8 weights with strategy '{strategy}' are not read (tensor, channel are)")
        self.strategy = strategy

    def linear_method(self, layer: Linear) -> LinearMethod:
        if self.format == "float-quantized":
            return Fp8LinearMethod()
        return PackQuantizedMethod(self)

    def describe(self) -> str:
        if self.format == "float-quantized":
            return f"compressed-tensors float-quantized fp8 ({self.strategy})"
        sym = "sym" if self.symmetric else "asym"
        return f"compressed-tensors pack-quantized W{self.bits}A16 {self.strategy} g{self.group_size} {sym}"


class PackQuantizedMethod(CanonicalIntMethod):
    name = "compressed-tensors"

    def __init__(self, config: CompressedTensorsConfig):
        self.config = config

    def create_weights(self, layer: Linear) -> None:
        bits = self.config.bits
        pack = 32 // bits
        n, k = layer.out_features, layer.in_features
        group = resolve_group_size(self.config.group_size, k, "compressed-tensors")
        groups = k // group
        layer.add_weight("weight_packed", torch.empty(n, k // pack, dtype=torch.int32), WeightSpec(0, 1, input_pack=pack))
        layer.add_weight("weight_scale", torch.empty(n, groups), WeightSpec(0, 1, input_pack=group))
        layer.add_weight("weight_shape", torch.empty(2, dtype=torch.int64), WeightSpec(optional=True))
        if not self.config.symmetric:
            layer.add_weight(
                "weight_zero_point",
                torch.empty(n // pack, groups, dtype=torch.int32),
                WeightSpec(0, 1, output_pack=pack, input_pack=group),
            )

    def load(self, layer: Linear, name: str, tensor: torch.Tensor, shard) -> None:
        if name == "weight_shape":  # checked, not stored: the layer knows its shape
            rows = layer.shard_rows(shard)[1] * (layer.partition.world if layer.partition.dim == "output" else 1)
            cols = layer.in_features * (layer.partition.world if layer.partition.dim == "input" else 1)
            if tuple(int(v) for v in tensor.tolist()) != (rows, cols):
                raise ValueError(f"weight_shape {tensor.tolist()} does not match the layer's [{rows}, {cols}]")
            return
        layer.load_param(name, tensor, shard)

    def after_loading(self, layer: Linear) -> None:
        bits, k = self.config.bits, layer.in_features
        group = resolve_group_size(self.config.group_size, k, "compressed-tensors")
        q = unpack_int_cols(layer.weight_packed.data, bits).t()  # [K, N], stored plus the offset
        scales = layer.weight_scale.data.t().contiguous()  # [G, N]
        if self.config.symmetric:
            zeros = torch.full_like(scales, float(1 << (bits - 1)))
        else:
            zeros = unpack_int_rows(layer.weight_zero_point.data, bits).t().to(scales.dtype)  # [G, N], offset too
        set_canonical(layer, q, scales, zeros, bits, group)
