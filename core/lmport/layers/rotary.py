"""Rotary position embeddings (RoPE), with every scaling variant ``transformers`` knows.

Frequencies come from ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (linear,
dynamic, yarn, longrope, llama3 ...), so a checkpoint's ``rope_scaling`` means here exactly
what it means there. The config's spelling differs by version: transformers 5.x keeps
everything in ``config.rope_parameters``; 4.x has ``rope_theta`` plus an optional
``config.rope_scaling`` dict (and GPT-NeoX's ``rotary_emb_base``/``rotary_pct``).

Gemma 3 gives each layer type its own settings (``layer_type``): 5.x nests them in
``rope_parameters`` by type; 4.x keeps the global layers' in ``rope_theta``/``rope_scaling`` and
gives the sliding layers plain RoPE of base ``rope_local_base_freq``.

cos/sin are computed once per forward for the whole flat batch and shared by all layers.
Two variants depend on the sequence length (HF recomputes them from ``max(position) + 1``
of the forward): dynamic NTK and longrope. Here that length is taken per sequence from the
batch metadata, so each sequence of a packed batch sees what it would see alone in HF.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmport.layers.attention import AttentionMetadata

# rope types whose frequencies depend on the current sequence length
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The config's RoPE settings as one dict with ``rope_type`` and ``rope_theta``, any version."""
    params = getattr(config, "rope_parameters", None)
    if layer_type is not None and isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])  # transformers 5.x, per layer type
    elif layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None):
        params = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}  # 4.x Gemma 3
    elif isinstance(params, dict) and params and "rope_theta" in params:  # transformers 5.x
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        theta = getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", None) or 10000.0
        params.setdefault("rope_theta", theta)
        partial = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "su":  # Phi-3's early name for LongRoPE
        params["rope_type"] = "longrope"
    return params


def default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


class RotaryEmbedding(nn.Module):
    """RoPE over the first ``rotary_dim`` channels of each head, rotate-half (GPT-NeoX) style.

    ``cos_sin(positions, metadata)`` is called once per model forward; :func:`apply_rotary`
    rotates each layer's queries and keys with it. Frequencies are float32 and kept off the parameter
    list, so ``model.to(bfloat16)`` does not round them.
    """

    def __init__(self, config: Any, head_dim: int, rotary_dim: int | None = None, layer_type: str | None = None):
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.params = rope_parameters(config, layer_type)
        # transformers' init functions take the layer type where the config nests settings by it
        nested = isinstance(getattr(config, "rope_parameters", None), dict) and layer_type in config.rope_parameters
        self._init_kwargs = {"layer_type": layer_type} if nested else {}
        self.rope_type: str = self.params["rope_type"]
        if rotary_dim is None:
            rotary_dim = int(head_dim * self.params.get("partial_rotary_factor", 1.0))
        self.rotary_dim = rotary_dim
        self.inv_freq, self.attention_scaling = self._frequencies(None)
        # HF's threshold beyond which dynamic/longrope frequencies change
        original = config.max_position_embeddings
        if self.rope_type == "longrope":
            original = (
                self.params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None)
                or original
            )
        self.original_max_positions = int(original)
        self._by_seq_len: dict[int, torch.Tensor] = {}

    def _frequencies(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            return default_inv_freq(self.rotary_dim, self.params["rope_theta"]).to("cpu"), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope type '{self.rope_type}' (transformers knows {sorted(ROPE_INIT_FUNCTIONS)})")
        kwargs = dict(self._init_kwargs) if seq_len is None else {"seq_len": seq_len, **self._init_kwargs}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, torch.device("cpu"), **kwargs)
        if inv_freq.numel() * 2 != self.rotary_dim:
            raise ValueError(f"rope '{self.rope_type}' gave {inv_freq.numel()} frequencies for rotary_dim {self.rotary_dim}")
        return inv_freq.float(), float(scaling)

    def _inv_freq_for_length(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if seq_len <= self.original_max_positions:
            return self.inv_freq.to(device)
        if self.rope_type == "longrope":  # one "long" set beyond the original length
            seq_len = self.original_max_positions + 1
        if seq_len not in self._by_seq_len:
            self._by_seq_len[seq_len] = self._frequencies(seq_len)[0]
        return self._by_seq_len[seq_len].to(device)

    def cos_sin(self, positions: torch.Tensor, metadata: AttentionMetadata | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_tokens, rotary_dim]`` cos and sin (float32) for ``positions``."""
        device = positions.device
        if self.rope_type in _LENGTH_DEPENDENT and metadata is not None and metadata.max_seq_len > self.original_max_positions:
            starts = metadata.query_start_loc_host
            per_seq = [
                self._inv_freq_for_length(seq_len, device).expand(starts[i + 1] - starts[i], -1)
                for i, seq_len in enumerate(metadata.seq_lens_host)
            ]
            inv_freq = torch.cat(per_seq)  # [num_tokens, rotary_dim / 2]
        else:
            if self.inv_freq.device != device:
                self.inv_freq = self.inv_freq.to(device)
            inv_freq = self.inv_freq[None, :]
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``[num_tokens, heads * head_dim]`` queries and keys by ``RotaryEmbedding.cos_sin``'s output.

    The first ``cos.shape[-1]`` channels of each head rotate; the rest pass through (partial rotary).
    """
    return _rotate(query, cos, sin, head_dim), _rotate(key, cos, sin, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    tokens = x.shape[0]
    rotary_dim = cos.shape[-1]
    x = x.view(tokens, -1, head_dim)
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    if keep.shape[-1]:
        out = torch.cat((out, keep), dim=-1)
    return out.reshape(tokens, -1)
