"""Build a native model for a checkpoint through the registry and the active backend's hooks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmport.models.base import CausalLM, ModelContext, ModelInfo
from lmport.models.registry import ModelRegistry

log = logging.getLogger(__name__)


def model_registry(host) -> ModelRegistry:
    registry = ModelRegistry()
    host.register_models(registry)
    return registry


def resolve_model_info(path: str | Path, trust_remote_code: bool = False) -> ModelInfo:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    architectures = getattr(hf_config, "architectures", None) or []
    architecture = architectures[0] if architectures else type(hf_config).__name__
    return ModelInfo(
        model_id=str(path), path=Path(path), hf_config=hf_config, architecture=architecture, gguf_file=_folder_gguf(path)
    )


def _folder_gguf(path: str | Path) -> str | None:
    """The folder's one ``.gguf`` when it has no safetensors/bin weights (lmport.models.resolve
    prepares such folders for GGUF checkpoints: config + tokenizer + a link to the file)."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return None
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0].name if len(ggufs) == 1 else None


def build_native_model(
    info: ModelInfo, host, dtype: torch.dtype, device: torch.device, registry: ModelRegistry | None = None
) -> CausalLM | None:
    """The native model for ``info`` with weights loaded, or ``None`` if no family claims it."""
    registry = registry or model_registry(host)
    entry = registry.get(info.architecture)
    if entry is None:
        return None
    context = ModelContext(
        dtype=dtype, device=device, capabilities=host.capabilities(), attention_factory=host.attention_backend
    )
    with torch.device(device):
        model = entry.builder(info.hf_config, context)
    model.to(dtype=dtype)
    loader = host.weights_loader(None)
    model.load_weights(loader.iter_weights(info.path, dtype, device))
    return model.eval()
