"""Which quantization a checkpoint uses: its ``quantization_config`` (or ``quantize_config.json``), or ``--quantize``.

:func:`resolve_quantization` returns the registered format name (what the backend's capability
check uses) and the :class:`~lmport.layers.quantization.config.QuantizationConfig` the model's
``Linear`` layers are built with. ``--quantize`` follows TGI's values: ``gptq``, ``awq``,
``marlin`` (a GPTQ or AWQ checkpoint on the fast int4 kernel), ``fp8`` (an fp8 checkpoint, or an
unquantized one quantized at load), ``eetq``, ``bitsandbytes``, ``bitsandbytes-nf4``,
``bitsandbytes-fp4`` (unquantized checkpoints quantized at load), ``compressed-tensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmport.layers.quantization.config import QuantizationConfig

AT_LOAD = ("eetq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
# a checkpoint's quant_method -> the format name lmport registers it under
CHECKPOINT_FORMATS = {
    "gptq": "gptq",
    "awq": "awq",
    "fp8": "fp8",
    "fbgemm_fp8": "fp8",
    "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
    "bitsandbytes": "bitsandbytes",
    "exl2": "exl2",
}


def checkpoint_quantization(hf_config: Any, path: Path | None) -> dict[str, Any] | None:
    """The checkpoint's own ``quantization_config`` dict (config.json, else quantize_config.json), or ``None``."""
    cfg = getattr(hf_config, "quantization_config", None)
    if cfg is not None and not isinstance(cfg, dict):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    if cfg is None and path is not None and (Path(path) / "quantize_config.json").is_file():
        cfg = json.loads((Path(path) / "quantize_config.json").read_text())
        cfg.setdefault("quant_method", "gptq")  # AutoGPTQ's file names no method
    return cfg


def quantization_format(forced: str | None, hf_config: Any, path: Path | None) -> tuple[str | None, dict[str, Any] | None]:
    """``(format name, the checkpoint's quantization_config)``: the name the backend's capability
    check uses (``None``: unquantized), read before any weight or format detail."""
    cfg = checkpoint_quantization(hf_config, path)
    raw = str(cfg.get("quant_method", "")).lower() if cfg else None
    on_disk = CHECKPOINT_FORMATS.get(raw, raw) if cfg else None
    if cfg and raw == "gptq" and (cfg.get("checkpoint_format") == "marlin" or cfg.get("is_marlin_format")):
        on_disk = "marlin"
    return forced or on_disk, cfg


def resolve_quantization(forced: str | None, hf_config: Any, path: Path | None) -> tuple[str | None, QuantizationConfig | None]:
    """``(format name, config)``; ``(None, None)`` for an unquantized checkpoint served unquantized."""
    name, cfg = quantization_format(forced, hf_config, path)
    return name, (build_quantization_config(name, cfg) if name else None)


def build_quantization_config(name: str, cfg: dict[str, Any] | None) -> QuantizationConfig:
    """The config for serving format ``name`` from a checkpoint whose own quantization is ``cfg``."""
    raw = str(cfg.get("quant_method", "")).lower() if cfg else None
    on_disk = CHECKPOINT_FORMATS.get(raw, raw) if cfg else None
    if cfg and raw == "gptq" and (cfg.get("checkpoint_format") == "marlin" or cfg.get("is_marlin_format")):
        on_disk = "marlin"
    if name in AT_LOAD:
        if on_disk is not None:
            raise ValueError(f"--quantize {name} quantizes an unquantized checkpoint at load; this one is already '{on_disk}'")
        from lmport.layers.quantization.at_load import AtLoadConfig

        return AtLoadConfig(name)
    if name == "fp8" and on_disk is None:
        from lmport.layers.quantization.fp8 import Fp8Config

        return Fp8Config(from_checkpoint=False)
    if on_disk is None:
        raise ValueError(f"--quantize {name} needs a {name} checkpoint (its config.json has no quantization_config)")
    if name == "marlin" and on_disk in ("gptq", "awq"):
        return config_for(on_disk, cfg)  # the same layout on the backend's fast int4 kernel
    if name != on_disk:
        raise ValueError(f"--quantize {name} does not match the checkpoint's quantization '{on_disk}'")
    return config_for(on_disk, cfg)


def config_for(name: str, cfg: dict[str, Any]) -> QuantizationConfig:
    if name == "gptq":
        from lmport.layers.quantization.gptq import GPTQConfig

        return GPTQConfig.from_dict(cfg)
    if name == "awq":
        from lmport.layers.quantization.awq import AWQConfig

        return AWQConfig.from_dict(cfg)
    if name == "fp8":
        from lmport.layers.quantization.fp8 import Fp8Config

        return Fp8Config.from_dict(cfg)
    if name == "compressed-tensors":
        from lmport.layers.quantization.compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig(cfg)
    if name == "bitsandbytes":
        raise ValueError("pre-quantized bitsandbytes checkpoints are not read; serve the unquantized one with --quantize bitsandbytes")
    if name == "marlin":
        raise ValueError("Marlin-serialized GPTQ checkpoints are not read; serve the GPTQ checkpoint with --quantize marlin")
    raise ValueError(f"no reader for '{name}' checkpoints")
