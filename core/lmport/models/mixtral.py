"""Mixtral: Mistral's attention with a top-2 sparse mixture of SwiGLU experts in place of the MLP.

Checkpoints name experts one by one (``block_sparse_moe.experts.<e>.w1/w2/w3``); the model
keeps the block at ``mlp`` with one :class:`~lmport.layers.linear.Linear` pair per expert in
:class:`~lmport.layers.moe.FusedMoE` (quantized like every projection; the router is not).
Stacked names as transformers 5.x keeps them in memory (``mlp.experts.gate_up_proj``/``down_proj``,
``[experts, 2 * inter, hidden]`` and ``[experts, hidden, inter]``) are split per expert and load too.
"""

from __future__ import annotations

import re
from typing import Any, Hashable, Iterable, Iterator

import torch
from torch import nn

from lmport.layers.linear import Linear
from lmport.layers.moe import FusedMoE
from lmport.models.base import ModelContext
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["MixtralForCausalLM"]

_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_ROUTER = re.compile(r"^(.*)\.block_sparse_moe\.gate\.weight$")
_STACKED = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class MixtralSparseMoe(nn.Module):
    """Router (``gate``) plus experts; routing probabilities are softmaxed in float32 and renormalised."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.gate = Linear(config.hidden_size, config.num_local_experts, bias=False, quantizable=False)
        self.experts = FusedMoE(
            config.num_local_experts, config.num_experts_per_tok, config.hidden_size, config.intermediate_size,
            config.hidden_act, quant=ctx.quantization,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden), renormalize=True)


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama layers whose MLP is :class:`MixtralSparseMoe`; Mistral's window when the config sets one."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__(
            config,
            ctx,
            mlp_factory=lambda _: MixtralSparseMoe(config, ctx),
            sliding_window=getattr(config, "sliding_window", None) or None,
        )

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        # the MoE lives at ``mlp`` (where 5.x puts it too); 4.x checkpoints call it ``block_sparse_moe``
        if m := _EXPERT.match(name):
            prefix, expert, part = m[1], int(m[2]), m[3]
            if part == "w2":
                return f"{prefix}.mlp.experts.w2.{expert}.weight", None
            return f"{prefix}.mlp.experts.w13.{expert}.weight", part
        if m := _ROUTER.match(name):
            return f"{m[1]}.mlp.gate.weight", None
        return super().map_weight_name(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def per_expert() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if not (m := _STACKED.match(name)):
                    yield name, tensor
                    continue
                experts = f"{m[1]}.block_sparse_moe.experts"
                for e, expert in enumerate(tensor.unbind(0)):
                    if m[2] == "down_proj":
                        yield f"{experts}.{e}.w2.weight", expert
                    else:
                        gate, up = expert.chunk(2, dim=0)
                        yield f"{experts}.{e}.w1.weight", gate
                        yield f"{experts}.{e}.w3.weight", up

        super().load_weights(per_expert())


def build_mixtral(config: Any, ctx: ModelContext) -> MixtralForCausalLM:
    return MixtralForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_mixtral)
