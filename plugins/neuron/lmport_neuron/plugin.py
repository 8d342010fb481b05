"""Hooks of the Neuron backend (entry point ``neuron`` in ``lmport.backends``).

Neuron compiles the whole model ahead of time for fixed shapes, so this backend can only run
through ``lmport_model_executor`` (optimum-neuron's compiled models), which is not
implemented in this release: the hook is absent and the flag is off.
"""

from __future__ import annotations

import json

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities

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
        dtypes=("bfloat16", "float16"),
        static_shapes=True,
        whole_model_executor=False,
        continuous_batching=False,
        notes=(
            "Neuron runs whole compiled models; the optimum-neuron executor is not implemented in this release",
            "no model can be served on this backend yet",
        ),
    )
