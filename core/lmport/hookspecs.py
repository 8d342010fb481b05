"""Every hook lmport calls, grouped by the phase in which it is called.

A plugin is a module (or object) of functions decorated with :data:`lmport.hookimpl` whose
names match these specs. Backend plugins are published under the entry-point group
``lmport.backends``; general extensions (a quantization format, a model family) under
``lmport.plugins``. Only the *selected* backend plugin stays registered after detection, so a
backend's implementations never have to ask "am I the active one?".

The core registers its reference implementations (the built-in ``cpu`` backend) with
``trylast=True``: a backend overrides one by implementing the hook; whatever it leaves out
falls through to the reference. An implementation may accept fewer arguments than the spec
(pluggy passes only what it names), so adding an argument here never breaks a plugin.

The core never calls ``pm.hook.<name>`` itself; :class:`lmport.plugins.PluginHost` has one
typed method per hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from lmport.capabilities import BackendInfo, Capabilities
    from lmport.config import ConfigAdjustment, LaunchConfig
    from lmport.detection import DetectionEnv
    from lmport.engine.api import Constraint
    from lmport.engine.constraints import LogitsProcessor, ProcessorContext
    from lmport.executor import ModelExecutor
    from lmport.graphs import DecodeGraphRunner
    from lmport.layers.attention import AttentionBackend, AttentionSpec, KVCache, KVCacheSpec
    from lmport.memory import MemoryInfo
    from lmport.runtime import DeviceRuntime
    from lmport.distributed import DistributedSpec
    from lmport.models.base import CausalLM, ModelInfo
    from lmport.weights.quantization import QuantizationMethod, WeightsLoader

PROJECT = "lmport"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Phase 1: discovery and selection (before any device work)
# --------------------------------------------------------------------------------------------


@hookspec
def lmport_detect_backend(env: DetectionEnv) -> BackendInfo | None:
    """Say whether this plugin's hardware is present, cheaply.

    Called once per process for every installed backend plugin, before selection.

    :param env: the process environment and the probes detection may use, passed in so that
        detection never reads module globals: ``env.environ``, ``env.module_available(name)``
        (``find_spec``, no import), ``env.run(argv)`` (a driver tool's stdout, short timeout),
        ``env.path_exists``/``env.glob``/``env.read_text`` (``/sys``, ``/dev``),
        ``env.distribution_version(name)`` and ``env.torch_build()`` (torch's CUDA/HIP version,
        read without importing torch). Tests pass a ``FakeMachine`` with the same methods.
    :return: a :class:`~lmport.capabilities.BackendInfo` if the hardware is usable, else
        ``None``. Detection must not create a device context (no ``torch.cuda.init()``, no
        kernel launch): query drivers or package metadata only.

    The host calls each backend plugin's implementation on its own (a plugin that raises is
    reported and skipped) and picks ``--backend`` if given, else ``LMPORT_BACKEND``, else the
    detected backend of highest ``priority``, else ``cpu``. The other backend plugins are then
    unregistered: exactly one backend is active per process.
    """


@hookspec(firstresult=True)
def lmport_capabilities(backend: BackendInfo) -> Capabilities | None:
    """Report the selected backend's feature flags.

    Called once, right after selection, when only the selected backend plugin (and the core's
    ``cpu`` plugin, ``trylast``) are registered. Flags are checked before anything is loaded
    (``--quantize awq`` on a backend without ``awq`` is a startup error) and shown by
    ``lmport backends`` and ``/info``.

    :param backend: the info this plugin returned from detection.
    :return: a frozen, picklable :class:`~lmport.capabilities.Capabilities`, or ``None`` if
        ``backend`` is not this plugin's. First non-``None`` wins.
    """


@hookspec
def lmport_adjust_config(config: LaunchConfig, capabilities: Capabilities) -> ConfigAdjustment | None:
    """Ask for settings this backend needs (e.g. a fixed KV block size on Gaudi).

    Called once after capabilities are known and before anything is loaded.

    :return: a :class:`~lmport.config.ConfigAdjustment` with the changed fields and a reason,
        or ``None``. Never mutate ``config`` (it is frozen). All results are applied in
        order; each is logged with its reason.
    """


# --------------------------------------------------------------------------------------------
# Phase 2: building the model
# --------------------------------------------------------------------------------------------


@hookspec
def lmport_register_models(register: Callable[..., None]) -> None:
    """Register model builders: ``register(architectures, builder, priority=0)``.

    Called once when the model registry is first built. ``architectures`` is a string or a
    list of Hugging Face architecture names (``"LlamaForCausalLM"``); ``builder(hf_config,
    context)`` returns a :class:`~lmport.models.base.CausalLM`. The highest priority wins
    per architecture, so a backend can register a faster builder for a family the core
    already has. All implementations are called; nothing is returned.
    """


@hookspec
def lmport_register_quantization(register: Callable[..., None]) -> None:
    """Register quantization formats: ``register(QuantizationMethod(...))``.

    Called once when the quantization registry is built. Each method names the capability
    (a member of ``Capabilities.quantization``) that a backend must report to run it. All
    implementations are called; nothing is returned.
    """


@hookspec(firstresult=True)
def lmport_weights_loader(quant: QuantizationMethod | None, capabilities: Capabilities) -> WeightsLoader | None:
    """Return the loader that reads checkpoint tensors for ``quant`` on this backend.

    Called once per model load, after the capability check passed. ``quant`` is ``None``
    for an unquantized checkpoint. First non-``None`` wins; the core's reference loader
    (plain safetensors) answers last for ``None`` only, so a quantized format without a
    loader is a clear startup error.
    """


@hookspec(firstresult=True)
def lmport_model_executor(model: ModelInfo, config: LaunchConfig, capabilities: Capabilities) -> ModelExecutor | None:
    """Take over execution of the whole model (stacks that compile whole graphs).

    Called once per model load, before the core builds its own runner. Return a
    :class:`~lmport.executor.ModelExecutor` to run the model yourself (the core
    still schedules, tokenizes, stops and serves), or ``None`` to let the core's paged runner
    run it with your fine-grained hooks. First non-``None`` wins.

    A whole-model executor sets ``takes_plan = True``: each step arrives as a
    :class:`lmport.plan.StepPlan` (plain data) and it returns the step's sampled tokens as an
    :class:`~lmport.executor.ExecutorOutput`. An optional ``compiled_shape``
    (:class:`lmport.whole_model.CompiledShape`) is checked against the launch limits at start
    and caps the engine's batch. :mod:`lmport.whole_model` has slots, per-sequence state and
    sampling for such executors; ``lmport.testing.executor_conformance`` tests one.
    """


# --------------------------------------------------------------------------------------------
# Phase 3: kernels and memory (while building the runner and at warm-up)
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lmport_attention_backend(spec: AttentionSpec, capabilities: Capabilities) -> AttentionBackend | None:
    """Return the attention implementation for one layer kind.

    Called once per distinct :class:`~lmport.layers.attention.AttentionSpec` while the
    model is built (the host caches the result per spec). Return ``None`` for a spec you
    have no kernel for (a sliding window, say): the core's reference attention then runs
    it, the host logs one warning and lists the fallback for ``/info``. Returning the
    reference yourself means "this backend runs it so", without a warning. First
    non-``None`` wins; with ``--disable-custom-kernels`` only the core's reference answers.
    A result whose ``supports(spec)`` is false (or that predates ``supports`` while the spec
    is a cross-attention or position-bias one) is treated as ``None``. The backend builds
    its per-step state once per step (``prepare_metadata``) and keeps it in static buffers
    for decode graphs (``init_capture_graph``, ``prepare_for_replay``); see
    :class:`~lmport.layers.attention.AttentionBackend`.
    """


@hookspec
def lmport_layer_ops(capabilities: Capabilities) -> dict[str, Callable[..., Any]] | None:
    """Supply fused implementations of the small per-layer ops (RMSNorm, residual add, RoPE, SiLU·mul).

    Called once per model build, after the model is constructed and before its weights are
    loaded; the ops are bound into every layer that runs them (``RMSNorm``, ``GatedMLP``,
    the Llama family's attention), so no model constructor changes.

    :param capabilities: the active backend's flags.
    :return: a dict from op name to callable, any subset of the fields of
        :class:`~lmport.layers.ops.LayerOps` (``rms_norm``, ``fused_add_rms_norm``,
        ``rotary``, ``silu_and_mul``; the signatures are documented there), or ``None``.
        Ops must be functional (never write their inputs) and, on a graph-capturing backend,
        capturable (no host syncs). All results are merged: the core's reference entries
        (``cpu``, ``trylast``) first, then every other plugin's on top, the active backend's
        last, so what a backend leaves out stays the reference. An unknown op name is a
        startup error. With ``--disable-custom-kernels`` only the reference answers.
    """


@hookspec(firstresult=True)
def lmport_memory_info(device: torch.device) -> MemoryInfo | None:
    """Report free and total device memory in bytes, to size the KV cache at warm-up.

    Called at warm-up, after the model's weights are loaded. Return ``None`` for a device
    that is not yours; the core answers for ``cpu`` only. First non-``None`` wins.
    """


@hookspec(firstresult=True)
def lmport_allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[KVCache] | None:
    """Allocate the paged KV cache: one ``(key_cache, value_cache)`` pair per layer.

    Called once at warm-up. The logical layout the core and attention backends agree on is
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` per tensor; a backend that allocates
    differently must also provide the attention that reads it. First non-``None`` wins.
    ``spec.num_layers`` tensors pairs are wanted; ``spec.groups`` names the model's KV cache
    groups (full, sliding, cross) that the core maps onto them (a cross group reuses the
    token groups' tensors: its blocks are never theirs at the same time).
    """


@hookspec(firstresult=True)
def lmport_graph_runner(model: CausalLM, config: LaunchConfig, capabilities: Capabilities) -> DecodeGraphRunner | None:
    """Return a runner that captures decode steps as device graphs (CUDA/HPU graphs).

    Called once at warm-up, and only when ``capabilities.graph_capture`` is set, custom
    kernels are enabled and ``config.cuda_graphs`` is not ``()`` (``--cuda-graphs 0``); the
    host returns ``None`` otherwise. First non-``None`` wins; ``None`` runs decode eagerly.
    """


@hookspec(firstresult=True)
def lmport_device_runtime(device: torch.device, capabilities: Capabilities) -> DeviceRuntime | None:
    """Return the :class:`~lmport.runtime.DeviceRuntime` for ``device``: pinned host buffers,
    asynchronous copies to and from the device, the events that mark a copy's end, and the
    device each worker rank runs on.

    Called once per executor (per rank when sharded). The core's reference (``trylast``) works
    on any device with generic ``torch.Event`` (blocking copies where that is unsupported);
    return a subclass where your device needs its own events or streams. First non-``None`` wins.
    """


@hookspec(firstresult=True)
def lmport_distributed_backend(device_type: str, capabilities: Capabilities) -> DistributedSpec | None:
    """Name how tensor-parallel workers on ``device_type`` join: a
    :class:`~lmport.distributed.DistributedSpec` with the ``torch.distributed`` process-group
    backend (``"nccl"`` on CUDA, which ROCm builds map to RCCL; ``"hccl"`` on Gaudi) and,
    optionally, a factory for a device communicator that replaces the process group's
    all-reduce/all-gather (a custom all-reduce kernel).

    Called in every worker before the process group is created. The core answers ``gloo``
    for ``cpu`` (``trylast``); ``None`` for a device that is not yours. First non-``None`` wins.
    """


# --------------------------------------------------------------------------------------------
# Phase 4: serving
# --------------------------------------------------------------------------------------------


@hookspec
def lmport_server_info(capabilities: Capabilities) -> dict[str, Any] | None:
    """Extra fields for ``GET /info`` (driver version, device name ...).

    Called when the server starts. All results are merged in registration order, core first;
    keys already set by the core are not overwritten.
    """


@hookspec(firstresult=True)
def lmport_logits_processors(constraint: Constraint, context: ProcessorContext) -> LogitsProcessor | None:
    """Return a new stateful logits processor for one sequence under ``constraint``.

    ``constraint`` (:class:`lmport.engine.api.Constraint`, plain data from ``SamplingParams``):
    ``kind`` ``json_schema`` / ``json_object`` / ``regex`` / ``lark`` and its ``value``.
    ``context`` (:class:`lmport.engine.constraints.ProcessorContext`): the tokenizer, the logits
    width and the EOS ids. The processor follows :class:`lmport.engine.constraints.LogitsProcessor`
    (``needs_host_tokens``, ``advance(token)``, the batch class methods ``begin`` and ``apply``).
    Raise :class:`lmport.engine.errors.RequestValidationError` for a constraint you cannot
    compile or whose features you do not support (the message names them: the server answers
    422). Called in the server process to check a request before it is submitted, and in the
    engine process once per sequence. First non-``None`` wins; the core's llguidance backend
    (``lmport.engine.sampling.plugin``) answers last, so returning ``None`` leaves a
    constraint to it.
    """
