"""Hooks of the Gaudi backend (entry point ``gaudi`` in ``lmport.backends``).

Gaudi compiles a graph per input shape, so it wants static shapes and a fixed KV block size;
it asks for that through ``lmport_adjust_config``. Whole-model execution through
optimum-habana (``lmport_model_executor``) is not implemented in this release: the hook is
absent and ``Capabilities.whole_model_executor`` is ``False``.
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
        whole_model_executor=False,
        graph_capture=False,
        kv_block_sizes=(BLOCK_SIZE,),
        notes=(
            "whole-model execution through optimum-habana is not implemented in this release",
            "no HPU attention kernel is bound: the core's reference path would run on the HPU, untested",
        ),
    )


@hookimpl
def lmport_adjust_config(config, capabilities):
    if capabilities.backend != NAME or config.block_size == BLOCK_SIZE:
        return None
    return ConfigAdjustment(
        changes={"block_size": BLOCK_SIZE},
        reason=f"Gaudi compiles graphs per shape: KV blocks are fixed at {BLOCK_SIZE} tokens (static shapes)",
        plugin=NAME,
    )
