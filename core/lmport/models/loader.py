"""Build a native model for a checkpoint through the registry and the active backend's hooks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmport.layers.linear import UNQUANTIZED, Linear
from lmport.distributed import UNSHARDED, ShardInfo
from lmport.layers.ops import bind_layer_ops
from lmport.layers.parallel import sharding
from lmport.layers.quantization.config import QuantizationConfig
from lmport.models.base import CausalLM, ModelContext, ModelInfo
from lmport.models.registry import ModelRegistry
from lmport.models.resolve import resolve_model_info as _resolve_model_info

log = logging.getLogger(__name__)

# the native families whose layers split over tensor-parallel ranks (``supports_sharding``)
SHARDED_FAMILIES = "Llama, Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Granite, Gemma 2, Gemma 3"


def model_registry(host) -> ModelRegistry:
    registry = ModelRegistry()
    host.register_models(registry)
    return registry


def resolve_model_info(path: str | Path, trust_remote_code: bool = False) -> ModelInfo:
    """The :class:`ModelInfo` of a checkpoint folder or ``.gguf`` (see :mod:`lmport.models.resolve`)."""
    return _resolve_model_info(str(path), trust_remote_code=trust_remote_code)


def build_native_model(
    info: ModelInfo,
    host,
    dtype: torch.dtype,
    device: torch.device,
    registry: ModelRegistry | None = None,
    *,
    quant_method=None,
    quantization: QuantizationConfig | None = None,
    shard: ShardInfo = UNSHARDED,
) -> CausalLM | None:
    """The native model for ``info`` with weights loaded, or ``None`` if no family claims it.

    A GGUF checkpoint is dequantized once into a safetensors cache (:mod:`lmport.models.gguf_weights`)
    and loaded from there like any other. ``quant_method`` (the registered format, checked against
    the backend) and ``quantization`` (its parsed config, see :mod:`lmport.layers.quantization.detect`):
    ``None`` for unquantized. ``shard``: this process's tensor-parallel rank (its layers hold
    their slices and reduce through ``shard.comm``); a family without sharded layers, or a
    quantized checkpoint, refuses more than one shard.
    """
    registry = registry or model_registry(host)
    entry = registry.get(info.architecture)
    if entry is None:
        return None
    weights_path = info.path
    if info.gguf_file:
        from lmport.models.gguf_weights import dequantized_checkpoint

        weights_path = dequantized_checkpoint(info, dtype)
    context = ModelContext(
        dtype=dtype,
        device=device,
        capabilities=host.capabilities(),
        attention_factory=host.attention_backend,
        quantization=quantization,
    )
    if shard.sharded and quantization is not None:
        raise ValueError(f"--num-shard {shard.world_size}: quantized checkpoints ({quantization.describe()}) do not shard yet")
    with torch.device(device), sharding(shard):
        model = entry.builder(info.hf_config, context)  # parameters are allocated, not yet written
        if shard.sharded and not getattr(model, "supports_sharding", False):
            raise ValueError(
                f"--num-shard {shard.world_size}: the {type(model).__name__} family ({info.architecture}) has no "
                f"tensor-parallel layers yet; run it with one shard (sharded: {SHARDED_FAMILIES})"
            )
        if quantization is not None:
            leave_ignored_modules_unquantized(model, quantization)
    model.to(dtype=dtype)
    # fused per-layer ops of the active backend (the reference on cpu or --disable-custom-kernels)
    bind_layer_ops(model, host.layer_ops())
    loader = host.weights_loader(quant_method)
    model.load_weights(loader.iter_weights(weights_path, dtype, device))
    return model.eval()


def leave_ignored_modules_unquantized(model: torch.nn.Module, quantization: QuantizationConfig) -> None:
    """Layers the checkpoint's config lists as not quantized (``ignore``, ``modules_to_not_convert``) go back to full precision."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.method is not UNQUANTIZED and quantization.ignores(name):
            module.set_method(UNQUANTIZED)
