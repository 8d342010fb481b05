"""The CUDA backend's flags, from the weakest visible GPU's compute capability."""

from __future__ import annotations

from lmport.capabilities import Capabilities

AMPERE = (8, 0)  # A100, A10G, A40, RTX 30xx: flash + paged attention kernels, bf16
ADA = (8, 9)  # L4, L40, H100 (9.0): fp8
# The formats this backend runs (the core reads them, lmport_cuda's kernels multiply them). fp8
# weights load on every GPU: fp8 matrix units from sm_89 (fp8_compute), a dequantizing kernel before.
# exl2 passes the check and stops at "no weights loader" (lmport has no reader for it).
QUANTIZATION_ANY = frozenset({"gptq", "awq", "bitsandbytes", "eetq", "exl2", "fp8", "compressed-tensors"})
QUANTIZATION_AMPERE = frozenset({"marlin"})
QUANTIZATION_ADA = frozenset()
TRITON_BLOCK_SIZES = (16, 32, 64)  # the Triton paged kernels run well at 16-64 tokens per block
FLASH_ATTN_BLOCK_SIZE = 256  # flash-attn's block_table path wants a multiple of 256
HEAD_SIZES = (64, 80, 96, 128, 256)


def cuda_capabilities(compute_capability: tuple[int, int], flash_attn_installed: bool = False) -> Capabilities:
    ampere = compute_capability >= AMPERE
    ada = compute_capability >= ADA
    sm = f"sm_{compute_capability[0]}{compute_capability[1]}"
    notes = [f"flags follow the weakest visible GPU ({sm})"]
    if not ampere:
        notes.append(
            "flash and paged attention kernels need sm_80+: attention runs the reference path on "
            "this GPU; continuous batching still works"
        )
    quantization = QUANTIZATION_ANY | (QUANTIZATION_AMPERE if ampere else frozenset()) | (
        QUANTIZATION_ADA if ada else frozenset()
    )
    block_sizes = TRITON_BLOCK_SIZES
    if ampere and flash_attn_installed:
        block_sizes = (FLASH_ATTN_BLOCK_SIZE, *TRITON_BLOCK_SIZES)
        notes.append("flash-attn is installed: 256-token blocks for its paged path")
    return Capabilities(
        backend="cuda",
        device_type="cuda",
        dtypes=("bfloat16", "float16", "float32") if ampere else ("float16", "float32"),
        flash_attention=ampere,
        paged_attention=ampere,
        sliding_window_attention=ampere,
        alibi_attention=ampere,
        attention_head_sizes=HEAD_SIZES,
        flash_layer_norm=False,
        quantization=quantization,
        fp8_compute=ada,
        fp8_kv_cache=ada,
        continuous_batching=True,
        graph_capture=True,
        kv_block_sizes=block_sizes,
        notes=tuple(notes),
    )
