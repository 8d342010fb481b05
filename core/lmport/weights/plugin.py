"""The core's quantization formats: names and the capability each needs.

The core reads every format in :data:`CORE_READ_FORMATS` (see docs/quantization.md): its
safetensors loader reads the tensors and each format's ``LinearMethod`` places, repacks and
multiplies them. ``exl2`` is registered (backends may report it) but has no reader: it stops at
startup with "no weights loader".
"""

from __future__ import annotations

from lmport.hookspecs import hookimpl
from lmport.weights.quantization import QuantizationMethod

KNOWN_FORMATS = (
    QuantizationMethod("gptq", "gptq", "GPTQ int4/int8 checkpoints"),
    QuantizationMethod("awq", "awq", "AWQ int4 checkpoints"),
    QuantizationMethod("marlin", "marlin", "GPTQ/AWQ repacked for Marlin kernels"),
    QuantizationMethod("eetq", "eetq", "int8 weight-only, quantized at load"),
    QuantizationMethod("fp8", "fp8", "float8 weights, per-tensor or per-channel scales"),
    QuantizationMethod("bitsandbytes", "bitsandbytes", "int8 LLM.int8(), quantized at load"),
    QuantizationMethod("bitsandbytes-nf4", "bitsandbytes", "4-bit NF4, quantized at load"),
    QuantizationMethod("bitsandbytes-fp4", "bitsandbytes", "4-bit FP4, quantized at load"),
    QuantizationMethod("compressed-tensors", "compressed-tensors", "llm-compressor W4A16/W8A16 (pack-quantized) and FP8"),
    QuantizationMethod("exl2", "exl2", "ExLlamaV2 checkpoints"),
)
CORE_READ_FORMATS = frozenset(
    {"gptq", "awq", "marlin", "fp8", "compressed-tensors", "eetq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"}
)


@hookimpl
def lmport_register_quantization(register):
    for method in KNOWN_FORMATS:
        register(method)
