"""Quantize an unquantized safetensors checkpoint into a real on-disk quantized layout (tests, benchmarks).

Each format's own round-to-nearest quantizer and packing, written with the ``quantization_config``
the real tools write (AutoGPTQ/GPTQModel, AutoAWQ, llm-compressor/compressed-tensors, AutoFP8 /
FBGEMM fp8). :func:`quantize_checkpoint` returns the dequantized float32 weights by checkpoint
name: load them into a transformers model and it is the oracle the served model must match.

GPTQ's act-order is real: with ``act_order`` the input columns are quantized in decreasing order
of ``hessian_diag`` (per layer input, ``sum x**2`` over calibration tokens, see
:func:`input_square_sums`), so ``g_idx`` is a non-trivial permutation, identical for layers that
share an input (q/k/v, gate/up) as GPTQ makes it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from lmport.layers.quant_ops import pack_int_rows
from lmport.layers.quantization.awq import AWQ_ORDER
from lmport.layers.quantization.fp8 import FP8, FP8_MAX
from lmport.layers.quantization.int_weights import pack_int_cols

# 2-D weights quantizers leave alone: embeddings, heads, norms, MoE routers
_KEEP = re.compile(r"(embed|lm_head|embed_out|wte|wpe|norm|ln_|\.gate\.weight$|word_embeddings)")

Tensors = dict[str, torch.Tensor]


def default_quantizable(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not _KEEP.search(name)


# ---------------------------------------------------------------------------- per-weight quantizers


def _group_stats(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN scale and integer zero per row of ``w [rows, group]`` (GPTQ's quantizer)."""
    maxq = (1 << bits) - 1
    lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero


