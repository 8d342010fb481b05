"""Strict loading of Hugging Face checkpoint tensors into a model with fused parameters.

A family maps each checkpoint name to ``(parameter name, shard)``: ``shard`` is ``None`` for
a whole parameter, or a key that the parameter's owning module resolves to a slice (a
:class:`~lmport.layers.linear.Linear`'s output shard such as ``"q"`` or ``"gate"``). A
``Linear`` places the tensor itself (:meth:`~lmport.layers.linear.Linear.load`); other modules
may offer ``shard_keys``/``shard_view``. Every tensor must land somewhere and every parameter
(every shard of it) must be filled, else loading fails with the names: a checkpoint layout the
model does not understand never loads silently. Once all tensors are in, every ``Linear``
repacks (``finish_loading``).

Quantized checkpoints name a layer's tensors ``<module>.qweight``, ``.scales``,
``.weight_scale`` ...: a family's mapper only needs to know ``<module>.weight``, the loader
maps that and puts the format's tensor beside it.
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Iterable

import torch
from torch import nn

from lmport.layers.linear import Linear, finish_loading

# checkpoint name -> (parameter name, shard key or None), or None for "not a tensor of this model"
NameMapper = Callable[[str], "tuple[str, Hashable | None] | None"]


def _expected_units(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Module], set[tuple[str, Hashable | None]]]:
    params = dict(model.named_parameters())  # a tied parameter appears once, under its first name
    modules = dict(model.named_modules())
    units: set[tuple[str, Hashable | None]] = set()
    for name in params:
        owner = modules[name.rpartition(".")[0]]
        local = name.rpartition(".")[2]
        if isinstance(owner, Linear) and owner.optional_param(local):
            continue
        keys = owner.shard_keys(local) if hasattr(owner, "shard_keys") else None
        units.update(((name, key) for key in keys) if keys else [(name, None)])
    return params, modules, units


def _target(
    hf_name: str, mapper: NameMapper, params: dict[str, nn.Parameter], modules: dict[str, nn.Module]
) -> tuple[str, Hashable | None] | None | str:
    """Where ``hf_name`` goes; ``"skip"`` for a tensor its layer's format reads and does not use."""
    target = mapper(hf_name)
    if target is not None and target[0] in params:
        return target
    if target is not None:  # a format that quantizes at load takes ``weight`` into a parameter of its own
        owner_name, _, local = target[0].rpartition(".")
        owner = modules.get(owner_name)
        if isinstance(owner, Linear) and local in owner.method.tensor_aliases:
            return f"{owner_name}.{owner.method.tensor_aliases[local]}", target[1]
    # a quantized layer's tensor: map the layer's ``.weight`` and keep the tensor's own local name
    module, _, local = hf_name.rpartition(".")
    if not module:
        return None
    weight_target = mapper(f"{module}.weight")
    if weight_target is None:
        return None
    owner_name = weight_target[0].rpartition(".")[0]
    owner = modules.get(owner_name)
    if not isinstance(owner, Linear):
        return None
    if local in owner.method.ignored_tensors:
        return "skip"
    name = f"{owner_name}.{local}"
    return (name, weight_target[1]) if name in params else None


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    mapper: NameMapper,
    *,
    ignore: Iterable[str] = (),
) -> None:
    """Copy ``weights`` into ``model`` through ``mapper``; raise on unexpected, misshapen or missing tensors.

    ``ignore``: regular expressions of checkpoint names to skip (buffers some exporters save,
    such as rotary ``inv_freq`` or GPT-2's causal ``attn.bias`` mask).
    """
    for module in model.modules():  # a reload starts from the checkpoint's layout again
        if isinstance(module, Linear):
            module.begin_loading()
    params, modules, expected = _expected_units(model)
    ignore_patterns = [re.compile(p) for p in ignore]
    loaded: set[tuple[str, Hashable | None]] = set()
    label = type(model).__name__
    for hf_name, tensor in weights:
        if any(p.search(hf_name) for p in ignore_patterns):
            continue
        target = _target(hf_name, mapper, params, modules)
        if target == "skip":
            continue
        if target is None:
            raise ValueError(f"{label}: unexpected checkpoint tensor '{hf_name}'")
        name, key = target
        owner = modules[name.rpartition(".")[0]]
        local = name.rpartition(".")[2]
        if isinstance(owner, Linear):
            try:
                owner.load(local, tensor, key)
            except ValueError as exc:
                raise ValueError(f"{label}: '{hf_name}': {exc}") from None
        elif hasattr(owner, "load_checkpoint_tensor"):  # a module that narrows what it reads (a sharded embedding)
            try:
                owner.load_checkpoint_tensor(local, tensor, key)
            except ValueError as exc:
                raise ValueError(f"{label}: '{hf_name}': {exc}") from None
        else:
            dest = owner.shard_view(local, key) if hasattr(owner, "shard_view") else params[name].data
            if key is not None and not hasattr(owner, "shard_view"):
                raise ValueError(f"{label}: '{hf_name}' maps to shard {key!r} of unsharded '{name}'")
            if dest.shape != tensor.shape:
                raise ValueError(f"{label}: '{hf_name}' has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(tensor)
        if key is None:  # a whole parameter fills all of its shards
            loaded.update(unit for unit in expected if unit[0] == name)
        else:
            loaded.add((name, key))
    missing = sorted({f"{name}[{key}]" if key is not None else name for name, key in expected - loaded})
    if missing:
        raise ValueError(f"{label}: checkpoint lacks {len(missing)} tensors: {', '.join(missing[:8])}")
    finish_loading(model)


def rename_rules(rules: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """A renamer applying ``(regex, replacement)`` rules in order."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(name: str) -> str:
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        return name

    return rename


def load_base_prefixed_checkpoint(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], base_prefix: str, *, tied_head: bool
) -> None:
    """:func:`load_checkpoint` for models whose base-model tensors sit under ``base_prefix``
    (``"transformer."``, ``"model."``), accepting older exports that omit it; a tied
    ``lm_head.weight`` is skipped (it is the embedding, loaded under its own name)."""
    rename = rename_rules([(rf"^(?!{re.escape(base_prefix)}|lm_head\.)", base_prefix)])
    load_checkpoint(model, weights, lambda name: (rename(name), None), ignore=[r"^lm_head\.weight$"] if tied_head else [])
