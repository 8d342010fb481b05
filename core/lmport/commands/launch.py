"""``lmport launch`` (alias ``text-generation-launcher``): TGI's launcher, in one process.

Resolve the model (a folder, a .gguf, a hub id, or the default Gemma-3-270M package) ->
select the backend -> build the engine (weights, KV cache) -> serve the HTTP app, whose
startup warms the engine up. Every step logs its progress and duration. SIGINT/SIGTERM stop
accepting connections, let in-flight requests finish, shut the engine down and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from lmport.commands.launch_flags import FlagError, LaunchSettings, add_flags, resolve_settings

log = logging.getLogger("lmport.launch")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "launch",
        help="serve a model over TGI's and OpenAI's HTTP APIs (TGI's launcher flags)",
        description="Load a model and serve it with TGI's routes (/generate, /generate_stream, /info, /metrics ...) "
        "and OpenAI's (/v1/chat/completions, /v1/completions, /v1/models). Every flag can also be set "
        "through TGI's environment variable named in its help.",
    )
    add_flags(parser)
    parser.set_defaults(func=run)
    return parser


class JsonLogFormatter(logging.Formatter):
    """``--json-output``: one JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(json_output: bool, environ: Mapping[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(environ.get("LOG_LEVEL", "INFO").upper())
    for noisy in ("uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Stopped(Exception):
    """SIGTERM arrived before the server was up."""


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        settings = resolve_settings(args, environ)
    except FlagError as exc:
        print(f"lmport launch: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.config.json_output, environ)
    for warning in settings.warnings:
        log.warning(warning)

    def stop_loading(signum: int, frame: Any) -> None:
        raise _Stopped()

    previous = signal.signal(signal.SIGTERM, stop_loading) if _main_thread() else None
    try:
        app = prepare(settings)
    except (KeyboardInterrupt, _Stopped):
        log.info("interrupted while loading; exiting")
        return 0
    except Exception as exc:  # a clear one-line reason, not a traceback, for what the user can fix
        log.debug("startup failed", exc_info=True)
        log.error("startup failed: %s", exc)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    from lmport.server.serve import serve

    config = settings.config
    log.info("serving on http://%s:%d (docs at /docs); warming up", config.hostname, config.port)
    code = serve(app, config.hostname, config.port, graceful_timeout=settings.graceful_shutdown_timeout)
    log.info("stopped")
    return code


def prepare(settings: LaunchSettings) -> Any:
    """Everything before serving: model, backend, engine; returns the app."""
    from lmport.engine.factory import build_engine
    from lmport.models.resolve import resolve_model_source
    from lmport.plugins import PluginHost
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state

    config = settings.config
    started = time.monotonic()
    log.info("[1/4] resolving model %s", config.model_id or "(default: Gemma-3-270M from the installed package)")
    source = resolve_model_source(config.model_id, config.revision)
    log.info("      %s -> %s%s", source.model_id, source.path, f" (GGUF {source.gguf_file})" if source.gguf_file else "")

    log.info("[2/4] selecting the backend")
    host = PluginHost().load()
    selection = host.select_backend(config.backend)
    log.info("      backend '%s' (%s): %s", selection.backend.name, selection.backend.device_type, selection.reason)

    log.info("[3/4] loading weights and sizing the KV cache")
    engine, tokenizer, info = build_engine(config, host, source)
    if settings.tokenizer_config_path:
        with open(settings.tokenizer_config_path) as handle:
            template = json.load(handle).get("chat_template")
        if template:
            tokenizer.chat_template = template
    state = build_state(config, engine, tokenizer, info, host=host, model_id=served_model_name(config, source.model_id))
    log.info("      %s (%s, %s) loaded in %.1f s; max_input_tokens=%d max_total_tokens=%d",
             source.model_id, info.architecture, state.model.dtype, time.monotonic() - started,
             state.limits.max_input_tokens, state.limits.max_total_tokens)
    for fallback in host.fallbacks:
        log.warning("      reference fallback: %s", fallback)
    log.info("[4/4] starting the HTTP server")
    return build_app(state)


def served_model_name(config: Any, model_id: str) -> str:
    """``--served-model-name``, else the hub id as given, else a local checkpoint's own name:
    /info and /v1/models are open routes, so they never show where the files live."""
    if config.served_model_name:
        return config.served_model_name
    path = Path(model_id).expanduser()
    return path.name if path.exists() else model_id


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
