"""AWQ checkpoints (AutoAWQ's GEMM packing), 4 bit, asymmetric.

On disk, per layer: ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]``, both packed
along N in AWQ's interleaved order (nibble ``i`` of a word holds column ``8w + [0, 2, 4, 6, 1, 3, 5, 7][i]``),
``scales`` ``[G, N]``; ``w = (q - z) * s``. The GEMV packing (``version: gemv``) is not read.
"""

from __future__ import annotations

from typing import Any

import torch

from lmport.layers.linear import Linear, WeightSpec
from lmport.layers.quantization.config import QuantizationConfig
from lmport.layers.quantization.int_weights import CanonicalIntMethod, resolve_group_size, set_canonical, unpack_int_cols

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]


def awq_unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C / 8]`` in AWQ order -> ``[R, C]`` values in column order."""
    raw = unpack_int_cols(packed, 4)  # nibble order
    words = raw.reshape(raw.shape[0], -1, 8)
    return words[:, :, list(AWQ_REVERSE_ORDER)].reshape(raw.shape)


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, bits: int, group_size: int, zero_point: bool, version: str, ignore=()):
        super().__init__(ignore)
        if int(bits) != 4:
            raise ValueError(f"awq: {bits}-bit checkpoints are not read (4-bit GEMM packing is)")
        if version.lower() != "gemm":
            raise ValueError(f"awq: the '{version}' packing is not read (the GEMM packing is)")
        if not zero_point:
            raise ValueError("awq: checkpoints without zero points are not read")
        self.bits, self.group_size = 4, group_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "AWQConfig":
        return cls(
            bits=cfg.get("bits", cfg.get("w_bit", 4)),
            group_size=cfg.get("group_size", cfg.get("q_group_size", 128)),
            zero_point=cfg.get("zero_point", True),
            version=str(cfg.get("version", "gemm")),
            ignore=cfg.get("modules_to_not_convert") or (),
        )

    def linear_method(self, layer: Linear) -> "AWQLinearMethod":
        return AWQLinearMethod(self)

    def describe(self) -> str:
        return f"awq 4-bit g{self.group_size} (gemm)"


class AWQLinearMethod(CanonicalIntMethod):
    name = "awq"

    def __init__(self, config: AWQConfig):
        self.config = config

    def create_weights(self, layer: Linear) -> None:
        k, n = layer.in_features, layer.out_features
        group = resolve_group_size(self.config.group_size, k, "awq")
        layer.add_weight("qweight", torch.empty(k, n // 8, dtype=torch.int32), WeightSpec(1, 0, output_pack=8))
        layer.add_weight(
            "qzeros", torch.empty(k // group, n // 8, dtype=torch.int32), WeightSpec(1, 0, output_pack=8, input_pack=group)
        )
        layer.add_weight("scales", torch.empty(k // group, n), WeightSpec(1, 0, input_pack=group))

    def after_loading(self, layer: Linear) -> None:
        group = resolve_group_size(self.config.group_size, layer.in_features, "awq")
        q = awq_unpack_cols(layer.qweight.data)
        zeros = awq_unpack_cols(layer.qzeros.data)
        scales = layer.scales.data
        set_canonical(layer, q, scales, zeros.to(scales.dtype), 4, group)
