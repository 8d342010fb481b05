"""Feed-forward blocks: the gated (SwiGLU) MLP of Llama-like models and the plain two-layer MLP."""

from __future__ import annotations

import torch
from torch import nn

from lmport.layers.activations import get_activation
from lmport.layers.linear import Linear
from lmport.layers.ops import UsesLayerOps

# hidden_act names whose ACT2FN entry is plain SiLU, so the layer ops' silu_and_mul can run them
_SILU_NAMES = ("silu", "swish")


class GatedMLP(UsesLayerOps, nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one ``gate_up_proj``.

    ``quant``: the checkpoint's quantization (``ModelContext.quantization``), for both projections.

    With a SiLU activation the middle runs as one ``layer_ops.silu_and_mul`` on the fused
    projection's output (a single kernel where the backend has one).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False, *, quant=None):
        super().__init__()
        gate_up = {"gate": intermediate_size, "up": intermediate_size}
        self.gate_up_proj = Linear(hidden_size, gate_up, bias=bias, quant=quant, parallel="column")
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, quant=quant, parallel="row")
        self.act = get_activation(activation)
        self.is_silu = activation in _SILU_NAMES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.is_silu:
            return self.down_proj(self.layer_ops.silu_and_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(self.act(gate) * up)


class PlainMLP(nn.Module):
    """``out(act(in(x)))``: GPT-2, GPT-NeoX, Phi, StarCoder.

    ``names`` gives the two projections the checkpoint's own attribute names (``c_fc``/``c_proj``,
    ``fc1``/``fc2`` ...), so parameter names mirror the checkpoint and load without mapping.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        bias: bool = True,
        names: tuple[str, str] = ("fc_in", "fc_out"),
        *,
        quant=None,
    ):
        super().__init__()
        self._names = names
        setattr(self, names[0], Linear(hidden_size, intermediate_size, bias=bias, quant=quant))
        setattr(self, names[1], Linear(intermediate_size, hidden_size, bias=bias, quant=quant))
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc_in, fc_out = (getattr(self, name) for name in self._names)
        return fc_out(self.act(fc_in(x)))
