"""The linear-layer seam: shard placement, tensor-parallel narrowing, output reordering, reloads."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lmport.layers.linear import Linear, Partition, per_head_qkv_order


def _filled(layer: Linear, weights: dict, bias: dict | None = None) -> Linear:
    layer.begin_loading()
    for shard, tensor in weights.items():
        layer.load("weight", tensor, shard)
    for shard, tensor in (bias or {}).items():
        layer.load("bias", tensor, shard)
    layer.finish_loading()
    return layer


def test_merged_shards_land_in_order_and_split_back():
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    bq, bk, bv = torch.randn(8), torch.randn(4), torch.randn(4)
    layer = _filled(Linear(6, {"q": 8, "k": 4, "v": 4}, bias=True), {"k": k, "v": v, "q": q}, {"v": bv, "q": bq, "k": bk})
    x = torch.randn(3, 6)
    out_q, out_k, out_v = layer.split(layer(x))
    # one matmul over the merged rows may block its sums unlike three apart: equal up to rounding
    exact = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_q, F.linear(x, q, bq), **exact)
    torch.testing.assert_close(out_k, F.linear(x, k, bk), **exact)
    torch.testing.assert_close(out_v, F.linear(x, v, bv), **exact)


def test_a_shard_of_the_wrong_shape_is_refused():
    layer = Linear(6, {"q": 8, "k": 4})
    with pytest.raises(ValueError, match="shape"):
        layer.load("weight", torch.zeros(8, 6), "k")
    with pytest.raises(ValueError, match="unknown shard"):
        layer.load("weight", torch.zeros(4, 6), "v")


@pytest.mark.parametrize("rank", [0, 1])
def test_column_partition_holds_its_rows_of_every_shard(rank):
    torch.manual_seed(1)
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    full = _filled(Linear(4, {"gate": 8, "up": 8}), {"gate": gate, "up": up})
    per_shard = _filled(Linear(4, {"gate": 8, "up": 8}, partition=Partition(rank, 2)), {"gate": gate, "up": up})
    whole = _filled(Linear(4, {"gate": 8, "up": 8}, partition=Partition(rank, 2)), {None: torch.cat([gate, up])})
    x = torch.randn(5, 4)
    want_gate, want_up = (part.chunk(2, dim=-1)[rank] for part in full.split(full(x)))
    for layer in (per_shard, whole):
        got_gate, got_up = layer.split(layer(x))
        torch.testing.assert_close(got_gate, want_gate)  # a narrower GEMM may round differently
        torch.testing.assert_close(got_up, want_up)


def test_row_partitions_sum_to_the_whole_layer():
    torch.manual_seed(2)
    weight = torch.randn(5, 8)
    x = torch.randn(3, 8)
    parts = [_filled(Linear(8, 5, partition=Partition(rank, 2, "input")), {None: weight}) for rank in range(2)]
    total = sum(layer(chunk) for layer, chunk in zip(parts, x.chunk(2, dim=-1)))
    torch.testing.assert_close(total, F.linear(x, weight))


def test_per_head_qkv_is_reordered_after_loading():
    torch.manual_seed(3)
    heads, head_dim = 2, 3
    per_head = torch.randn(heads * 3 * head_dim, 4)  # [h0: q k v, h1: q k v]
    bias = torch.randn(heads * 3 * head_dim)
    sizes = {"q": heads * head_dim, "k": heads * head_dim, "v": heads * head_dim}
    layer = Linear(4, sizes, bias=True, output_order=per_head_qkv_order(heads, head_dim))
    _filled(layer, {None: per_head}, {None: bias})
    x = torch.randn(2, 4)
    q, k, v = layer.split(layer(x))
    rows = per_head.view(heads, 3, head_dim, 4)
    want_k = F.linear(x, rows[:, 1].reshape(-1, 4), bias.view(heads, 3, head_dim)[:, 1].reshape(-1))
    torch.testing.assert_close(k, want_k)
    # a second load starts from the checkpoint's layout again (not reordered twice)
    _filled(layer, {None: per_head}, {None: bias})
    torch.testing.assert_close(layer.split(layer(x))[1], want_k)
