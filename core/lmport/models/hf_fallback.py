"""Serve an architecture lmport has no native module for, through transformers, on the paged cache.

The checkpoint loads with ``AutoModelForCausalLM`` and lmport's registered attention function
(:mod:`lmport.models.hf_attention`). :class:`HFCausalLMAdapter` then runs the engine's flat
batch as one row of ``input_ids`` with per-token ``position_ids``, and hands the step's KV
cache and metadata down through the forward kwargs, so every attention layer writes to and
reads from the paged cache through the active backend. The scheduler, prefix cache, chunked
prefill and continuous batching all work as for a native model; what is lost is the native
models' fused kernels and CUDA-graph friendliness.

At load a short probe learns the cache shape from the layers themselves (explicit
``head_dim``, GQA, layers per model) and checks the paged path's logits against transformers'
own forward, so an architecture whose attention or logits this adapter gets wrong fails at
startup rather than serving wrong text.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Iterable

import torch

from lmport.executor import ModelExecutor
from lmport.layers.attention import AttentionBackend, AttentionMetadata, AttentionSpec, KVCache, KVCacheSpec
from lmport.models.base import CausalLM, ModelInfo
from lmport.models.hf_attention import LayerProbe, LayerShape, PagedStep, register_paged_attention

log = logging.getLogger(__name__)

PROBE_TOKENS = 6
# relative L2 error allowed between the paged path and transformers' forward at load
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    # transformers 5 renamed ``torch_dtype`` to ``dtype`` (4.56+ takes both)
    return {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}


def checkpoint_kwargs(info: ModelInfo, dtype: torch.dtype, trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``info``'s checkpoint (GGUF through ``gguf_file``).

    The config ``info`` already holds is passed on: without it transformers reads it again,
    and for a GGUF that re-parses the whole file (~15 s of ~40 for Gemma-3 270M on 2 cores).
    """
    from transformers import PretrainedConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **dtype_kwarg(dtype)}
    if isinstance(info.hf_config, PretrainedConfig):
        kwargs["config"] = info.hf_config  # from_pretrained copies it; info's stays untouched
    if info.gguf_file:
        kwargs["gguf_file"] = info.gguf_file
    return kwargs


