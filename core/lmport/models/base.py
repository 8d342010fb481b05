"""The contract every native model implements, and what it is built with."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lmport.capabilities import Capabilities
from lmport.layers.attention import Attention, AttentionBackend, AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.quantization.config import QuantizationConfig


@dataclass(frozen=True)
class ModelInfo:
    """A resolved checkpoint: where it lies and what its config says."""

    model_id: str
    path: Path
    hf_config: Any  # transformers.PretrainedConfig
    architecture: str
    gguf_file: str | None = None


@dataclass(frozen=True)
class ModelContext:
    """Everything a builder needs besides the Hugging Face config.

    ``quantization``: the checkpoint's format, ``None`` when unquantized; pass it to every
    :class:`~lmport.layers.linear.Linear` (``quant=ctx.quantization``).
    """

    dtype: torch.dtype
    device: torch.device
    capabilities: Capabilities
    attention_factory: Callable[[AttentionSpec], AttentionBackend]
    quantization: QuantizationConfig | None = None

    def attention(self, spec: AttentionSpec, layer_index: int, kv_group: int = 0) -> Attention:
        return Attention(spec, self.attention_factory(spec), layer_index, kv_group)

    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


class CausalLM(nn.Module, ABC):
    """A decoder-only model on the paged KV cache.

    ``forward`` takes the step's flat batch and returns hidden states for every token;
    the runner then calls ``compute_logits`` only on the rows it needs (the last token of each
    sequence, or every prompt token when prompt logprobs are asked for).
    """

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        ...

    @abstractmethod
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` -> float32 ``[n, vocab]``."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consume checkpoint tensors by their Hugging Face names."""

    @abstractmethod
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)`` of the paged cache this model needs."""


class ImageTextLM(CausalLM):
    """A :class:`CausalLM` whose prompts may carry images (Llava-next).

    The runner calls :meth:`encode_images` once per sequence, at the first prefill chunk that
    feeds an image token, writes the features over those tokens' embeddings (from
    :meth:`embed_input_ids`) and passes them to ``forward`` as ``inputs_embeds``.
    """

    @abstractmethod
    def encode_images(self, images: Any) -> torch.Tensor:
        """An :class:`~lmport.engine.api.ImageInputs` -> ``[image tokens, hidden]``: the features
        of every image span, in order, in the model's dtype."""

    @abstractmethod
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[num_tokens]`` -> ``[num_tokens, hidden]`` token embeddings."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,  # used instead of embedding ``input_ids``
    ) -> torch.Tensor: ...


@dataclass
class EncoderBatch:
    """The encoder's share of a step: the inputs of the sequences encoded this step, packed flat.

    Sequence ``i`` of it owns cross positions ``query_start_loc_host[i]:query_start_loc_host[i+1]``
    (T5: ``input_ids`` of that range, its encoder's tokens); ``slot_mapping`` gives, per cross
    position, the slot of its K/V in the cross group's cache. ``inputs`` are those sequences'
    ``encoder_input`` as they are (T5: token lists; Idefics: their ``ImageInputs``).
    """

    input_ids: torch.Tensor  # int64 [num_encoder_tokens]; empty where the inputs are not tokens
    slot_mapping: torch.Tensor  # int64 [num_cross_positions]
    query_start_loc_host: list[int]
    inputs: list[Any] = field(default_factory=list)


class EncoderDecoderLM(CausalLM):
    """An encoder-decoder model on the paged cache (T5).

    The request's prompt is the encoder's input (``prepare_sequence`` moves it to
    ``seq.encoder_input``; the sequence's own tokens are the decoder's, from its start token).
    ``kv_cache_specs()`` declares the decoder's self-attention group and a cross-attention
    group of the encoder's length per request. ``forward`` takes an ``encoder`` batch on steps
    where sequences start: it encodes them and writes every decoder layer's cross K/V once;
    decode steps have none (and can be replayed from a graph).

    The same contract serves a decoder whose cross-attention reads images (Idefics): its
    ``prepare_sequence`` leaves the prompt in place, makes the request's images the encoder's
    input (``accepts_images = True``) and sets ``seq.cross_key_ranges``, the cross positions
    each prompt token attends (its cross specs have ``key_ranges``).
    """

    accepts_images: bool = False  # the encoder's input is the request's images (Idefics)

    @abstractmethod
    def kv_cache_specs(self) -> list[Any]: ...

    @abstractmethod
    def prepare_sequence(self, seq: Any) -> None: ...

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        encoder: EncoderBatch | None = None,
    ) -> torch.Tensor: ...


ModelBuilder = Callable[[Any, ModelContext], CausalLM]
