"""Hooks of the Neuron backend (entry point ``neuron`` in ``lmport.backends``).

Neuron compiles the whole model ahead of time for fixed shapes, so this backend runs through
``lmport_model_executor``: optimum-neuron's compiled ``NeuronModelForCausalLM``
(:mod:`lmport_neuron.executor`, loaded or exported by :mod:`lmport_neuron.loading`). The
engine plans fixed slots (no continuous batching across the compiled batch's rows) and the
prefix cache is off (the compiled model keeps its own KV cache).
"""

from __future__ import annotations

import json

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.config import ConfigAdjustment

NAME = "neuron"
PRIORITY = 80


def count_devices(env) -> int:
    """Neuron devices from ``/dev/neuron*``, else from ``neuron-ls --json-output``."""
    devices = env.glob("/dev/neuron*")
    if devices:
        return len(devices)
    output = env.run(["neuron-ls", "--json-output"])
    try:
        return len(json.loads(output)) if output else 0
    except ValueError:
        return 0


@hookimpl
def lmport_detect_backend(env):
    if not env.module_available("torch_neuronx"):
        return None
    count = count_devices(env)
    if count == 0:
        return None
    return BackendInfo(
        name=NAME,
        device_type="xla",  # torch-neuronx runs through torch-xla devices
        priority=PRIORITY,
        description=f"{count} x AWS Neuron device",
        details=(
            ("device_count", count),
            ("torch_neuronx", env.distribution_version("torch-neuronx")),
            ("optimum_neuron", env.distribution_version("optimum-neuron")),
        ),
    )


@hookimpl
def lmport_capabilities(backend: BackendInfo) -> Capabilities | None:
    if backend.name != NAME:
        return None
    return Capabilities(
        backend=NAME,
        device_type="xla",
        dtypes=("bfloat16", "float16", "float32"),
        static_shapes=True,
        whole_model_executor=True,
        continuous_batching=False,
        notes=(
            "whole compiled models through optimum-neuron 0.4 (NeuronModelForCausalLM): an exported folder, "
            "or exported at start",
            "continuous batching inside the compiled batch: one slot per batch row, prefill into free slots "
            "while the others pause",
            "--max-batch-size / --max-total-tokens are checked against the compiled shape at start",
            "tested against stand-in optimum-neuron / torch_neuronx modules on the CPU; never run on an Inferentia2",
        ),
    )


@hookimpl
def lmport_adjust_config(config, capabilities):
    if capabilities.backend != NAME or not config.enable_prefix_caching:
        return None
    return ConfigAdjustment(
        changes={"enable_prefix_caching": False},
        reason="the compiled Neuron model keeps its own KV cache per slot: the core's prefix cache cannot feed it",
        plugin=NAME,
    )


@hookimpl
def lmport_model_executor(model, config, capabilities):
    if capabilities.backend != NAME:
        return None
    from lmport_neuron.executor import NeuronExecutor
    from lmport_neuron.loading import load_neuron_model

    compiled = load_neuron_model(model.path, config, getattr(model.hf_config, "max_position_embeddings", None))
    return NeuronExecutor(compiled, config, block_size=config.block_size or capabilities.default_block_size)
