"""Hooks of the fake vendor's backend (entry point ``fake`` in ``lmport.backends``).

"Hardware" is present when ``LMPORT_FAKE_VENDOR_DEVICE=1``: then it is auto-selected over the
CPU (priority 50), and ``LMPORT_BACKEND=fake`` selects it by name. Without the variable it is
installed but not detected, like a GPU plugin on a machine without a GPU.

``LMPORT_FAKE_VENDOR_PROFILE=static`` makes it a static-shape accelerator (a compiled graph per
shape, like Gaudi's HPU graphs): ``static_shapes``, no continuous batching and a compiled
batch of ``STATIC_BATCH`` sequences, which the engine plans with.
``LMPORT_FAKE_VENDOR_PROFILE=executor`` makes it a whole-model stack: ``lmport_model_executor``
answers :class:`~lmport_fake_vendor.executor.FakeCompiledExecutor`, which receives every step
as plain data (``lmport.plan.StepPlan``) and returns sampled tokens.
"""

from __future__ import annotations

import torch

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.config import ConfigAdjustment

from lmport_fake_vendor.attention import CountingAttention

NAME = "fake"
DEVICE_ENV = "LMPORT_FAKE_VENDOR_DEVICE"
PROFILE_ENV = "LMPORT_FAKE_VENDOR_PROFILE"
BLOCK_SIZES = (8, 16)
STATIC_BATCH = 4


@hookimpl
def lmport_detect_backend(env):
    if env.environ.get(DEVICE_ENV) != "1":
        return None
    return BackendInfo(
        name=NAME,
        device_type="cpu",
        priority=50,
        description="FakeAccel 1 (the CPU, wearing a vendor's hat)",
        details=(("device_count", 1), ("profile", env.environ.get(PROFILE_ENV, ""))),
    )


@hookimpl
def lmport_capabilities(backend):
    if backend.name != NAME:
        return None
    static = backend.detail("profile") == "static"
    executor = backend.detail("profile") == "executor"
    return Capabilities(
        backend=NAME,
        device_type="cpu",
        dtypes=("float32", "bfloat16"),
        paged_attention=True,
        sliding_window_attention=True,
        alibi_attention=True,
        flash_layer_norm=True,
        kv_block_sizes=BLOCK_SIZES,
        static_shapes=static,
        continuous_batching=not static,
        max_batch_size=STATIC_BATCH if static else None,
        whole_model_executor=executor,
        notes=("a test double: attention is the reference with a call counter",),
    )


@hookimpl
def lmport_adjust_config(config, capabilities):
    if capabilities.whole_model_executor and config.enable_prefix_caching:
        return ConfigAdjustment({"enable_prefix_caching": False}, "the compiled engine keeps its own KV cache", NAME)
    if config.block_size in BLOCK_SIZES:
        return None
    return ConfigAdjustment(
        changes={"block_size": BLOCK_SIZES[-1]},
        reason=f"FakeAccel kernels are tuned for {BLOCK_SIZES[-1]}-token blocks",
        plugin=NAME,
    )


@hookimpl
def lmport_model_executor(model, config, capabilities):
    if not capabilities.whole_model_executor:
        return None  # the core's paged runner runs the model with this vendor's attention
    from lmport_fake_vendor.executor import FakeCompiledExecutor

    return FakeCompiledExecutor(str(model.path), config)


@hookimpl
def lmport_attention_backend(spec):
    if spec.logits_soft_cap:
        return None  # the "kernel" lacks soft-capping: the core's reference runs such layers
    return CountingAttention(spec)


@hookimpl
def lmport_allocate_kv_cache(spec, num_blocks, device):
    """One slab for the whole cache (as a vendor's allocator might), viewed per layer."""
    slab = torch.zeros(
        (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim),
        dtype=spec.dtype,
        device=device,
    )
    return [(slab[layer, 0], slab[layer, 1]) for layer in range(spec.num_layers)]


@hookimpl
def lmport_server_info(capabilities):
    return {"device_name": "FakeAccel 1"}