class HFCausalLMAdapter(CausalLM):
    """A transformers ``*ForCausalLM`` behind lmport's :class:`CausalLM` contract."""

    def __init__(self, hf_model: Any, host: Any, layers: list[LayerShape] | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.backbone = hf_model.base_model  # returns final hidden states (final norm applied)
        if self.backbone is hf_model:
            raise NotImplementedError(f"{type(hf_model).__name__} has no base model apart from its LM head")
        self.lm_head = hf_model.get_output_embeddings()
        self.text_config = hf_model.config.get_text_config()
        self._attention_factory = host.attention_backend
        self._backends: dict[tuple[LayerShape, torch.dtype], AttentionBackend] = {}
        self.layers = layers if layers is not None else probe_layers(hf_model)

    # ------------------------------------------------------------------ contract

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        step = PagedStep(kv_caches, metadata, self._backend)
        out = self.backbone(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False, return_dict=True, lmport_paged=step
        )
        if step.calls != len(self.layers):
            raise RuntimeError(f"{step.calls} attention layers used the paged cache, expected {len(self.layers)}")
        return out.last_hidden_state[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        return postprocess_logits(logits, self.text_config).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Weights come with ``from_pretrained``; this copies any given tensors over by HF name."""
        params = dict(self.hf_model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise KeyError(f"{name} is not a parameter of {type(self.hf_model).__name__}")
                params[name].copy_(tensor)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        first = self.layers[0]
        return len(self.layers), first.num_kv_heads, first.head_dim

    # ------------------------------------------------------------------ internals

    def _backend(self, shape: LayerShape, dtype: torch.dtype) -> AttentionBackend:
        key = (shape, dtype)
        backend = self._backends.get(key)
        if backend is None:
            spec = AttentionSpec(
                num_heads=shape.num_heads,
                num_kv_heads=shape.num_kv_heads,
                head_dim=shape.head_dim,
                scale=shape.scale,
                dtype=str(dtype).removeprefix("torch."),
                sliding_window=shape.sliding_window,
                logits_soft_cap=shape.soft_cap,
                causal=shape.causal,
            )
            backend = self._backends[key] = self._attention_factory(spec)
        return backend


def postprocess_logits(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """What transformers' ``*ForCausalLM.forward`` does after the LM head, for the families that
    do something: Gemma 2/3's final soft-cap, Cohere's ``logit_scale``, Granite's ``logits_scaling``.
    (The load-time probe catches a family that does something else.)"""
    soft_cap = getattr(config, "final_logit_softcapping", None)
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    logit_scale = getattr(config, "logit_scale", None)
    if logit_scale is not None and not isinstance(logit_scale, bool):
        logits = logits * logit_scale
    logits_scaling = getattr(config, "logits_scaling", None)
    if logits_scaling:
        logits = logits / logits_scaling
    return logits


def _probe_ids(hf_model: Any) -> torch.Tensor:
    vocab = hf_model.get_output_embeddings().weight.shape[0]
    device = hf_model.get_output_embeddings().weight.device
    return (torch.arange(PROBE_TOKENS, device=device) * 7 + 3) % vocab


@torch.inference_mode()
def probe_layers(hf_model: Any) -> list[LayerShape]:
    """Every attention layer's shape, in layer order, from one short uncached forward."""
    ids = _probe_ids(hf_model)
    probe = LayerProbe()
    hf_model.base_model(
        input_ids=ids[None], position_ids=torch.arange(len(ids), device=ids.device)[None], use_cache=False, lmport_probe=probe
    )
    layers = sorted(probe.layers, key=lambda s: s.layer_index)
    if not layers:
        raise RuntimeError(
            f"{type(hf_model).__name__} never called transformers' attention interface: "
            "it cannot run on the paged cache (its remote code may predate AttentionInterface)"
        )
    if [s.layer_index for s in layers] != list(range(len(layers))):
        raise RuntimeError(f"{type(hf_model).__name__}: attention layers {[s.layer_index for s in layers]} are not 0..n-1")
    if len({(s.num_kv_heads, s.head_dim) for s in layers}) != 1:
        raise NotImplementedError(f"{type(hf_model).__name__}: attention layers differ in KV heads or head size")
    return layers


def _one_sequence_metadata(cached: int, new: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """Metadata for one sequence in blocks 1, 2, ... (block 0 unused) with ``cached`` tokens in cache."""
    total = cached + new
    num_blocks = -(-total // block_size)
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, new], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([total], dtype=torch.int32, device=device),
        block_tables=torch.arange(1, num_blocks + 1, dtype=torch.int32, device=device)[None],
        slot_mapping=torch.arange(cached, total, dtype=torch.int64, device=device) + block_size,
        query_start_loc_host=[0, new],
        seq_lens_host=[total],
        max_query_len=new,
        max_seq_len=total,
        block_size=block_size,
    )


@torch.inference_mode()
def check_against_transformers(adapter: HFCausalLMAdapter, host: Any, dtype: torch.dtype, device: torch.device) -> float:
    """Run the probe through transformers' own forward (with the probe's plain attention) and
    through the paged path in two chunks (so positions past the cache start are exercised too);
    return the relative error of the logits, raising when it is large."""
    ids = _probe_ids(adapter.hf_model)
    positions = torch.arange(len(ids), device=ids.device)
    expected = adapter.hf_model(
        input_ids=ids[None], position_ids=positions[None], use_cache=False, lmport_probe=LayerProbe()
    ).logits[0].float()

    num_layers, num_kv_heads, head_dim = adapter.kv_cache_shape()
    block_size = host.capabilities().default_block_size
    num_blocks = -(-len(ids) // block_size) + 1
    kv_caches = host.allocate_kv_cache(KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size, dtype), num_blocks, device)
    split = len(ids) // 2
    chunks = []
    for begin, end in ((0, split), (split, len(ids))):
        metadata = _one_sequence_metadata(begin, end - begin, block_size, device)
        chunks.append(adapter.compute_logits(adapter(ids[begin:end], positions[begin:end], kv_caches, metadata)))
    got = torch.cat(chunks)
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-6))
    if not error <= _PROBE_TOLERANCE.get(dtype, 6e-2):
        raise RuntimeError(
            f"the transformers fallback disagrees with transformers' own forward for "
            f"{type(adapter.hf_model).__name__} (relative logit error {error:.2e}); this architecture needs a native module"
        )
    return error


