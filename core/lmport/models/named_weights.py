"""Load checkpoint tensors into a model whose parameter names mirror the Hugging Face ones.

Families that keep Hugging Face's module names (fused QKV left fused, split at run time)
need no per-tensor mapping: a name is renamed at most by dropping a prefix that some
checkpoints carry and others don't (``transformer.``, ``model.``), then copied. Any tensor
the model has no place for, and any parameter left unfilled, is an error, so a layout the
model does not understand never loads silently.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    rename: Callable[[str], str] = lambda name: name,
    ignore: Iterable[str] = (),
    tied: Iterable[str] = (),
) -> None:
    """Copy ``weights`` into ``model``'s parameters by (renamed) name.

    ``ignore``: regular expressions of checkpoint names to skip (buffers that some exporters
    save, such as rotary ``inv_freq``). ``tied``: parameter names that share storage with
    another parameter (a tied ``lm_head.weight``); they may be absent from the checkpoint,
    and when present they are skipped, since the tensor they share is loaded under its own name.
    """
    params = dict(model.named_parameters())  # shared tensors appear once, under their first name
    tied = set(tied)
    ignore_patterns = [re.compile(p) for p in ignore]
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        if any(p.search(hf_name) for p in ignore_patterns):
            continue
        name = rename(hf_name)
        if name in tied:
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(f"{type(model).__name__}: unexpected checkpoint tensor '{hf_name}'")
        if param.shape != tensor.shape:
            raise ValueError(
                f"{type(model).__name__}: '{hf_name}' has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{type(model).__name__}: checkpoint lacks {len(missing)} tensors: {', '.join(missing[:8])}")


def ensure_prefix(prefix: str, *exempt: str) -> Callable[[str], str]:
    """A ``rename`` that puts ``prefix`` before names lacking it, except names starting with ``exempt``.

    Older exports of some families saved the bare base model (``h.0.…`` rather than
    ``transformer.h.0.…``); this maps both spellings onto the model's own names.
    """

    def rename(name: str) -> str:
        if name.startswith(prefix) or name.startswith(exempt):
            return name
        return prefix + name

    return rename
