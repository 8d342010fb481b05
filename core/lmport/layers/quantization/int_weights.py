"""The canonical weight-only integer layout every int format is repacked into, and its matmul.

After loading, an int layer holds ``qweight`` int32 ``[K * bits // 32, N]`` (packed along K, GPTQ
order), ``scales`` and ``zeros`` ``[K // group_size, N]`` in the model dtype, and for act-order
checkpoints ``input_perm`` (the input columns' order that makes groups contiguous). Its forward
is ``layer_ops.linear_wq`` (see :mod:`lmport.layers.quant_ops`), the backend's int4/int8 kernel.
"""

from __future__ import annotations

import torch

from lmport.layers.linear import Linear, LinearMethod, WeightSpec
from lmport.layers.quant_ops import pack_int_rows, unpack_int_rows

BITS = (4, 8)


def unpack_int_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R, C * bits // 32]`` packed along columns (value ``c`` at bit ``bits * (c % per_word)``) -> ``[R, C]``."""
    return unpack_int_rows(packed.t(), bits).t()


def pack_int_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int_rows(values.t(), bits).t().contiguous()


def set_canonical(
    layer: Linear,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    input_perm: torch.Tensor | None = None,
) -> None:
    """Replace ``layer``'s parameters by the canonical ones: ``q`` int ``[K, N]`` (unsigned values),
    ``scales``/``zeros`` ``[G, N]`` in the model dtype; a layer ``output_order`` is applied to the columns here."""
    dtype = scales.dtype
    if layer.output_order is not None:
        order = layer.output_order.to(q.device)
        q, scales, zeros = q[:, order], scales[:, order], zeros[:, order]
    for name in list(layer.weight_specs):
        layer.drop_weight(name)
    layer.add_weight("qweight", pack_int_rows(q, bits), WeightSpec(output_dim=1, input_dim=0, input_pack=32 // bits))
    layer.add_weight("scales", scales.contiguous(), WeightSpec(output_dim=1, input_dim=0, input_pack=group_size))
    layer.add_weight("zeros", zeros.to(dtype).contiguous(), WeightSpec(output_dim=1, input_dim=0, input_pack=group_size))
    if input_perm is not None:
        layer.add_weight("input_perm", input_perm.to(torch.int64), WeightSpec(input_dim=0))
    layer.wq_bits, layer.wq_group_size = bits, group_size


def act_order_permutation(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The input order that makes GPTQ act-order groups contiguous; ``None`` when they already are."""
    k = g_idx.numel()
    trivial = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx.to(trivial.dtype), trivial):
        return None
    perm = torch.argsort(g_idx.to(torch.int64), stable=True)
    if not torch.equal(g_idx.to(torch.int64)[perm], trivial):
        raise ValueError(f"g_idx does not give every group {group_size} rows")
    return perm


class CanonicalIntMethod(LinearMethod):
    """Base of the int formats: subclasses read their layout and call :func:`set_canonical`."""

    repacks = True

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        perm = getattr(layer, "input_perm", None)
        if perm is not None:
            x2 = x2[:, perm]
        y = layer.layer_ops.linear_wq(
            x2, layer.qweight, layer.scales, layer.zeros, layer.wq_bits, layer.wq_group_size, layer.bias
        )
        return y.reshape(*shape[:-1], y.shape[-1])


def check_bits(bits: int, fmt: str) -> int:
    if bits not in BITS:
        raise ValueError(f"{fmt}: {bits}-bit weights are not supported (4 or 8)")
    return bits


def resolve_group_size(group_size: int | None, in_features: int, fmt: str) -> int:
    """``-1``/``None`` is one group per column (per-channel); K must split into whole groups."""
    size = in_features if group_size in (None, -1, 0) else int(group_size)
    if in_features % size:
        raise ValueError(f"{fmt}: in_features {in_features} is not a multiple of group_size {size}")
    return size
