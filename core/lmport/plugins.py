"""PluginHost: the one owner of lmport's pluggy PluginManager.

It loads plugins from entry points, isolates the ones that fail to import, detects and selects
exactly one backend, and exposes one typed method per hook, so the rest of the core never
calls ``pm.hook.<name>`` untyped. There is no module-global manager: whoever needs plugins
builds a host (the CLI does it once per process) and passes it on.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Mapping

import pluggy

from lmport import hookspecs
from lmport.capabilities import BackendInfo, Capabilities, CapabilityError
from lmport.config import ConfigAdjustment, LaunchConfig, apply_adjustments
from lmport.detection import DetectionEnv
from lmport.planning import plan_for

log = logging.getLogger(__name__)

BACKENDS_GROUP = "lmport.backends"
PLUGINS_GROUP = "lmport.plugins"
CORE_BACKEND = "cpu"
# Core modules registered like any plugin; the cpu backend's hooks are all ``trylast``.
CORE_PLUGINS = {
    CORE_BACKEND: "lmport.backends.cpu.plugin",
    "core-models": "lmport.models.plugin",
    "core-weights": "lmport.weights.plugin",
    "core-sampling": "lmport.engine.sampling.plugin",
}


class PluginError(RuntimeError):
    """A plugin problem that stops startup (the selected backend is broken or missing)."""


@dataclass
class PluginRecord:
    """One discovered plugin, loaded or not, as ``lmport backends`` shows it."""

    name: str
    group: str
    module: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    disabled: bool = False
    plugin: ModuleType | None = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.plugin is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "loaded": self.loaded,
            "disabled": self.disabled,
            "error": self.error,
        }


@dataclass(frozen=True)
class Selection:
    """The active backend, why it was chosen, and everything that was detected."""

    backend: BackendInfo
    reason: str
    detected: tuple[BackendInfo, ...]
    plugin: str = ""  # the registered plugin that detected it


def _split_names(value: str | None) -> set[str] | None:
    if value is None or not value.strip():
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginHost:
    """Typed facade over pluggy for lmport's hooks.

    Life cycle: ``load()`` -> ``select_backend()`` -> typed hook methods. ``environ`` defaults
    to a snapshot of ``os.environ`` taken at construction; it is where ``LMPORT_BACKEND``,
    ``LMPORT_PLUGINS`` and ``LMPORT_DISABLE_PLUGINS`` are read.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        load_entry_points: bool = True,
        detection_env: DetectionEnv | None = None,
    ):
        self.environ: Mapping[str, str] = dict(os.environ if environ is None else environ)
        # Tests pass a FakeMachine (lmport.testing.fake_machine) to run real detection code
        # against hardware that isn't there; production always probes this machine.
        self._detection_env = detection_env or DetectionEnv(environ=self.environ)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self.records: dict[str, PluginRecord] = {}
        self.selection: Selection | None = None
        self._capabilities: Capabilities | None = None
        self._custom_kernels = True
        self._attention_cache: dict[Any, Any] = {}
        self._layer_ops: Any = None  # LayerOps, built on first use
        self.fallbacks: list[str] = []
        self._loaded = False

    @property
    def loads_entry_points(self) -> bool:
        """Whether :meth:`load` registers installed plugins (a worker process's host does the same)."""
        return self._load_entry_points

    # ------------------------------------------------------------------ loading

    def load(self) -> "PluginHost":
        """Register entry-point plugins (external first), then the core's own modules."""
        if self._loaded:
            return self
        self._loaded = True
        allow = _split_names(self.environ.get("LMPORT_PLUGINS"))
        block = _split_names(self.environ.get("LMPORT_DISABLE_PLUGINS")) or set()
        if self._load_entry_points:
            for group in (BACKENDS_GROUP, PLUGINS_GROUP):
                for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
                    if ep.name in self.records:  # same name installed twice: first one wins
                        continue
                    record = PluginRecord(ep.name, group, ep.value)
                    if ep.dist is not None:
                        record.distribution, record.version = ep.dist.name, ep.dist.version
                    if ep.name in CORE_PLUGINS:
                        record.error = f"the name '{ep.name}' is reserved for the core's own plugin"
                    elif ep.name in block or (allow is not None and ep.name not in allow):
                        record.disabled = True
                    else:
                        try:
                            record.plugin = ep.load()
                        except Exception as exc:  # a broken plugin is reported, not fatal
                            record.error = f"{type(exc).__name__}: {exc}"
                            log.debug("plugin %s failed to import:\n%s", ep.name, traceback.format_exc())
                        else:
                            self._register(record)
                    self.records[ep.name] = record
        for name, module in CORE_PLUGINS.items():
            record = PluginRecord(name, BACKENDS_GROUP if name == CORE_BACKEND else PLUGINS_GROUP, module, "lmport")
            record.version = _version("lmport")
            record.plugin = importlib.import_module(module)
            self._register(record)
            self.records[name] = record
        return self

    def register(self, plugin: Any, name: str, group: str = PLUGINS_GROUP) -> None:
        """Register an in-process plugin object (tests, embedding applications)."""
        record = PluginRecord(name, group, getattr(plugin, "__name__", type(plugin).__name__), plugin=plugin)
        self._register(record)
        self.records[name] = record

    def _register(self, record: PluginRecord) -> None:
        """Register one plugin; a bad hookimpl (wrong arguments, unknown hook) disables only it."""
        try:
            self._pm.register(record.plugin, name=record.name)
        except Exception as exc:  # a hookimpl argument the spec doesn't have, a duplicate name
            record.error = f"{type(exc).__name__}: {exc}"
            record.plugin = None
            return
        try:
            self._pm.check_pending()  # only this plugin can be pending: each is checked on arrival
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(name=record.name)
            record.error = f"PluginValidationError: {exc}"
            record.plugin = None

    # ------------------------------------------------------------------ selection

    def backend_records(self) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.group == BACKENDS_GROUP]

    def detect(self) -> list[tuple[str, BackendInfo]]:
        """Ask every loaded backend plugin, one by one, whether its hardware is here.

        A plugin whose detection raises is reported in its record and skipped, like one that
        failed to import.
        """
        self.load()
        found: list[tuple[str, BackendInfo]] = []
        for record in self.backend_records():
            if not record.loaded:
                continue
            caller = self._only(record.name, "lmport_detect_backend")
            try:
                results = caller(env=self._detection_env)
            except Exception as exc:
                record.error = f"detection failed: {type(exc).__name__}: {exc}"
                log.debug("detection of %s failed:\n%s", record.name, traceback.format_exc())
                continue
            found.extend((record.name, info) for info in results if info is not None)
        return found

    def select_backend(self, requested: str | None = None) -> Selection:
        """Pick exactly one backend and unregister the other backend plugins.

        ``requested`` (``--backend``) wins, then ``LMPORT_BACKEND``, then the detected backend
        of highest priority, then ``cpu``. A process selects once: a second call with a
        different request is an error, since the other backends are gone by then.
        """
        if self.selection is not None:
            if requested in (None, self.selection.backend.name):
                return self.selection
            raise PluginError(
                f"backend '{self.selection.backend.name}' is already active; one backend per process"
            )
        if requested:
            source = "--backend"
        elif self.environ.get("LMPORT_BACKEND"):
            requested, source = self.environ["LMPORT_BACKEND"], "LMPORT_BACKEND"
        detected = self.detect()
        by_name = {info.name: (plugin, info) for plugin, info in detected}
        if requested:
            if requested not in by_name:
                raise PluginError(self._why_unavailable(requested, by_name))
            plugin_name, info = by_name[requested]
            reason = f"requested with {source}={requested}"
        else:
            plugin_name, info = max(detected, key=lambda pair: (pair[1].priority, pair[1].name != CORE_BACKEND))
            others = sorted(i.name for _, i in detected if i.name != info.name)
            if info.name == CORE_BACKEND:
                reason = "no accelerator backend detected"
            else:
                reason = f"highest priority ({info.priority}) among detected backends"
                if others:
                    reason += f"; also detected: {', '.join(others)}"
        for record in self.backend_records():
            if record.loaded and record.name not in (plugin_name, CORE_BACKEND):
                self._pm.unregister(name=record.name)
        self.selection = Selection(info, reason, tuple(i for _, i in detected), plugin_name)
        self._capabilities = None
        self._attention_cache.clear()
        self._layer_ops = None
        log.info("backend %s selected: %s", info.name, reason)
        return self.selection

    def _why_unavailable(self, requested: str, by_name: dict[str, Any]) -> str:
        record = next((r for r in self.backend_records() if r.name == requested), None)
        known = sorted(r.name for r in self.backend_records())
        if record is None:
            return f"backend '{requested}' is not installed; installed backends: {', '.join(known)}"
        if record.disabled:
            return f"backend '{requested}' is disabled by LMPORT_PLUGINS/LMPORT_DISABLE_PLUGINS"
        if record.error:
            return f"backend '{requested}' ({record.distribution}) failed to load: {record.error}"
        return (
            f"backend '{requested}' is installed but found no usable device; "
            f"detected: {', '.join(sorted(by_name)) or 'none'}"
        )

    @property
    def backend(self) -> BackendInfo:
        if self.selection is None:
            raise PluginError("no backend selected yet: call select_backend() first")
        return self.selection.backend

    def set_custom_kernels(self, enabled: bool) -> None:
        """``--disable-custom-kernels``: kernel hooks answer from the core's reference only."""
        self._custom_kernels = enabled
        self._attention_cache.clear()
        self._layer_ops = None

    # ------------------------------------------------------------------ typed hooks

    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            caps = self._pm.hook.lmport_capabilities(backend=self.backend)
            if caps is None:
                raise PluginError(f"backend '{self.backend.name}' reported no capabilities")
            if not isinstance(caps, Capabilities):
                raise PluginError(f"backend '{self.backend.name}' reported {type(caps).__name__}, not Capabilities")
            self._capabilities = caps
        return self._capabilities

    def adjust_config(self, config: LaunchConfig) -> tuple[LaunchConfig, list[ConfigAdjustment]]:
        """The config with every plugin's adjustments applied in order, and the adjustments."""
        results = self._pm.hook.lmport_adjust_config(config=config, capabilities=self.capabilities())
        adjustments = [r for r in results if r is not None]
        for adj in adjustments:
            if not isinstance(adj, ConfigAdjustment):
                raise PluginError(f"lmport_adjust_config returned {type(adj).__name__}, not ConfigAdjustment")
            log.info("config adjusted by %s: %s (%s)", adj.plugin or self.backend.name, adj.changes, adj.reason)
        return apply_adjustments(config, adjustments), adjustments

    def register_models(self, registry: Any) -> None:
        self._pm.hook.lmport_register_models(register=registry.register)

    def register_quantization(self, registry: Any) -> None:
        self._pm.hook.lmport_register_quantization(register=registry.register)

    def weights_loader(self, quant: Any) -> Any:
        """The loader for ``quant`` (``None``: unquantized); a clear error when no plugin has one."""
        loader = self._kernel_hook("lmport_weights_loader")(quant=quant, capabilities=self.capabilities())
        if loader is None:
            what = f"'{quant.name}' checkpoints" if quant is not None else "unquantized checkpoints"
            raise PluginError(
                f"no weights loader for {what} on backend '{self.backend.name}': "
                "lmport has no loader for this quantization format yet"
            )
        return loader

    def model_executor(self, model: Any, config: LaunchConfig) -> Any:
        return self._kernel_hook("lmport_model_executor")(model=model, config=config, capabilities=self.capabilities())

    def attention_backend(self, spec: Any) -> Any:
        """The attention implementation for ``spec``, cached per spec.

        When the active backend (and any ``lmport.plugins`` extension) answers ``None`` for a
        spec, the core's reference answers instead and the host warns once per spec: that is
        "a missing kernel falls back to the reference path", and :attr:`fallbacks` lists it
        for ``/info``.
        """
        if spec in self._attention_cache:
            return self._attention_cache[spec]
        caps = self.capabilities()
        impl = None
        if self._custom_kernels:
            impl = self._without(CORE_BACKEND, "lmport_attention_backend")(spec=spec, capabilities=caps)
            if impl is not None and not _supports(impl, spec):
                impl = None  # a backend older than the spec's feature (cross-attention, position bias)
            if impl is None and self.backend.name != CORE_BACKEND:
                message = (
                    f"backend '{self.backend.name}' has no attention kernel for {_describe(spec)}; "
                    "using the reference path"
                )
                if message not in self.fallbacks:
                    self.fallbacks.append(message)
                    log.warning(message)
        if impl is None:
            impl = self._only(CORE_BACKEND, "lmport_attention_backend")(spec=spec, capabilities=caps)
        if impl is None:
            raise PluginError(f"no attention implementation for {_describe(spec)}")
        self._attention_cache[spec] = impl
        return impl

    def layer_ops(self) -> Any:
        """The :class:`~lmport.layers.ops.LayerOps` models run: the reference with every plugin's ops on top.

        Results arrive highest priority first (the active backend before the core's ``trylast``
        reference), so they are applied in reverse and the backend's entries win.
        """
        if self._layer_ops is None:
            from lmport.layers.ops import LayerOps

            results = self._kernel_hook("lmport_layer_ops")(capabilities=self.capabilities())
            merged: dict[str, Any] = {}
            for table in reversed(results):
                merged.update(table or {})
            unknown = sorted(set(merged) - set(LayerOps.names()))
            if unknown:
                raise PluginError(f"lmport_layer_ops returned unknown ops {unknown}; known: {', '.join(LayerOps.names())}")
            not_callable = sorted(name for name, op in merged.items() if not callable(op))
            if not_callable:
                raise PluginError(f"lmport_layer_ops returned non-callable ops {not_callable}")
            self._layer_ops = LayerOps(**merged)
            if self._layer_ops.overridden():
                log.info("layer ops from backend %s: %s", self.backend.name, ", ".join(self._layer_ops.overridden()))
        return self._layer_ops

    def memory_info(self, device: Any) -> Any:
        return self._pm.hook.lmport_memory_info(device=device)

    def allocate_kv_cache(self, spec: Any, num_blocks: int, device: Any) -> Any:
        """Per-layer ``(key, value)`` tensors for ``spec.num_layers`` layers; ``spec.groups`` says which
        KV groups use them (the core maps a cross group's layers onto these tensors)."""
        return self._kernel_hook("lmport_allocate_kv_cache")(spec=spec, num_blocks=num_blocks, device=device)

    def graph_runner(self, model: Any, config: LaunchConfig) -> Any:
        """A decode graph runner, or ``None`` when graphs are off, unsupported or not provided."""
        caps = self.capabilities()
        if not self._custom_kernels or not caps.graph_capture or config.cuda_graphs == ():
            return None
        return self._pm.hook.lmport_graph_runner(model=model, config=config, capabilities=caps)

    def device_runtime(self, device: Any) -> Any:
        """The :class:`~lmport.runtime.DeviceRuntime` for ``device`` (the core's reference when no backend answers)."""
        runtime = self._pm.hook.lmport_device_runtime(device=device, capabilities=self.capabilities())
        if runtime is None:
            from lmport.runtime import DeviceRuntime

            runtime = DeviceRuntime(device)
        return runtime

    def distributed_backend(self, device_type: str) -> Any:
        """The :class:`~lmport.distributed.DistributedSpec` for workers on ``device_type``."""
        spec = self._pm.hook.lmport_distributed_backend(device_type=device_type, capabilities=self.capabilities())
        if spec is None:
            raise PluginError(
                f"backend {self.backend.name!r} names no torch.distributed backend for device {device_type!r} "
                "(lmport_distributed_backend): --num-shard > 1 is not supported there"
            )
        return spec

    def server_info(self) -> dict[str, Any]:
        """Extra ``/info`` fields; the core's (registered last, called last) win a clash."""
        merged: dict[str, Any] = {}
        for extra in reversed(self._pm.hook.lmport_server_info(capabilities=self.capabilities())):
            for key, value in (extra or {}).items():
                merged.setdefault(key, value)
        return merged

    def logits_processors(self, constraint: Any, context: Any) -> Any:
        """A new per-sequence processor for ``constraint`` (the core's llguidance backend answers last)."""
        return self._pm.hook.lmport_logits_processors(constraint=constraint, context=context)

    # ------------------------------------------------------------------ checks

    def check_quantization(self, quantize: str | None, registry: Any) -> Any:
        """Fail before loading weights if the backend cannot run ``quantize``.

        Raises :class:`CapabilityError` naming the backend, the missing capability and the
        formats the backend supports; returns the registry's method otherwise.
        """
        if quantize is None:
            return None
        caps = self.capabilities()
        method = registry.get(quantize)
        supported = ", ".join(sorted(caps.quantization)) or "none"
        if method is None:
            raise CapabilityError(
                caps.backend,
                f"quantization '{quantize}' (unknown format)",
                f"{supported}; known formats: {', '.join(registry.names())}",
            )
        if method.capability not in caps.quantization:
            raise CapabilityError(caps.backend, f"'{quantize}' quantization (capability '{method.capability}')", supported)
        return method

    # ------------------------------------------------------------------ reporting

    def list_plugins(self) -> list[PluginRecord]:
        return sorted(self.records.values(), key=lambda r: (r.group, r.name))

    def report(self) -> dict[str, Any]:
        """What ``lmport backends --json`` prints: plugins, the selection and its flags."""
        active = self.selection.plugin if self.selection is not None else None
        plugins = [{**r.to_dict(), "active": r.name == active} for r in self.list_plugins()]
        out: dict[str, Any] = {"plugins": plugins}
        if self.selection is not None:
            out["active"] = {
                "backend": dataclasses.asdict(self.selection.backend),
                "plugin": self.selection.plugin,
                "reason": self.selection.reason,
                "detected": [i.name for i in self.selection.detected],
                "capabilities": self.capabilities().to_dict(),
                "engine_plan": [list(row) for row in plan_for(self.capabilities()).describe()],
                "custom_kernels": self._custom_kernels,
            }
        return out

    # ------------------------------------------------------------------ internals

    def _only(self, plugin_name: str, hook: str) -> Any:
        others = [p for name, p in self._pm.list_name_plugin() if name != plugin_name]
        return self._pm.subset_hook_caller(hook, remove_plugins=others)

    def _without(self, plugin_name: str, hook: str) -> Any:
        plugin = self._pm.get_plugin(plugin_name)
        return self._pm.subset_hook_caller(hook, remove_plugins=[plugin] if plugin is not None else [])

    def _kernel_hook(self, hook: str) -> Any:
        if self._custom_kernels:
            return getattr(self._pm.hook, hook)
        return self._only(CORE_BACKEND, hook)


def _describe(spec: Any) -> str:
    parts = [f"head_dim={spec.head_dim}", f"dtype={spec.dtype}"]
    if spec.sliding_window:
        parts.append(f"sliding_window={spec.sliding_window}")
    if spec.alibi_slopes:
        parts.append("alibi")
    if spec.logits_soft_cap:
        parts.append(f"soft_cap={spec.logits_soft_cap}")
    if getattr(spec, "kind", "self") != "self":
        parts.append(f"kind={spec.kind}")
    if getattr(spec, "position_bias_len", None):
        parts.append("position_bias")
    if getattr(spec, "key_ranges", False):
        parts.append("key_ranges")
    return ", ".join(parts)


def _supports(impl: Any, spec: Any) -> bool:
    """Whether an attention implementation computes ``spec``'s features (old ones lack ``supports``)."""
    supports = getattr(impl, "supports", None)
    if supports is not None:
        return bool(supports(spec))
    return (
        getattr(spec, "kind", "self") == "self"
        and getattr(spec, "position_bias_len", None) is None
        and not getattr(spec, "key_ranges", False)
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