def quantize_gptq(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    hessian_diag: torch.Tensor | None = None,
    checkpoint_format: str = "gptq",
) -> tuple[Tensors, torch.Tensor]:
    """``weight [N, K]`` -> (``qweight``, ``qzeros``, ``scales`` (fp16), ``g_idx``) and the dequantized float32 weight."""
    n, k = weight.shape
    gs = k if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    order = torch.argsort(hessian_diag, descending=True) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    w = weight.float()
    q = torch.empty(n, k, dtype=torch.int64)
    scales = torch.empty(k // gs, n)
    zeros = torch.empty(k // gs, n)
    # v1 stores zero - 1: it cannot hold 0 (AutoGPTQ's own limit), so asymmetric zeros start at 1
    min_zero = 1 if checkpoint_format == "gptq" else 0
    for g in range(k // gs):
        cols = order[g * gs : (g + 1) * gs]
        scale, zero = _group_stats(w[:, cols], bits, sym, min_zero)
        scale = scale.half().float()  # what the checkpoint keeps
        scales[g], zeros[g] = scale, zero
        q[:, cols] = torch.clamp(torch.round(w[:, cols] / scale[:, None]) + zero[:, None], 0, maxq).long()
    dequant = (q.float() - zeros[g_idx.long()].t()) * scales[g_idx.long()].t()
    stored_zeros = zeros.long() - (1 if checkpoint_format == "gptq" else 0)
    tensors = {
        "qweight": pack_int_rows(q.t(), bits),
        "qzeros": pack_int_cols(stored_zeros & maxq, bits),
        "scales": scales.half(),
        "g_idx": g_idx,
    }
    return tensors, dequant


def quantize_awq(weight: torch.Tensor, group_size: int = 128) -> tuple[Tensors, torch.Tensor]:
    """AutoAWQ's GEMM layout (4 bit, asymmetric): ``qweight [K, N/8]``, ``qzeros [G, N/8]`` in AWQ's nibble order, ``scales [G, N]``."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()  # [N, G]
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 15)
    dequant = ((q - zero[..., None]) * scale[..., None]).reshape(n, k)

    def awq_pack(values: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N/8], nibble i = column AWQ_ORDER[i]
        idx = (torch.arange(values.shape[1] // 8)[:, None] * 8 + torch.tensor(AWQ_ORDER)[None]).reshape(-1)
        return pack_int_cols(values[:, idx].long(), 4)

    tensors = {
        "qweight": awq_pack(q.reshape(n, k).t()),
        "qzeros": awq_pack(zero.t()),
        "scales": scale.t().contiguous().half(),
    }
    return tensors, dequant


def quantize_fp8(weight: torch.Tensor, per_channel: bool = True, scale_shape: tuple[int, ...] | None = None) -> tuple[Tensors, torch.Tensor]:
    """e4m3 weight + float32 ``weight_scale`` (``[N, 1]`` per channel as llm-compressor/FBGEMM write it, ``[]`` per tensor)."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    dequant = q.float() * scale
    if scale_shape is not None:
        scale = scale.reshape(scale_shape)
    return {"weight": q, "weight_scale": scale.float()}, dequant


def _ct_scheme(fmt: str, bits: int, group_size: int, sym: bool, actorder: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if fmt == "float-quantized":
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        activations = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    strategy = "channel" if group_size == -1 else "group"
    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy=strategy, group_size=None if group_size == -1 else group_size,
        actorder="weight" if actorder else None,  # quantization order only: nothing extra on disk
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


def quantize_compressed_tensors(weight: torch.Tensor, scheme: Any, fmt: str) -> tuple[Tensors, torch.Tensor]:
    """The compressed-tensors package's own compressor on an RTN scale/zero point; dequantized by its decompressor."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    args = scheme.weights
    w = weight.float()
    if fmt == "float-quantized":
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        state = {"weight": w, "weight_scale": scale}
    else:
        n, k = w.shape
        gs = k if args.group_size is None else args.group_size
        grouped = w.reshape(n, k // gs, gs)
        qmin, qmax = -(1 << (args.num_bits - 1)), (1 << (args.num_bits - 1)) - 1
        if args.symmetric:
            scale = grouped.abs().amax(dim=2) / ((qmax - qmin) / 2)
            zero = torch.zeros_like(scale)
        else:
            lo, hi = grouped.amin(dim=2).clamp(max=0), grouped.amax(dim=2).clamp(min=0)
            scale = (hi - lo) / (qmax - qmin)
            zero = torch.clamp(torch.round(qmin - lo / scale.clamp(min=1e-8)), qmin, qmax)
        state = {"weight": w, "weight_scale": scale.clamp(min=1e-8), "weight_zero_point": zero.to(torch.int8)}
    packed = compressor.compress(state, scheme)
    dequant = compressor.decompress(dict(packed), scheme)["weight"].float()
    return {name: t for name, t in packed.items() if name != "weight_zero_point" or not args.symmetric}, dequant


# ---------------------------------------------------------------------------- whole checkpoints


def quantization_config(fmt: str, **opts: Any) -> dict[str, Any]:
    """The ``quantization_config`` the format's own tool writes into config.json."""
    if fmt == "gptq":
        return {
            "quant_method": "gptq", "bits": opts.get("bits", 4), "group_size": opts.get("group_size", 128),
            "desc_act": opts.get("act_order", False), "sym": opts.get("sym", True), "static_groups": False,
            "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": opts.get("checkpoint_format", "gptq"),
        }
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts.get("group_size", 128), "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    if fmt == "fbgemm_fp8":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    if fmt == "fp8":  # AutoFP8 / vLLM: per-tensor scales
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}
    if fmt in ("pack-quantized", "float-quantized"):
        from compressed_tensors.quantization import QuantizationConfig

        scheme = _ct_scheme(fmt, opts.get("bits", 4), opts.get("group_size", 128), opts.get("sym", True), opts.get("act_order", False))
        config = QuantizationConfig(
            config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"], quantization_status="compressed",
        )
        return config.model_dump(mode="json")
    raise ValueError(f"unknown format {fmt}")


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    fmt: str,
    *,
    quantizable: Callable[[str, torch.Tensor], bool] = default_quantizable,
    hessian_diags: dict[str, torch.Tensor] | None = None,
    **opts: Any,
) -> Tensors:
    """Write ``src`` (an unquantized safetensors folder) quantized as ``fmt`` into ``dst``; return the
    dequantized float32 weights by checkpoint name (the unquantized tensors as they were).

    ``fmt``: ``gptq`` (``bits``, ``group_size``, ``sym``, ``act_order``, ``checkpoint_format``), ``awq``
    (``group_size``), ``fbgemm_fp8`` (per channel), ``fp8`` (AutoFP8, per tensor), ``pack-quantized``
    (compressed-tensors W4A16/W8A16: ``bits``, ``group_size``, ``sym``, ``act_order`` as ``actorder: weight``), ``float-quantized``
    (compressed-tensors FP8, per channel). ``hessian_diags``: by weight name, for GPTQ's act-order.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json" and item.is_file():
            shutil.copy(item, dst / item.name)
    state: Tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(file)))
    ct_scheme = None
    if fmt in ("pack-quantized", "float-quantized"):
        ct_scheme = _ct_scheme(fmt, opts.get("bits", 4), opts.get("group_size", 128), opts.get("sym", True), opts.get("act_order", False))
    out: Tensors = {}
    dequantized: Tensors = {}
    for name, tensor in state.items():
        if not quantizable(name, tensor):
            out[name] = tensor
            dequantized[name] = tensor.float()
            continue
        module = name.removesuffix(".weight")
        if fmt == "gptq":
            diag = (hessian_diags or {}).get(name)
            if opts.get("act_order") and diag is None:
                raise ValueError(f"act_order needs a hessian diagonal for {name}")
            tensors, deq = quantize_gptq(
                tensor, opts.get("bits", 4), opts.get("group_size", 128), opts.get("sym", True),
                opts.get("act_order", False), diag, opts.get("checkpoint_format", "gptq"),
            )
        elif fmt == "awq":
            tensors, deq = quantize_awq(tensor, opts.get("group_size", 128))
        elif fmt == "fbgemm_fp8":
            tensors, deq = quantize_fp8(tensor, per_channel=True)
        elif fmt == "fp8":
            tensors, deq = quantize_fp8(tensor, per_channel=False, scale_shape=())
        elif ct_scheme is not None:
            tensors, deq = quantize_compressed_tensors(tensor, ct_scheme, fmt)
        else:
            raise ValueError(f"unknown format {fmt}")
        for local, value in tensors.items():
            out[f"{module}.{local}"] = value.contiguous()
        dequantized[name] = deq
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, **opts)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def input_square_sums(hf_model: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum x**2`` per input column of every ``nn.Linear`` of ``hf_model`` over a forward pass of
    ``input_ids``, by weight name: GPTQ's Hessian diagonal, which orders its act-order columns."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[f"{name}.weight"] = sums.get(f"{name}.weight", 0) + (x * x).sum(dim=0)

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            hf_model(input_ids)
    finally:
        for handle in hooks:
            handle.remove()
    return sums
