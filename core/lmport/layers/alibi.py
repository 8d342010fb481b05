"""ALiBi slopes (one per query head) for ``AttentionSpec.alibi_slopes``.

Attention backends add ``-slope * (query_pos - key_pos)`` to each score. Checkpoints add
``slope * key_pos`` (BLOOM, Falcon) or ``slope * (key_pos - last_pos)`` (MPT) instead; both
differ from ours by a constant per query row, which softmax ignores. What differs between
families is only the slopes, so each family's formula lives here, computed exactly as
``transformers`` computes it (float32 ``torch.pow``), so the slopes are identical to its own.
"""

from __future__ import annotations

import math

import torch


def bloom_alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """BLOOM's (and Falcon-RW's) slopes: the ALiBi paper's geometric sequence.

    For ``n`` heads a power of two, slope ``i`` (1-based) is ``2 ** (-8 i / n)``. Otherwise the
    closest lower power of two ``p`` gets that sequence, and the remaining ``n - p`` heads take
    the odd-indexed terms of the sequence for ``2 p`` heads.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest_power_of_2, dtype=torch.int32))
    if closest_power_of_2 != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))), dtype=torch.float32)
        num_remaining = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * num_remaining, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)])
    return tuple(slopes.tolist())


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> tuple[float, ...]:
    """MPT's slopes: ``2 ** -(alibi_bias_max * i / P)`` for ``i`` in ``1..P``, ``P`` the next power of two.

    With ``num_heads < P`` MPT keeps the odd-indexed terms first, then the even-indexed ones,
    and takes the first ``num_heads`` (a different set from BLOOM's for the same head count).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    padded = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded + 1, dtype=torch.int64).float() * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, exponents)
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return tuple(slopes.tolist())
