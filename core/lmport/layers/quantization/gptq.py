"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), 4 and 8 bit, any group size, act-order.

On disk, per layer: ``qweight`` int32 ``[K / pack, N]`` (packed along K, GPTQ order),
``qzeros`` int32 ``[G, N / pack]`` (packed along N), ``scales`` ``[G, N]``, ``g_idx`` int32 ``[K]``
(each input row's group; out of order with ``desc_act``). ``checkpoint_format`` ``"gptq"``
(v1, AutoGPTQ's) stores each zero point minus one and adds it back when reading, as AutoGPTQ's
kernels do; ``"gptq_v2"`` stores it as is. ``--quantize marlin`` on a GPTQ checkpoint is this
layout with the backend's fast int4 kernel; a Marlin-serialized checkpoint (``checkpoint_format
"marlin"``) is not read.
"""

from __future__ import annotations

from typing import Any

import torch

from lmport.layers.linear import Linear, WeightSpec
from lmport.layers.quantization.config import QuantizationConfig
from lmport.layers.quantization.int_weights import (
    CanonicalIntMethod,
    act_order_permutation,
    check_bits,
    resolve_group_size,
    set_canonical,
    unpack_int_cols,
)
from lmport.layers.quant_ops import unpack_int_rows


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool, checkpoint_format: str, ignore=()):
        super().__init__(ignore)
        self.bits = check_bits(int(bits), "gptq")
        self.group_size = group_size
        self.desc_act = bool(desc_act)
        self.sym = bool(sym)
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format '{checkpoint_format}' is not read (gptq, gptq_v2 are)")
        self.checkpoint_format = checkpoint_format

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "GPTQConfig":
        fmt = cfg.get("checkpoint_format") or ("gptq_v2" if cfg.get("format") == "gptq_v2" else "gptq")
        if cfg.get("is_marlin_format") or fmt == "marlin":
            raise ValueError("gptq: Marlin-serialized checkpoints are not read; use the GPTQ checkpoint with --quantize marlin")
        return cls(
            bits=cfg.get("bits", 4),
            group_size=cfg.get("group_size", 128),
            desc_act=cfg.get("desc_act", False),
            sym=cfg.get("sym", True),
            checkpoint_format=fmt,
            ignore=cfg.get("modules_to_not_convert") or (),
        )

    def linear_method(self, layer: Linear) -> "GPTQLinearMethod":
        return GPTQLinearMethod(self)

    def describe(self) -> str:
        return f"gptq {self.bits}-bit g{self.group_size}{' act-order' if self.desc_act else ''} ({self.checkpoint_format})"


class GPTQLinearMethod(CanonicalIntMethod):
    name = "gptq"

    def __init__(self, config: GPTQConfig):
        self.config = config

    def create_weights(self, layer: Linear) -> None:
        bits = self.config.bits
        pack = 32 // bits
        k, n = layer.in_features, layer.out_features
        group = resolve_group_size(self.config.group_size, k, "gptq")
        groups = k // group
        layer.add_weight("qweight", torch.empty(k // pack, n, dtype=torch.int32), WeightSpec(1, 0, input_pack=pack))
        layer.add_weight(
            "qzeros", torch.empty(groups, n // pack, dtype=torch.int32), WeightSpec(1, 0, output_pack=pack, input_pack=group)
        )
        layer.add_weight("scales", torch.empty(groups, n), WeightSpec(1, 0, input_pack=group))
        # g_idx: the same for every shard (q/k/v share their input, so GPTQ orders them alike)
        layer.add_weight("g_idx", torch.empty(k, dtype=torch.int32), WeightSpec(input_dim=0, same_across_shards=True, optional=True))
        layer.g_idx_loaded = False

    def load(self, layer: Linear, name: str, tensor: torch.Tensor, shard) -> None:
        layer.load_param(name, tensor, shard)
        if name == "g_idx":
            layer.g_idx_loaded = True

    def after_loading(self, layer: Linear) -> None:
        bits, k = self.config.bits, layer.in_features
        group = resolve_group_size(self.config.group_size, k, "gptq")
        q = unpack_int_rows(layer.qweight.data, bits)  # [K, N]
        zeros = unpack_int_cols(layer.qzeros.data, bits)  # [G, N]
        if self.config.checkpoint_format == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1 (and so cannot hold a zero point of 0, as AutoGPTQ)
        scales = layer.scales.data
        perm = act_order_permutation(layer.g_idx.data, group) if layer.g_idx_loaded else None
        if perm is not None:
            q = q[perm]
        set_canonical(layer, q, scales, zeros.to(scales.dtype), bits, group, perm)
