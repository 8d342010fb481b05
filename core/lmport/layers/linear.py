"""The one linear layer every model builds its projections with.

A :class:`Linear` owns its parameters, their loading and its matmul, and delegates all three to
a :class:`LinearMethod` chosen by the checkpoint's quantization format (the unquantized method
here; GPTQ, AWQ, fp8, compressed-tensors, bitsandbytes, EETQ in :mod:`lmport.layers.quantization`):

- ``create_weights(layer)`` registers the parameters the checkpoint has for this layer, in its
  on-disk layout, each with a :class:`WeightSpec` saying which axis runs along the outputs
  (N) and the inputs (K) and how densely they are packed there;
- ``load(layer, name, tensor, shard)`` copies one checkpoint tensor into its place:
  :meth:`Linear.load_param` narrows it to this rank's slice (:class:`Partition`, for tensor
  parallelism) and to the output rows of ``shard`` (``"q"``/``"k"``/``"v"``, ``"gate"``/``"up"``:
  merged projections are one layer with named output shards);
- ``after_loading(layer)`` repacks what was read into the layout the kernel wants;
- ``apply(layer, x)`` runs the kernel, through the backend's :class:`~lmport.layers.ops.LayerOps`
  (``linear``, ``linear_wq``, ``linear_fp8``), so every family gets the backend's GEMM/GEMV.

Tensor parallelism: ``parallel="column"`` splits the outputs (each rank computes its slice of
N; a merged layer splits every named shard, and ``shard_heads`` names shards made of heads:
KV heads fewer than the ranks are replicated, one per rank); ``parallel="row"`` splits the
inputs and all-reduces the output (``reduce=False`` leaves the partial sum to the caller, as a
mixture of experts sums its experts first). Both take the rank from
:func:`lmport.layers.parallel.current_shard`; outside a sharded build they hold everything.

Models never name ``nn.Linear``; :func:`lmport.layers.weight_loading.load_checkpoint` calls
:meth:`Linear.load` and, once every tensor is in, :meth:`Linear.finish_loading`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Mapping

import torch
from torch import nn

from lmport.layers.ops import UsesLayerOps
from lmport.layers.parallel import current_shard
from lmport.layers.prepacked_linear import forget_packed

if TYPE_CHECKING:
    from lmport.layers.quantization.config import QuantizationConfig


@dataclass(frozen=True)
class Partition:
    """The slice of every checkpoint tensor this rank holds: ``dim="output"`` splits N (column
    parallel), ``"input"`` splits K (row parallel). ``world=1`` holds everything."""

    rank: int = 0
    world: int = 1
    dim: str = "output"

    def __post_init__(self) -> None:
        if self.dim not in ("output", "input") or not 0 <= self.rank < self.world:
            raise ValueError(f"bad partition {self}")


@dataclass(frozen=True)
class WeightSpec:
    """How one parameter of a :class:`Linear` relates to the layer's outputs and inputs.

    ``output_dim``/``input_dim``: the parameter's axis that runs along N/K (``None``: none does);
    ``output_pack``/``input_pack``: how many outputs/inputs one element along that axis covers
    (8 for int4 packed in int32, the group size for per-group scales). ``per_shard``: one entry
    per output shard along axis 0 (q/k/v's own per-tensor scales). ``same_across_shards``: every
    shard carries the same value (GPTQ's ``g_idx`` for q/k/v, which share their input); the
    later copies must equal the first. ``optional``: the checkpoint may omit it.
    """

    output_dim: int | None = None
    input_dim: int | None = None
    output_pack: int = 1
    input_pack: int = 1
    per_shard: bool = False
    same_across_shards: bool = False
    optional: bool = False
    keep_dtype: bool = False  # a model-wide ``.to(dtype)`` leaves it as created (float8 weights, float32 scales)


class LinearMethod:
    """How a quantization format stores, loads and multiplies one linear layer's weight.

    The default ``load`` places a tensor by its :class:`WeightSpec`; ``after_loading`` does
    nothing; ``repacks`` says whether ``after_loading`` replaces the parameters (then reloading
    a layer starts again from ``create_weights``). Bias is the layer's, never the method's.
    """

    name = "unquantized"
    repacks = False
    # checkpoint tensors of the format that this method reads and does not use (named in docs)
    ignored_tensors: tuple[str, ...] = ()
    # checkpoint tensor -> the parameter that receives it (``weight`` -> ``qweight`` when quantizing at load)
    tensor_aliases: dict[str, str] = {}

    def create_weights(self, layer: "Linear") -> None:
        raise NotImplementedError

    def load(self, layer: "Linear", name: str, tensor: torch.Tensor, shard: Hashable | None) -> None:
        layer.load_param(name, tensor, shard)

    def after_loading(self, layer: "Linear") -> None:
        return None

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """``weight [N, K]`` in the model's dtype (nn.Linear's layout), through ``layer_ops.linear``."""

    def create_weights(self, layer: "Linear") -> None:
        layer.add_weight("weight", torch.empty(layer.out_features, layer.in_features), WeightSpec(output_dim=0, input_dim=1))

    def after_loading(self, layer: "Linear") -> None:
        if layer.output_order is not None:
            layer.weight.data = layer.weight.data.index_select(0, layer.output_order.to(layer.weight.device))

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return layer.layer_ops.linear(x, layer.weight, layer.bias)


UNQUANTIZED = UnquantizedLinearMethod()


class Linear(UsesLayerOps, nn.Module):
    """``y = x @ W.T + b`` whose ``W`` lives in the format ``quant`` gives this layer.

    :param out_features: an int, or ``{shard name: rows}`` for a merged projection whose
        checkpoint names the parts apart (loaded with ``shard=name``; :meth:`split` cuts the
        output back into them). The sizes are the whole model's; a :class:`Partition` divides them.
    :param quant: the checkpoint's :class:`~lmport.layers.quantization.config.QuantizationConfig`
        (``ModelContext.quantization``); ``None`` is unquantized.
    :param quantizable: ``False`` for layers formats leave in full precision (LM heads, MoE routers).
    :param output_order: a permutation of the output rows applied after loading (a fused QKV
        saved per head, ``[h0: q k v, h1: ...]``, becomes ``[all q | all k | all v]``; see
        :func:`per_head_qkv_order`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Mapping[str, int],
        bias: bool = False,
        *,
        quant: "QuantizationConfig | None" = None,
        quantizable: bool = True,
        partition: Partition | None = None,
        output_order: torch.Tensor | None = None,
        parallel: str | None = None,
        shard_heads: Mapping[str, int] | None = None,
        reduce: bool = True,
    ):
        super().__init__()
        shard = current_shard()
        if partition is None and parallel is not None and shard.sharded:
            if parallel not in ("column", "row"):
                raise ValueError(f"parallel={parallel!r}: 'column' or 'row'")
            partition = Partition(shard.rank, shard.world_size, "output" if parallel == "column" else "input")
        self.partition = partition or Partition()
        self.comm = shard.comm if self.partition.world > 1 else None
        self.reduce = reduce and self.partition.dim == "input" and self.partition.world > 1
        world = self.partition.world
        sizes = dict(out_features) if isinstance(out_features, Mapping) else None
        self.shard_heads = dict(shard_heads or {})
        self._replicated: dict[str, int] = {}  # shard -> heads it has (fewer than the ranks: one per rank)
        if self.partition.dim == "output":
            for name, size in (sizes or {"out_features": out_features}).items():
                heads = self.shard_heads.get(name)
                if heads is not None and heads < world and world % heads == 0 and size % heads == 0:
                    self._replicated[name] = heads
                elif size % world:
                    raise ValueError(f"{name} = {size} does not split over {world} ranks")
            if sizes:
                sizes = {name: size // self._replicated[name] if name in self._replicated else size // world
                         for name, size in sizes.items()}  # fmt: skip
            out = sum(sizes.values()) if sizes else out_features // world
            self.in_features = in_features
        else:
            if in_features % world:
                raise ValueError(f"in_features = {in_features} does not split over {world} ranks")
            out = sum(sizes.values()) if sizes else out_features
            self.in_features = in_features // world
        if output_order is not None and world > 1:
            raise ValueError("an output_order cannot be combined with a partition")
        self.out_features = out
        self.shard_sizes: dict[str, int] | None = sizes
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in (sizes or {}).items():
            self.shard_offsets[name] = offset
            offset += size
        self.output_order = output_order
        self.weight_specs: dict[str, WeightSpec] = {}
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.method: LinearMethod = quant.linear_method(self) if (quant is not None and quantizable) else UNQUANTIZED
        self._loaded_shards: dict[str, set] = {}
        self._finished = False
        self.method.create_weights(self)

    # ------------------------------------------------------------------ construction

    def add_weight(self, name: str, tensor: torch.Tensor, spec: WeightSpec) -> nn.Parameter:
        """Register a parameter of this layer (called by ``create_weights`` and by repacking)."""
        param = nn.Parameter(tensor, requires_grad=False)
        setattr(self, name, param)
        self.weight_specs[name] = spec
        return param

    def drop_weight(self, name: str) -> None:
        """Remove a parameter (repacking replaces the checkpoint's layout with the kernel's)."""
        delattr(self, name)
        self.weight_specs.pop(name, None)

    def set_method(self, method: LinearMethod) -> None:
        """Replace the format of this layer before loading (an ignored module stays unquantized)."""
        for name in list(self.weight_specs):
            self.drop_weight(name)
        self.method = method
        self.method.create_weights(self)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` casts every float parameter; a format's float8 weights and float32
        # scales keep the dtype they were created with (they are cast back, still empty, before loading)
        pinned = {name: getattr(self, name).dtype for name, spec in self.weight_specs.items() if spec.keep_dtype}
        super()._apply(fn, recurse)
        for name, dtype in pinned.items():
            param = getattr(self, name)
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
        return self

    def shard_rows(self, shard: Hashable | None) -> tuple[int, int]:
        """``(first output row, rows)`` of ``shard`` in this layer (``None``: all of them)."""
        if shard is None:
            return 0, self.out_features
        if shard not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard!r}; this layer has {self.shard_names}")
        return self.shard_offsets[shard], self.shard_sizes[shard]

    # ------------------------------------------------------------------ loading

    @property
    def shard_names(self) -> list[str]:
        return list(self.shard_sizes or ())

    def shard_keys(self, param_name: str) -> list[Hashable]:
        """The shards a checkpoint fills ``param_name`` by (see ``weight_loading``); [] when whole."""
        return self.shard_names

    def optional_param(self, param_name: str) -> bool:
        spec = self.weight_specs.get(param_name)
        return spec is not None and spec.optional

    def begin_loading(self) -> None:
        """Before a (re)load: back to the checkpoint's layout if a previous load repacked it."""
        for name in self.weight_specs:  # a kernel's reordered copy of the old data (prepacked_linear)
            forget_packed(getattr(self, name, None))
        if self._finished:
            self._finished = False
            if self.method.repacks:
                self.set_method(self.method)
        self._loaded_shards = {}

    def load(self, name: str, tensor: torch.Tensor, shard: Hashable | None = None) -> None:
        """Load checkpoint tensor ``tensor`` into parameter ``name`` (``shard``: which output part)."""
        if name == "bias" and self.partition.dim == "input" and self.partition.rank != 0 and self.reduce:
            tensor = torch.zeros_like(tensor)  # a row-parallel bias is added once, by rank 0, before the sum
        if name == "bias":
            self.load_param(name, tensor, shard, WeightSpec(output_dim=0))
        elif name in self.weight_specs:
            self.method.load(self, name, tensor, shard)
        else:
            raise KeyError(name)

    def load_param(self, name: str, tensor: torch.Tensor, shard: Hashable | None, spec: WeightSpec | None = None) -> None:
        """The default placement of one tensor: this rank's slice, then the shard's rows."""
        spec = spec or self.weight_specs[name]
        param = getattr(self, name)
        tensor = self._narrow_to_partition(tensor, spec, shard)
        dest = param.data
        if shard is not None and self.shard_sizes is None:
            raise ValueError(f"shard {shard!r} given for an unmerged layer")
        if shard is not None:
            if shard not in self.shard_offsets:
                raise ValueError(f"unknown shard {shard!r}; this layer has {self.shard_names}")
            if spec.per_shard:
                dest = dest[self.shard_names.index(shard)]
            elif spec.output_dim is not None:
                start, size = self.shard_offsets[shard], self.shard_sizes[shard]
                if start % spec.output_pack or size % spec.output_pack:
                    raise ValueError(f"shard {shard!r} of {size} rows does not align with a packing of {spec.output_pack}")
                dest = dest.narrow(spec.output_dim, start // spec.output_pack, size // spec.output_pack)
            elif spec.same_across_shards:
                seen = self._loaded_shards.setdefault(name, set())
                if seen:
                    if dest.shape != tensor.shape or not torch.equal(dest, tensor.to(dest.dtype)):
                        raise ValueError(f"'{name}' differs between the shards {sorted(seen)} and {shard!r}; they must be equal")
                    seen.add(shard)
                    return
                seen.add(shard)
        if dest.shape != tensor.shape:
            raise ValueError(f"'{name}' has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)

    def _narrow_to_partition(self, tensor: torch.Tensor, spec: WeightSpec, shard: Hashable | None) -> torch.Tensor:
        part = self.partition
        if part.world == 1:
            return tensor
        dim = spec.input_dim if part.dim == "input" else spec.output_dim
        if dim is None:
            return tensor
        if part.dim == "output" and shard is None and self.shard_sizes:
            # a whole merged tensor: this rank's rows of each part, concatenated
            names = list(self.shard_sizes)
            sizes = [self._whole_rows(n) // spec.output_pack for n in names]
            return torch.cat([self._rank_piece(piece, dim, n) for n, piece in zip(names, tensor.split(sizes, dim))], dim)
        if part.dim == "output" and shard is not None:
            return self._rank_piece(tensor, dim, shard)
        return _chunk(tensor, part.world, dim, part.rank)

    def _whole_rows(self, shard: Hashable) -> int:
        heads = self._replicated.get(shard)
        return self.shard_sizes[shard] * (heads if heads else self.partition.world)

    def _rank_piece(self, tensor: torch.Tensor, dim: int, shard: Hashable) -> torch.Tensor:
        """This rank's rows of one named output shard (a replicated KV head: the one it serves)."""
        part = self.partition
        heads = self._replicated.get(shard)
        if heads:
            return _chunk(tensor, heads, dim, part.rank * heads // part.world)
        return _chunk(tensor, part.world, dim, part.rank)

    def finish_loading(self) -> None:
        """Every tensor is in: let the method repack (once per load)."""
        if not self._finished:
            self.method.after_loading(self)
            if self.output_order is not None and self.bias is not None:
                self.bias.data = self.bias.data.index_select(0, self.output_order.to(self.bias.device))
            self._finished = True

    # ------------------------------------------------------------------ compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return self.comm.all_reduce(y) if self.reduce else y

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output cut back into its shards (views, no copy)."""
        return output.split(list(self.shard_sizes.values()), dim=-1)

    def extra_repr(self) -> str:
        shards = f", shards={self.shard_sizes}" if self.shard_sizes else ""
        return f"in={self.in_features}, out={self.out_features}{shards}, bias={self.bias is not None}, method={self.method.name}"


def _chunk(tensor: torch.Tensor, parts: int, dim: int, index: int) -> torch.Tensor:
    if tensor.shape[dim] % parts:
        raise ValueError(f"{tuple(tensor.shape)} does not split in {parts} along dim {dim}")
    return tensor.chunk(parts, dim)[index]


def finish_loading(model: nn.Module) -> None:
    """:meth:`Linear.finish_loading` on every layer of ``model``."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.finish_loading()


def per_head_qkv_order(num_heads: int, head_dim: int) -> torch.Tensor:
    """The output permutation that turns a fused QKV laid out per head (``[h0: q k v, h1: q k v, ...]``,
    GPT-NeoX, multi-head StarCoder) into ``[all q | all k | all v]``, so the forward is a plain split."""
    rows = torch.arange(num_heads * 3 * head_dim).view(num_heads, 3, head_dim)
    return rows.transpose(0, 1).reshape(-1)
