"""The launcher's settings as one frozen dataclass.

Plugins never mutate it: ``lmport_adjust_config`` returns a :class:`ConfigAdjustment` and the
core applies it with :func:`dataclasses.replace`, logging the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LaunchConfig:
    # model
    model_id: str = ""
    revision: str | None = None
    dtype: str | None = None  # None: the checkpoint's torch_dtype (float32 on CPU)
    quantize: str | None = None
    trust_remote_code: bool = False
    tokenizer_id: str | None = None
    # request limits (TGI's names and defaults)
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_client_batch_size: int = 4  # prompts per /v1/completions request (TGI's flag)
    # scheduler
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    enable_prefix_caching: bool = True
    # backend and kernels
    backend: str | None = None
    disable_custom_kernels: bool = False
    cuda_memory_fraction: float = 1.0
    cuda_graphs: tuple[int, ...] | None = None  # None: the backend's default buckets; () disables
    block_size: int | None = None  # None: the attention backend's choice
    kv_cache_dtype: str | None = None
    num_shard: int = 1
    # tensor parallelism (TGI's --sharded): True shards over every visible device, or --num-shard;
    # False refuses --num-shard > 1; None: shard when --num-shard > 1
    sharded: bool | None = None
    num_shard_given: bool = False  # --num-shard was on the command line (with --sharded: that many ranks)
    # schedule and launch step N+1 before step N's tokens reach the host, so the host's work
    # overlaps the device's. None: on for accelerators, off on CPU (where the "device" is the
    # host itself and nothing would overlap)
    async_scheduling: bool | None = None
    # run the engine loop in a child process, so the HTTP event loop and the step loop do not
    # share one GIL. None: on when the selected backend's device is not the CPU, off on CPU
    # (where the child would compete with the server for the same cores)
    engine_process: bool | None = None
    # deadlines in seconds from arrival (None: none): a request past request_timeout is ended
    # and its blocks freed; one still waiting to be scheduled after max_queue_time is refused
    request_timeout: float | None = None
    max_queue_time: float | None = None
    # speculative decoding: draft tokens verified per step (TGI's --speculate; 0: off), proposed by
    # n-gram prompt lookup, or by speculative_model (a small checkpoint with the same tokenizer)
    speculate: int = 0
    speculative_model: str | None = None
    # how many times in a row a dead engine process is restarted (0: never; it then stays down)
    engine_restarts: int = 5
    # server
    hostname: str = "0.0.0.0"
    port: int = 3000
    validation_workers: int = 2  # threads that tokenize and render chat templates (TGI's flag)
    served_model_name: str | None = None  # None: the hub id, or a local checkpoint's folder/file name
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()  # --api-key-file's keys; accepted besides api_key
    payload_limit: int = 2_000_000
    cors_allow_origin: tuple[str, ...] = ()
    json_output: bool = False
    disable_grammar_support: bool = False
    # image inputs (models that take them): lmport.server.images
    allow_remote_images: bool = False  # fetch http(s) image URLs (else only data URIs)
    max_images_per_request: int = 4
    max_image_bytes: int = 10 * 2**20
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def replace(self, **changes: Any) -> "LaunchConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ConfigAdjustment:
    """What a plugin wants changed in the config, and why (shown in the startup log)."""

    changes: dict[str, Any]
    reason: str
    plugin: str = ""


def apply_adjustments(config: LaunchConfig, adjustments: list[ConfigAdjustment]) -> LaunchConfig:
    """Apply plugin adjustments in order; an unknown field is a plugin bug and raises."""
    names = {f.name for f in dataclasses.fields(LaunchConfig)}
    for adj in adjustments:
        unknown = set(adj.changes) - names
        if unknown:
            raise ValueError(f"plugin {adj.plugin or '?'} adjusts unknown settings {sorted(unknown)}")
        config = dataclasses.replace(config, **adj.changes)
    return config
