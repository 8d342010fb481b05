"""The attention function lmport registers with transformers' ``AttentionInterface``.

A transformers model loaded with ``attn_implementation=PAGED_ATTENTION`` calls
:func:`paged_attention_forward` in every attention layer, with the layer's query/key/value
(``[1, heads, tokens, head_dim]``: the whole flat batch runs as one row) and its ``scaling``,
``sliding_window`` and ``softcap``. The step's KV cache and metadata arrive through the
model's forward kwargs, which transformers passes down to this function unchanged:

- ``lmport_paged=`` a :class:`PagedStep`: write K/V into the paged cache and attend through
  the active backend, exactly as a native model's attention layer does.
- ``lmport_probe=`` a :class:`LayerProbe`: plain causal attention over the single row, and a
  record of each layer's shapes; used once at load time to learn the cache shape and to check
  the paged path against it.

transformers builds no attention mask for an implementation it has no mask function for, so
nothing is spent on a ``[tokens, tokens]`` mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lmport.layers.attention import AttentionBackend, AttentionMetadata, AttentionSpec, KVCache

PAGED_ATTENTION = "lmport_paged"


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer looked like when called."""

    layer_index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None
    soft_cap: float | None
    causal: bool


def describe_layer(module: Any, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> LayerShape:
    """The layer's attention parameters from the call's kwargs, else from the module."""
    layer_index = getattr(module, "layer_idx", None)
    if layer_index is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: the transformers fallback cannot place its KV cache")
    head_dim = query.shape[-1]
    scale = kwargs.get("scaling")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    soft_cap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
    return LayerShape(
        layer_index=int(layer_index),
        num_heads=query.shape[1],
        num_kv_heads=key.shape[1],
        head_dim=head_dim,
        scale=float(scale) if scale is not None else head_dim**-0.5,
        sliding_window=int(window) if window else None,
        soft_cap=float(soft_cap) if soft_cap else None,
        causal=bool(getattr(module, "is_causal", True)),
    )


@dataclass
class PagedStep:
    """One step's paged-cache context, handed to the model as ``lmport_paged=``."""

    kv_caches: list[KVCache]
    metadata: AttentionMetadata
    backend_for: Callable[[LayerShape, torch.dtype], AttentionBackend]
    calls: int = 0


@dataclass
class LayerProbe:
    """Records each attention call of a probe forward (one sequence, no cache)."""

    layers: list[LayerShape] = field(default_factory=list)


def _check_supported(module: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} uses attention sinks, which lmport's attention backends do not implement"
        )


def paged_attention_forward(
    module: Any,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ``([1, tokens, heads, head_dim], None)``."""
    _check_supported(module, kwargs)
    step: PagedStep | None = kwargs.get("lmport_paged")
    if step is None:
        probe: LayerProbe | None = kwargs.get("lmport_probe")
        if probe is None:
            raise RuntimeError(
                "this model was loaded for lmport's paged cache: call it through HFCausalLMAdapter, "
                "not directly (its attention needs the step's KV cache)"
            )
        shape = describe_layer(module, query, key, kwargs)
        probe.layers.append(shape)
        return single_sequence_attention(query, key, value, shape), None
    shape = describe_layer(module, query, key, kwargs)
    step.calls += 1
    backend = step.backend_for(shape, query.dtype)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, head_dim]
    out = backend.forward(q, k, v, step.kv_caches[shape.layer_index], step.metadata)
    return out.unsqueeze(0), None


def single_sequence_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """Plain attention of one uncached sequence (the probe's reference), ``[1, tokens, heads, head_dim]``."""
    group = shape.num_heads // shape.num_kv_heads
    q = query[0].float()
    k = key[0].float().repeat_interleave(group, dim=0)
    v = value[0].float().repeat_interleave(group, dim=0)
    scores = q @ k.transpose(1, 2) * shape.scale
    if shape.soft_cap:
        scores = shape.soft_cap * torch.tanh(scores / shape.soft_cap)
    positions = torch.arange(q.shape[1], device=q.device)
    distance = positions[:, None] - positions[None, :]
    allowed = distance >= 0 if shape.causal else torch.ones_like(distance, dtype=torch.bool)
    if shape.sliding_window:
        allowed = allowed & (distance < shape.sliding_window)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ v).transpose(0, 1).unsqueeze(0).to(query.dtype)


def register_paged_attention() -> str:
    """Register :func:`paged_attention_forward` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
    return PAGED_ATTENTION
