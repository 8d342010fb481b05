"""Stand-ins for habana_frameworks.torch and optimum-habana that run on the CPU (tests only).

The ``habana_stack`` fixture (conftest.py) installs them into ``sys.modules``. They keep the
boundary lmport-gaudi calls and record what a Gaudi would be asked to do:

- ``habana_frameworks.torch.hpu``: ``is_available()`` is False (so the executor's device is the
  CPU: nothing here names ``"hpu"``), ``wrap_in_hpu_graph(model)`` returns a wrapper that
  "captures a graph" per distinct input shape and counts replays, so a test can assert that
  serving ran only shapes the warm-up captured;
- ``habana_frameworks.torch.core.mark_step()``: counted (the lazy-mode step boundary);
- ``optimum.habana.transformers.modeling_utils.adapt_transformers_to_gaudi()``: recorded
  (the real one swaps transformers' classes for the Gaudi ones; transformers' own run here);
- ``optimum.habana.transformers.generation.GaudiGenerationConfig``: the static-shape fields.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import torch


@dataclass
class FakeHabana:
    adapted: int = 0
    mark_steps: int = 0
    graphs: dict = field(default_factory=dict)  # input shape -> replays
    captured_after_warmup: list = field(default_factory=list)
    warm: bool = False


STATE = FakeHabana()


class HpuGraphModule(torch.nn.Module):
    """``wrap_in_hpu_graph``'s result: one captured graph per input shape, replayed after."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.generation_config = getattr(module, "generation_config", None)

    def forward(self, *args, **kwargs):
        shape = tuple(kwargs["input_ids"].shape)
        if shape not in STATE.graphs:
            STATE.graphs[shape] = 0
            if STATE.warm:
                STATE.captured_after_warmup.append(shape)
        else:
            STATE.graphs[shape] += 1
        return self.module(*args, **kwargs)


def _wrap_in_hpu_graph(module, disable_tensor_cache: bool = False):
    return HpuGraphModule(module)


def _adapt_transformers_to_gaudi():
    STATE.adapted += 1


def _mark_step():
    STATE.mark_steps += 1


@dataclass
class GaudiGenerationConfig:
    static_shapes: bool = False
    bucket_size: int = -1
    use_cache: bool = True
    reuse_cache: bool = False
    bucket_internal: bool = False


def modules() -> dict[str, types.ModuleType]:
    def module(name: str, package: bool = False, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        if package:
            m.__path__ = []
        for key, value in attrs.items():
            setattr(m, key, value)
        return m

    hpu = module("habana_frameworks.torch.hpu", is_available=lambda: False, device_count=lambda: 0,
                 wrap_in_hpu_graph=_wrap_in_hpu_graph)
    core = module("habana_frameworks.torch.core", mark_step=_mark_step)
    htorch = module("habana_frameworks.torch", True, hpu=hpu, core=core)
    habana_frameworks = module("habana_frameworks", True, torch=htorch)
    optimum = sys.modules.get("optimum") or module("optimum", True)
    modeling_utils = module("optimum.habana.transformers.modeling_utils",
                            adapt_transformers_to_gaudi=_adapt_transformers_to_gaudi)
    generation = module("optimum.habana.transformers.generation", GaudiGenerationConfig=GaudiGenerationConfig)
    transformers_pkg = module("optimum.habana.transformers", True, modeling_utils=modeling_utils, generation=generation)
    habana = module("optimum.habana", True, transformers=transformers_pkg, __version__="1.21.0")
    optimum.habana = habana
    return {
        "habana_frameworks": habana_frameworks,
        "habana_frameworks.torch": htorch,
        "habana_frameworks.torch.hpu": hpu,
        "habana_frameworks.torch.core": core,
        "optimum": optimum,
        "optimum.habana": habana,
        "optimum.habana.transformers": transformers_pkg,
        "optimum.habana.transformers.modeling_utils": modeling_utils,
        "optimum.habana.transformers.generation": generation,
    }
