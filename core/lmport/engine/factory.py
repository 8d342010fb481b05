"""``build_engine``: from a LaunchConfig and a PluginHost to a serving engine.

Order: backend adjustments -> model source (:mod:`lmport.models.resolve`) -> tokenizer -> dtype -> quantization check
(before any weight is read) -> executor (a backend's whole-model executor, else the native
model on the core's paged runner, else the transformers fallback) -> KV cache sized from the
memory left after the weights -> engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lmport.config import LaunchConfig
from lmport.engine.async_engine import AsyncEngine
from lmport.executor import ModelExecutor
from lmport.engine.kv_cache_sizing import size_kv_cache
from lmport.engine.limits import check_positions, model_max_positions, resolve_limits
from lmport.engine.llm_engine import LLMEngine
from lmport.engine.model_runner import PagedModelRunner
from lmport.engine.constraints import ProcessorContext, prepare as prepare_constraints, processor_resolver
from lmport.engine.stopping import eos_token_ids
from lmport.distributed import UNSHARDED, ShardInfo
from lmport.layers.attention import KVCacheSpec
from lmport.models.base import ModelInfo
from lmport.models.loader import build_native_model
from lmport.models.resolve import ModelSource, model_info_for, resolve_model_source
from lmport.planning import plan_for
from lmport.whole_model import check_compiled_shape

log = logging.getLogger(__name__)

DEFAULT_DRAFT_TOKENS = 4  # --speculative-model without --speculate
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FP8_KV = {"fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


def build_engine(config: LaunchConfig, host: Any, source: ModelSource | None = None) -> tuple[Any, Any, ModelInfo]:
    """The serving engine (not started: ``start()``, or the first ``generate``, starts it), tokenizer and model info.

    With ``config.engine_process`` (None: on when the selected backend's device is not the
    CPU) it is an :class:`~lmport.engine.engine_process.EngineProcessClient`, whose child
    process has built the engine by the time this returns; otherwise an :class:`AsyncEngine`
    stepping in a thread of this process. Both serve the same ``generate``/``abort``/``stats``.
    """
    if host.selection is None:
        host.select_backend(config.backend)
    use_process = config.engine_process
    if use_process is None:
        use_process = host.backend.device_type != "cpu"
    if use_process:
        from lmport.engine.engine_process import EngineProcessClient

        return EngineProcessClient.launch(config, host, source)
    engine, tokenizer, info = build_llm_engine(config, host, source)
    return AsyncEngine(engine), tokenizer, info


def build_llm_engine(
    config: LaunchConfig, host: Any, source: ModelSource | None = None, *, shard: ShardInfo | None = None
) -> tuple[LLMEngine, Any, ModelInfo]:
    """The synchronous engine, tokenizer and model info for ``config`` on ``host``'s backend.

    Applies the backend's config adjustments itself, so pass the config as the user gave it.
    ``source`` is ``config.model_id`` already resolved (``lmport launch`` resolves it first, to
    log it); without it the model id is resolved here by the same
    :func:`~lmport.models.resolve.resolve_model_source`: a folder, a ``.gguf``, a hub id, or
    nothing for the default model.

    ``shard``: build this process as one rank of a tensor-parallel group that it joined itself,
    with no workers (every rank then runs its own engine on the same requests; tests use it).
    """
    started = time.monotonic()
    if host.selection is None:
        host.select_backend(config.backend)
    host.set_custom_kernels(not config.disable_custom_kernels)
    config, _ = host.adjust_config(config)
    caps = host.capabilities()
    device = torch.device(caps.device_type)
    apply_host_threads(caps, shard.world_size if shard is not None else max(config.num_shard, 1))

    source = source or resolve_model_source(config.model_id, config.revision)
    info = model_info_for(source, config.trust_remote_code)
    path = source.path
    log.info("model %s (%s) from %s on backend '%s'", info.model_id, info.architecture, path, caps.backend)
    if config.max_total_tokens:  # before any weight is read (the default is clamped to the positions)
        check_positions(config.max_total_tokens, info.hf_config)
    tokenizer = load_tokenizer(config, path)
    dtype = pick_dtype(config.dtype, info.hf_config, device, caps)
    log.info("dtype %s on %s", str(dtype).removeprefix("torch."), device)

    quant = check_quantization(config, info, host)
    world = shard_world_size(config, host) if shard is None else None
    if world is None:
        executor = build_executor(config, host, info, dtype, device, quant, shard=shard or UNSHARDED)
    else:
        from lmport.engine.sharded import ShardedExecutor

        executor = ShardedExecutor.start(
            dataclasses.replace(config, num_shard=world), host, source,
            lambda shard, rank_device: build_executor(config, host, info, dtype, rank_device, quant, shard=shard),
        )  # fmt: skip
        device = executor.runner.device
    spec: KVCacheSpec = executor.kv_cache_spec()
    draft = build_draft_runner(config, host, info, tokenizer, dtype, device, executor)  # before sizing: its weights count
    max_positions = model_max_positions(info.hf_config)
    compiled = getattr(executor, "compiled_shape", None)  # a whole model compiled for one shape
    backend_max_batch = caps.max_batch_size
    if compiled is not None:
        check_compiled_shape(config, compiled, caps.backend)
        max_positions = min(max_positions, compiled.sequence_length)
        backend_max_batch = min(filter(None, (backend_max_batch, compiled.batch_size)))
        num_blocks = compiled.kv_blocks(spec.block_size)
    else:
        extra = draft.kv_cache_spec().bytes_per_block() if draft is not None else 0
        num_blocks = size_kv_cache(config, host, spec, device, max_positions, extra_bytes_per_block=extra)
    if world is not None:
        num_blocks = executor.min_kv_blocks(num_blocks, max_positions)
    elif shard is not None:
        num_blocks = shard.comm.all_min(num_blocks)
    limits = resolve_limits(
        config,
        max_positions=max_positions,
        block_size=spec.block_size,
        num_blocks=num_blocks,
        backend_max_batch_size=backend_max_batch,
        accepts_images=bool(getattr(executor, "accepts_images", False)),  # executors need not subclass ModelExecutor
        fixed_slots=plan_for(caps).fixed_slots,
    )
    log.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB); max_input_tokens=%d max_total_tokens=%d "
        "max_batch_prefill_tokens=%d",
        num_blocks, spec.block_size, limits.max_batch_total_tokens, num_blocks * spec.bytes_per_block() / 2**20,
        limits.max_input_tokens, limits.max_total_tokens, limits.max_batch_prefill_tokens,
    )
    eos_ids = eos_token_ids(info.path, tokenizer, info.hf_config)
    vocab_size = model_vocab_size(info.hf_config, tokenizer)
    engine = LLMEngine(
        executor, tokenizer, limits, eos_token_ids=eos_ids,
        vocab_size=vocab_size,
        async_scheduling=wants_async_scheduling(config, device),
        processors=processor_resolver(context := ProcessorContext(tokenizer, vocab_size, tuple(sorted(set(eos_ids)))), host),
        speculator=build_speculator(config, executor, draft, num_blocks),
    )
    if not config.disable_grammar_support:
        prepare_constraints(context)  # the grammar backend's vocabulary, built in the background
    # compile-on-first-use kernels: compile them now, not in the first burst (a whole-model
    # executor with its own warm_up ran it in initialize_cache)
    if device.type != "cpu" and not hasattr(executor, "warm_up"):
        from lmport.engine.warmup import warm_up_engine

        warm_up_engine(engine)
    log.info("engine ready in %.1f s", time.monotonic() - started)
    return engine, tokenizer, info


# ---------------------------------------------------------------------- steps


def speculative_tokens(config: LaunchConfig) -> int:
    """Draft tokens per step: ``--speculate``, else 4 with a ``--speculative-model``, else 0 (off)."""
    if config.speculate < 0:
        raise ValueError(f"--speculate must be at least 0, got {config.speculate}")
    return config.speculate or (DEFAULT_DRAFT_TOKENS if config.speculative_model else 0)


def _check_speculation(config: LaunchConfig, executor: Any) -> None:
    if not isinstance(executor, PagedModelRunner):
        raise ValueError(f"speculative decoding (--speculate) runs on the core's paged runner; this model runs on "
                         f"{type(executor).__name__}")  # fmt: skip
    if executor._cross_groups:
        raise ValueError("speculative decoding (--speculate) is for decoder-only models; this one is an encoder-decoder")
    if getattr(executor, "shape_buckets", None) is not None:
        raise ValueError("speculative decoding (--speculate) needs dynamic shapes; this backend pads steps to static shapes")


def build_draft_runner(config: LaunchConfig, host: Any, info: ModelInfo, tokenizer: Any, dtype: torch.dtype,
                       device: torch.device, executor: Any) -> PagedModelRunner | None:  # fmt: skip
    """The ``--speculative-model``'s paged runner (native families only; its cache is not allocated yet)."""
    if not speculative_tokens(config) or not config.speculative_model:
        return None
    _check_speculation(config, executor)
    if executor.accepts_images:
        raise ValueError("--speculative-model: a draft model for an image-text model is not supported (use n-gram --speculate)")
    if getattr(executor, "kv_window", None):
        # the block manager gives back blocks that left the window; the draft (its own cache on the
        # same block tables) would still read them
        raise ValueError("--speculative-model: a target whose every layer is windowed frees old blocks; use n-gram --speculate")
    source = resolve_model_source(config.speculative_model, None)
    draft_info = model_info_for(source, config.trust_remote_code)
    target_vocab, draft_vocab = model_vocab_size(info.hf_config, tokenizer), model_vocab_size(draft_info.hf_config, tokenizer)
    if draft_vocab != target_vocab:
        raise ValueError(f"--speculative-model {config.speculative_model}: its vocabulary ({draft_vocab} tokens) is not "
                         f"the target's ({target_vocab}); a draft model needs the target's tokenizer")  # fmt: skip
    model = build_native_model(draft_info, host, dtype=dtype, device=device)
    if model is None:
        raise ValueError(f"--speculative-model: {draft_info.architecture} has no native implementation in lmport")
    log.info("speculative decoding: draft model %s (%s)", draft_info.model_id, draft_info.architecture)
    return PagedModelRunner(model, block_size=executor.block_size, device=device, kv_cache_dtype=executor.kv_cache_dtype,
                            host=host, config=config, max_batch_size=executor.max_batch_size)  # fmt: skip


