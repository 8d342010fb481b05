"""Hooks of the Gaudi backend (entry point ``gaudi`` in ``lmport.backends``).

Gaudi compiles a graph per input shape, so it wants static shapes and a fixed KV block size;
it asks for that through ``lmport_adjust_config``. The model runs through optimum-habana's
Gaudi model classes in HPU graphs (``lmport_model_executor`` -> :mod:`lmport_gaudi.executor`),
bf16 unless ``--dtype`` says otherwise, at bucketed static shapes warmed up at start.
"""

from __future__ import annotations

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.config import ConfigAdjustment

NAME = "gaudi"
PRIORITY = 90
BLOCK_SIZE = 128  # optimum-habana's paged cache block; HPU graphs are compiled for it
HL_SMI_QUERY = ["hl-smi", "-Q", "name,memory.total", "-f", "csv,noheader"]


@hookimpl
def lmport_detect_backend(env):
    if not env.module_available("habana_frameworks"):
        return None
    output = env.run(HL_SMI_QUERY) or ""
    cards = [line.split(",")[0].strip() for line in output.splitlines() if line.strip()]
    if not cards:
        return None
    return BackendInfo(
        name=NAME,
        device_type="hpu",
        priority=PRIORITY,
        description=f"{len(cards)} x Gaudi {', '.join(sorted(set(cards)))}",
        details=(
            ("cards", tuple(cards)),
            ("device_count", len(cards)),
            ("optimum_habana", env.distribution_version("optimum-habana")),
        ),
    )


@hookimpl
def lmport_capabilities(backend: BackendInfo) -> Capabilities | None:
    if backend.name != NAME:
        return None
    return Capabilities(
        backend=NAME,
        device_type="hpu",
        dtypes=("bfloat16", "float32"),
        paged_attention=False,
        static_shapes=True,
        whole_model_executor=True,
        graph_capture=False,
        kv_block_sizes=(BLOCK_SIZE,),
        notes=(
            "whole models through optimum-habana (adapt_transformers_to_gaudi, Gaudi model classes, HPU graphs), "
            "bf16 by default",
            "static shapes: batch and length buckets (GaudiGenerationConfig.bucket_size), warmed up at start",
            "no KV cache is reused between steps in this release: each step recomputes the sequences it samples",
            "tested against stand-in optimum-habana / habana_frameworks modules on the CPU; never run on a Gaudi",
        ),
    )


@hookimpl
def lmport_adjust_config(config, capabilities):
    if capabilities.backend != NAME:
        return None
    changes: dict = {}
    reasons = []
    if config.block_size != BLOCK_SIZE:
        changes["block_size"] = BLOCK_SIZE
        reasons.append(f"Gaudi compiles graphs per shape: KV blocks are fixed at {BLOCK_SIZE} tokens (static shapes)")
    if config.enable_prefix_caching:
        changes["enable_prefix_caching"] = False
        reasons.append("the optimum-habana model keeps no core KV blocks: the prefix cache cannot feed it")
    if not changes:
        return None
    return ConfigAdjustment(changes=changes, reason="; ".join(reasons), plugin=NAME)


@hookimpl
def lmport_model_executor(model, config, capabilities):
    if capabilities.backend != NAME:
        return None
    import torch

    from lmport_gaudi.executor import DEFAULT_BUCKET_SIZE, GaudiExecutor, hpu_device, load_gaudi_model

    dtype = {"float32": torch.float32, "fp32": torch.float32}.get(config.dtype or "", torch.bfloat16)
    device = hpu_device()
    bucket = int(dict(config.extra).get("gaudi_bucket_size", DEFAULT_BUCKET_SIZE))
    loaded = load_gaudi_model(str(model.path), dtype, device, bucket)
    return GaudiExecutor(loaded, config, device, getattr(model.hf_config, "max_position_embeddings", None),
                         bucket_size=bucket, block_size=BLOCK_SIZE)
