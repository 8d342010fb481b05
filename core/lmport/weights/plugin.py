"""The core's quantization formats: names and the capability each needs.

No quantized loader exists in lmport yet, so a format the backend supports still stops at
startup with "no weights loader" (see docs/hooks.md); the capability check comes first.
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
    QuantizationMethod("exl2", "exl2", "ExLlamaV2 checkpoints"),
)


@hookimpl
def lmport_register_quantization(register):
    for method in KNOWN_FORMATS:
        register(method)
