"""Loading a Neuron model with optimum-neuron 0.4: an exported folder, or an export at start.

optimum-neuron 0.4's API for LLMs: a folder that holds a compiled model (``neuron_config.json``
beside the weights) loads with ``NeuronModelForCausalLM.from_pretrained(path)``; a plain
Transformers checkpoint is exported (compiled) first with
``NeuronModelForCausalLM.get_neuron_config(path, batch_size=, sequence_length=,
tensor_parallel_size=)`` then ``NeuronModelForCausalLM.export(path, neuron_config,
load_weights=True)``. The older ``from_pretrained(export=True, batch_size=..., num_cores=...)``
arguments are gone for LLMs. Compiling takes minutes on real hardware: it is announced before
it starts and timed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NEURON_CONFIG_FILE = "neuron_config.json"
DEFAULT_BATCH_SIZE = 4
DEFAULT_SEQUENCE_LENGTH = 4096


def is_exported(path: str | Path) -> bool:
    return (Path(path) / NEURON_CONFIG_FILE).is_file()


def export_shape(config: Any, max_positions: int | None) -> tuple[int, int, int]:
    """``(batch_size, sequence_length, tensor_parallel_size)`` to compile for, from the launch flags."""
    batch = config.max_batch_size or DEFAULT_BATCH_SIZE
    length = config.max_total_tokens or min(DEFAULT_SEQUENCE_LENGTH, max_positions or DEFAULT_SEQUENCE_LENGTH)
    return batch, length, max(1, config.num_shard)


def load_neuron_model(path: str | Path, config: Any, max_positions: int | None = None) -> Any:
    """The compiled model for ``path``: loaded if exported, else exported now (announced, timed)."""
    from optimum.neuron import NeuronModelForCausalLM

    if is_exported(path):
        log.info("neuron: loading the compiled model in %s", path)
        return NeuronModelForCausalLM.from_pretrained(str(path))
    batch, length, tp = export_shape(config, max_positions)
    log.warning(
        "neuron: %s is not exported: compiling it now for batch_size=%d, sequence_length=%d, tensor_parallel_size=%d "
        "(this takes minutes; export it once with optimum-cli and pass the exported folder to skip this)",
        path, batch, length, tp,
    )
    started = time.monotonic()
    neuron_config = NeuronModelForCausalLM.get_neuron_config(
        str(path), batch_size=batch, sequence_length=length, tensor_parallel_size=tp
    )
    model = NeuronModelForCausalLM.export(str(path), neuron_config, load_weights=True)
    log.warning("neuron: compiled in %.1f s", time.monotonic() - started)
    return model