def build_speculator(config: LaunchConfig, executor: Any, draft: PagedModelRunner | None, num_blocks: int) -> Any:
    """The engine's :class:`~lmport.engine.speculative.speculator.Speculator`, or None without ``--speculate``."""
    from lmport.engine.speculative.ngram import NgramProposer
    from lmport.engine.speculative.speculator import NgramStepProposer, Speculator

    k = speculative_tokens(config)
    if not k:
        return None
    _check_speculation(config, executor)
    if draft is not None:
        from lmport.engine.speculative.draft_model import DraftModelProposer

        draft.initialize_cache(num_blocks)  # the same blocks as the target's, through its block tables
        log.info("speculative decoding: %d draft tokens per step from the draft model", k)
        return Speculator(DraftModelProposer(draft), k, "draft")
    log.info("speculative decoding: %d draft tokens per step by n-gram prompt lookup", k)
    return Speculator(NgramStepProposer(NgramProposer()), k, "ngram")


def apply_host_threads(caps: Any, ranks: int = 1) -> None:
    """The backend's ``host_threads``, shared by the ``ranks`` processes of a sharded CPU engine."""
    if not caps.host_threads:
        return
    threads = max(1, caps.host_threads // ranks)
    if threads != torch.get_num_threads():
        log.info("torch intra-op threads: %d (backend '%s')", threads, caps.backend)
        torch.set_num_threads(threads)


def shard_world_size(config: LaunchConfig, host: Any) -> int | None:
    """How many tensor-parallel ranks to run (None: one process, no workers).

    ``--num-shard N`` above 1 shards over N devices; ``--sharded true`` alone shards over every
    device of the backend's type the process sees (on the CPU, or with ``--num-shard 1``: one
    rank, through the worker path all the same).
    """
    if config.num_shard > 1:
        return config.num_shard
    if config.sharded:
        runtime = host.device_runtime(torch.device(host.capabilities().device_type))
        return config.num_shard if config.num_shard_given else runtime.device_count()
    return None


def build_rank_runner(config: LaunchConfig, host: Any, source: ModelSource, shard: ShardInfo, device: torch.device):
    """A worker's (rank >= 1) slice of the model on its runner, by the same steps as rank 0's; and the adjusted config."""
    host.set_custom_kernels(not config.disable_custom_kernels)
    config, _ = host.adjust_config(config)
    caps = host.capabilities()
    apply_host_threads(caps, shard.world_size)
    info = model_info_for(source, config.trust_remote_code)
    dtype = pick_dtype(config.dtype, info.hf_config, device, caps)
    quant = check_quantization(config, info, host)
    return build_executor(config, host, info, dtype, device, quant, shard=shard), config


def wants_async_scheduling(config: LaunchConfig, device: torch.device) -> bool:
    """``--async-scheduling``, or by default: on for an accelerator (the host's work overlaps the
    device's), off on the CPU (there the "device" is the host: nothing would overlap)."""
    return device.type != "cpu" if config.async_scheduling is None else bool(config.async_scheduling)


def load_tokenizer(config: LaunchConfig, path: Path) -> Any:
    from transformers import AutoTokenizer

    source = config.tokenizer_id or str(path)
    log.info("loading tokenizer from %s", source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)


def model_vocab_size(hf_config: Any, tokenizer: Any) -> int | None:
    """How many token ids the model embeds (its text config's ``vocab_size``, plus Idefics'
    ``additional_vocab_size``), else the tokenizer's size."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    size = getattr(text_config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size + int(getattr(text_config, "additional_vocab_size", 0) or 0)
    return len(tokenizer) if hasattr(tokenizer, "__len__") else None


def pick_dtype(requested: str | None, hf_config: Any, device: torch.device, caps: Any) -> torch.dtype:
    """``--dtype`` if given; else the checkpoint's own dtype where the backend computes it at full speed.

    A checkpoint that names no dtype (a GGUF: its weights are 4-8 bit) runs in bfloat16 (float16
    where the backend lacks it); one the backend cannot run falls back to the first of bfloat16,
    float16, float32 it has; one outside the backend's ``fast_dtypes`` runs in the first of those
    (the CPU backend: float32, plus bfloat16 where the CPU has bf16 dot products).
    """
    if requested:
        name = _DTYPE_ALIASES.get(requested, requested)
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype '{requested}'; choose one of {', '.join(_DTYPES)}")
        if not caps.supports_dtype(name):
            raise ValueError(f"backend '{caps.backend}' does not support dtype {name}; supported: {', '.join(caps.dtypes)}")
        return _DTYPES[name]
    declared = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else None
    if name not in _DTYPES:
        name = "bfloat16" if caps.supports_dtype("bfloat16") else "float16"
    if not caps.supports_dtype(name):
        name = next((d for d in ("bfloat16", "float16", "float32") if caps.supports_dtype(d)), "float32")
    if caps.fast_dtypes is not None and name not in caps.fast_dtypes:
        name = caps.fast_dtypes[0]
    if name == "float32":
        log.info("the checkpoint is float32: pass --dtype bfloat16 (or float16) to halve memory and time per step")
    return _DTYPES[name]


def check_quantization(config: LaunchConfig, info: ModelInfo, host: Any) -> tuple[Any, Any]:
    """The checkpoint's quantization, checked against the backend before weights load:
    ``(QuantizationMethod or None, QuantizationConfig or None)``."""
    from lmport.layers.quantization.detect import build_quantization_config, quantization_format
    from lmport.weights.quantization import QuantizationRegistry

    name, checkpoint_config = quantization_format(config.quantize, info.hf_config, info.path)
    registry = QuantizationRegistry()
    host.register_quantization(registry)
    method = host.check_quantization(name, registry)
    if method is None:
        return None, None
    host.weights_loader(method)  # raises now, naming the backend, when no loader reads it
    quantization = build_quantization_config(method.name, checkpoint_config)
    log.info("quantization: %s", quantization.describe())
    return method, quantization


def build_executor(
    config: LaunchConfig, host: Any, info: ModelInfo, dtype: torch.dtype, device: torch.device, quant: Any = (None, None),
    shard: ShardInfo = UNSHARDED,
) -> ModelExecutor:  # fmt: skip
    """A backend's whole-model executor, else the native model or the transformers fallback on the paged runner.

    ``quant``: ``(QuantizationMethod, QuantizationConfig)`` from :func:`check_quantization`, or ``(None, None)``.
    ``shard``: a tensor-parallel rank's slice (native families only).
    """
    method, quantization = quant
    executor = host.model_executor(info, config) if not shard.sharded else None
    if executor is not None:
        log.info("backend '%s' runs the whole model (%s)", host.backend.name, type(executor).__name__)
        return executor
    caps = host.capabilities()
    block_size = config.block_size or caps.default_block_size
    if block_size not in caps.kv_block_sizes:
        raise ValueError(f"block size {block_size} is not supported by backend '{caps.backend}': {caps.kv_block_sizes}")
    # A GGUF of a native family is dequantized once into a safetensors cache; others go through transformers.
    model = build_native_model(info, host, dtype=dtype, device=device, quant_method=method, quantization=quantization,
                               shard=shard)  # fmt: skip
    if model is None and shard.sharded:
        raise ValueError(f"--num-shard {shard.world_size}: {info.architecture} has no native lmport family, and "
                         "the transformers fallback does not shard; run it with one shard")  # fmt: skip
    if model is not None:
        log.info("native model for %s loaded", info.architecture)
    elif method is not None:
        raise ValueError(
            f"'{method.name}' checkpoints load into lmport's native families only; {info.architecture} has none"
        )
    else:
        from lmport.models.hf_fallback import load_fallback

        # load_fallback logs the one line saying so (with the cache shape it found)
        model = load_fallback(info, host, dtype, device, config.trust_remote_code)
        if isinstance(model, ModelExecutor):
            return model
    kv_dtype = pick_kv_cache_dtype(config.kv_cache_dtype, dtype, caps)
    max_batch = min(filter(None, (config.max_batch_size, caps.max_batch_size)), default=None)
    plan = plan_for(caps)
    if plan.shape_buckets is not None:
        log.info("static shapes: steps padded to buckets (%s)", plan.shape_buckets.describe())
    return PagedModelRunner(
        model, block_size=block_size, device=device, kv_cache_dtype=kv_dtype, host=host, config=config,
        max_batch_size=max_batch, shape_buckets=plan.shape_buckets,
    )


def pick_kv_cache_dtype(requested: str | None, dtype: torch.dtype, caps: Any) -> torch.dtype:
    """The model's dtype unless ``--kv-cache-dtype`` asks otherwise (fp8 needs the backend's flag)."""
    if not requested:
        return dtype
    if requested in _FP8_KV:
        if not caps.fp8_kv_cache:
            raise ValueError(f"backend '{caps.backend}' has no fp8 KV cache (kv_cache_dtype={requested})")
        return _FP8_KV[requested]
    name = _DTYPE_ALIASES.get(requested, requested)
    if name not in _DTYPES:
        raise ValueError(f"unknown kv cache dtype '{requested}'; choose one of {', '.join([*_DTYPES, *_FP8_KV])}")
    return _DTYPES[name]