# Image-text architectures (TGI serves them with their images). The transformers fallback has no
# image input path: those with a native module (Llava-next) are built natively, the rest refused.
IMAGE_TEXT_ARCHITECTURES = frozenset({
    "IdeficsForVisionText2Text",
    "Idefics2ForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
})


def refuse_image_text_model(info: ModelInfo) -> None:
    """Raise, naming the architecture, for an image-text checkpoint: one of
    :data:`IMAGE_TEXT_ARCHITECTURES`, or any config with a ``vision_config`` that
    ``AutoModelForCausalLM`` does not take (and no remote code claims). Without this the
    user gets transformers' "Unrecognized configuration class" with a list of 200 classes."""
    config = info.hf_config
    multimodal = info.architecture in IMAGE_TEXT_ARCHITECTURES
    if not multimodal and getattr(config, "vision_config", None) is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        auto_map = getattr(config, "auto_map", None) or {}
        multimodal = config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in auto_map
    if multimodal:
        raise NotImplementedError(
            f"{info.architecture} ({config.model_type}) is an image-text model without a native lmport module "
            "(image inputs are served natively for LlavaNextForConditionalGeneration only): it is refused rather "
            "than served without its images"
        )


def load_fallback(
    info: ModelInfo, host: Any, dtype: torch.dtype, device: torch.device, trust_remote_code: bool
) -> CausalLM | ModelExecutor:
    """Load ``info``'s checkpoint with transformers.

    A decoder-only model (``AutoModelForCausalLM``) comes back as a :class:`CausalLM` on the
    paged cache; an encoder-decoder one as :class:`~lmport.models.hf_seq2seq.HFSeq2SeqExecutor`.
    GGUF checkpoints load dequantized through ``gguf_file``. Raises when a decoder-only model
    cannot run on the paged cache.
    """
    from transformers import AutoModelForCausalLM

    refuse_image_text_model(info)
    if getattr(info.hf_config, "is_encoder_decoder", False):
        from lmport.models.hf_seq2seq import load_seq2seq

        return load_seq2seq(info, host, dtype, device, trust_remote_code)
    kwargs = {"attn_implementation": register_paged_attention(), **checkpoint_kwargs(info, dtype, trust_remote_code)}
    if device.type != "cpu" and (_transformers_major() >= 5 or importlib.util.find_spec("accelerate")):
        kwargs["device_map"] = str(device)  # load straight onto the device, not through host memory
    hf_model = AutoModelForCausalLM.from_pretrained(str(info.path), **kwargs)
    hf_model.to(device).eval()
    adapter = HFCausalLMAdapter(hf_model, host).eval()
    check_against_transformers(adapter, host, dtype, device)
    num_layers, num_kv_heads, head_dim = adapter.kv_cache_shape()
    log.warning(
        "%s runs through the transformers fallback (AutoModelForCausalLM on the paged KV cache: "
        "%d layers, %d KV heads, head_dim %d); it works, but it is not optimized",
        info.architecture, num_layers, num_kv_heads, head_dim,
    )
    return adapter
