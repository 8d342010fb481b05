"""Stand-ins for optimum-neuron 0.4, torch_neuronx and neuronx_distributed that run on the CPU.

Installed into ``sys.modules`` by the ``neuron_stack`` fixture (conftest.py) for the tests
only. They keep the boundary lmport-neuron calls (``NeuronModelForCausalLM.from_pretrained`` /
``get_neuron_config`` / ``export`` and ``model(input_ids, attention_mask=, position_ids=,
seq_ids=, sampling_params=)``) and enforce what a compiled model enforces, so the executor's
own logic is tested for real:

- shapes: at most ``batch_size`` rows, sequences shorter than ``sequence_length``, every row
  a distinct slot ``0 <= seq_id < batch_size``;
- a KV row per slot: a prefill (several tokens, with ``attention_mask``) replaces the slot's
  tokens; a decode must feed the slot's next position exactly;
- logits of each row's last real token, ``[rows, 1, vocab]``, computed by the checkpoint's
  transformers model over the slot's tokens (the "device");
- export compiles through ``torch_neuronx.trace`` once per graph (context encoding, token
  generation) on a ``neuronx_distributed`` tensor-parallel group of ``tp_degree``.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NEURON_CONFIG_FILE = "neuron_config.json"


class FakeNeuronRuntime:
    """What the stand-in torch_neuronx / neuronx_distributed record: compiles and the TP group."""

    def __init__(self) -> None:
        self.traced: list[str] = []
        self.tp_degree: int | None = None


RUNTIME = FakeNeuronRuntime()


def _trace(fn, example_inputs=None, compiler_args=None, name: str = "graph"):  # torch_neuronx.trace
    RUNTIME.traced.append(name)
    return fn


def _initialize_model_parallel(tensor_model_parallel_size: int = 1):  # neuronx_distributed.parallel_state
    RUNTIME.tp_degree = tensor_model_parallel_size


@dataclass
class NeuronConfig:
    batch_size: int
    sequence_length: int
    tp_degree: int = 1
    torch_dtype: str = "float32"
    continuous_batching: bool = True
    on_device_sampling: bool = False
    checkpoint_id: str = ""

    def save_pretrained(self, path: str | Path) -> None:
        (Path(path) / NEURON_CONFIG_FILE).write_text(json.dumps(asdict(self)))


class CausalLMOutput:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class NeuronModelForCausalLM:
    """A "compiled" causal LM: a transformers model behind the compiled shape's rules."""

    def __init__(self, checkpoint: str | Path, neuron_config: NeuronConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.neuron_config = neuron_config
        self.hf_model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
        self.slots: dict[int, list[int]] = {}
        self.calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    # ---------------------------------------------------------------- optimum-neuron 0.4's API

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs) -> "NeuronModelForCausalLM":
        if "export" in kwargs or "batch_size" in kwargs or "num_cores" in kwargs:
            raise TypeError("from_pretrained() got an unexpected keyword argument (export is gone for LLMs in 0.4)")
        path = Path(model_id)
        config = NeuronConfig(**json.loads((path / NEURON_CONFIG_FILE).read_text()))
        _initialize_model_parallel(config.tp_degree)
        return cls(config.checkpoint_id or path, config)

    @classmethod
    def get_neuron_config(cls, model_name_or_path: str, config=None, *, batch_size: int, sequence_length: int,
                          tensor_parallel_size: int = 1, **kwargs) -> NeuronConfig:
        from transformers import AutoConfig

        hf_config = config or AutoConfig.from_pretrained(model_name_or_path)
        limit = getattr(hf_config, "max_position_embeddings", None)
        if limit is not None and sequence_length > limit:
            raise ValueError(f"sequence_length {sequence_length} > max_position_embeddings {limit}")
        return NeuronConfig(batch_size, sequence_length, tensor_parallel_size, checkpoint_id=str(model_name_or_path))

    @classmethod
    def export(cls, model_id: str, neuron_config: NeuronConfig, load_weights: bool = True, **kwargs) -> "NeuronModelForCausalLM":
        _initialize_model_parallel(neuron_config.tp_degree)
        model = cls(model_id, neuron_config)
        _trace(model, name="context_encoding")
        _trace(model, name="token_generation")
        return model

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.neuron_config.save_pretrained(path)

    # ---------------------------------------------------------------- the compiled graphs

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, position_ids=None, seq_ids=None, sampling_params=None):
        cfg = self.neuron_config
        rows, length = input_ids.shape
        ids = seq_ids.tolist()
        if rows > cfg.batch_size or len(ids) != rows:
            raise RuntimeError(f"compiled for batch_size={cfg.batch_size}: got {rows} rows and seq_ids {ids}")
        if len(set(ids)) != len(ids) or any(not 0 <= s < cfg.batch_size for s in ids):
            raise RuntimeError(f"seq_ids {ids} must be distinct slots of 0..{cfg.batch_size - 1}")
        if ids != sorted(ids):
            raise RuntimeError(f"seq_ids {ids} must be sorted")
        if length > cfg.sequence_length or position_ids is None or position_ids.shape != input_ids.shape:
            raise RuntimeError(f"input shape {tuple(input_ids.shape)} / positions do not fit the compiled graphs")
        prefill = length > 1 or attention_mask is not None
        if prefill:
            if attention_mask is None:
                raise RuntimeError("context encoding needs an attention_mask")
            for row, slot in enumerate(ids):
                real = int(attention_mask[row].sum())
                if real == 0 or int(attention_mask[row, :real].sum()) != real:
                    raise RuntimeError("context encoding takes right-padded rows")
                self.slots[slot] = input_ids[row, :real].tolist()
        else:
            for row, slot in enumerate(ids):
                tokens = self.slots.get(slot)
                position = int(position_ids[row, 0])
                if tokens is None or position != len(tokens) or position >= cfg.sequence_length:
                    raise RuntimeError(f"slot {slot}: decode at position {position}, the slot holds "
                                       f"{None if tokens is None else len(tokens)} tokens")
                tokens.append(int(input_ids[row, 0]))
        self.calls.append(("prefill" if prefill else "decode", tuple(ids), tuple(input_ids.shape)))
        logits = torch.stack([self.hf_model(torch.tensor([self.slots[s]])).logits[0, -1] for s in ids])
        return CausalLMOutput(logits.unsqueeze(1))


def modules() -> dict[str, types.ModuleType]:
    """The stand-in modules by name, as the fixture installs them into ``sys.modules``."""
    optimum = sys.modules.get("optimum") or types.ModuleType("optimum")
    if not hasattr(optimum, "__path__"):
        optimum.__path__ = []
    neuron = types.ModuleType("optimum.neuron")
    neuron.NeuronModelForCausalLM = NeuronModelForCausalLM
    neuron.NeuronConfig = NeuronConfig
    neuron.__version__ = "0.4.5"
    optimum.neuron = neuron
    torch_neuronx = types.ModuleType("torch_neuronx")
    torch_neuronx.trace = _trace
    torch_neuronx.__version__ = "2.8.0"
    nxd = types.ModuleType("neuronx_distributed")
    nxd.__path__ = []
    parallel_state = types.ModuleType("neuronx_distributed.parallel_layers.parallel_state")
    parallel_state.initialize_model_parallel = _initialize_model_parallel
    return {
        "optimum": optimum,
        "optimum.neuron": neuron,
        "torch_neuronx": torch_neuronx,
        "neuronx_distributed": nxd,
        "neuronx_distributed.parallel_layers.parallel_state": parallel_state,
    }
