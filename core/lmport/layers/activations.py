"""Activation functions by their Hugging Face config names (``hidden_act``, ``activation_function``).

``transformers.activations.ACT2FN`` is the definition checkpoints were trained with (``gelu_new``,
``gelu_pytorch_tanh``, ``silu`` ...), so it is used as is rather than re-implemented.
"""

from __future__ import annotations

from typing import Callable

import torch


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation '{name}'")
    return ACT2FN[name]
