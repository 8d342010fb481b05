"""Routes about the server: ``/info``, ``/health`` (and TGI's ``GET /``, ``/ping``), ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lmport import __version__
from lmport.server.errors import Unhealthy
from lmport.server.schemas_tgi import HealthResponse
from lmport.server.metrics import CONTENT_TYPE
from lmport.server.state import ServerState

router = APIRouter(tags=["Text Generation Inference"])


def _state(request: Request) -> ServerState:
    return request.app.state.lmport


def info_payload(state: ServerState) -> dict[str, Any]:
    """TGI's ``Info`` fields, then what lmport adds: the backend, its flags and fallbacks."""
    config, limits, model = state.config, state.limits, state.model
    info: dict[str, Any] = {
        "model_id": model.model_id,
        "model_sha": model.sha,
        "model_dtype": model.dtype,
        "model_device_type": model.device_type,
        "model_pipeline_tag": model.pipeline_tag,
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_best_of": limits.max_best_of,
        "max_stop_sequences": limits.max_stop_sequences,
        "max_top_n_tokens": limits.max_top_n_tokens,
        "max_input_tokens": limits.max_input_tokens,
        "max_input_length": limits.max_input_tokens,  # TGI's legacy name
        "max_total_tokens": limits.max_total_tokens,
        "waiting_served_ratio": config.waiting_served_ratio,
        "max_batch_total_tokens": limits.max_batch_total_tokens,  # the flag, or what the cache was sized to
        "max_batch_prefill_tokens": config.max_batch_prefill_tokens,
        "max_waiting_tokens": config.max_waiting_tokens,
        "max_batch_size": config.max_batch_size,
        "validation_workers": state.tokenize_pool.workers,
        "max_client_batch_size": limits.max_client_batch_size,
        "router": "lmport",
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "grammar_support": not limits.disable_grammar_support,
        "chat_template": bool(getattr(state.tokenizer, "chat_template", None) or model.chat_template),
        "modality": model.modality,  # "text", or "image-text": prompts may carry images (docs/api.md, "Images")
        "num_shard": config.num_shard,  # tensor-parallel ranks (--num-shard)
        "sharded": bool(config.sharded or config.num_shard > 1),
    }
    stats = _engine_stats(state)
    if stats is not None and "spec_num_tokens" in stats.extra:
        extra = stats.extra
        drafted = extra["spec_draft_tokens"]
        info["speculate"] = extra["spec_num_tokens"]  # TGI's launcher argument
        info["speculation"] = {
            "method": extra["spec_method"],  # "ngram" (prompt lookup) or "draft" (--speculative-model)
            "num_tokens": extra["spec_num_tokens"],
            "draft_model": config.speculative_model,
            "draft_tokens": drafted,
            "accepted_tokens": extra["spec_accepted_tokens"],
            "acceptance_rate": extra["spec_accepted_tokens"] / drafted if drafted else 0.0,
        }
    if model.modality == "image-text":
        info["max_images_per_request"] = limits.max_images_per_request
        info["allow_remote_images"] = state.image_policy.allow_remote
    host = state.host
    if host is not None and getattr(host, "selection", None) is not None:
        selection = host.selection
        info["backend"] = {
            "name": selection.backend.name,
            "device_type": selection.backend.device_type,
            "description": selection.backend.description,
            "selected_because": selection.reason,
            "detected": [b.name for b in selection.detected],
        }
        info["capabilities"] = host.capabilities().to_dict()
        info["server_info"] = host.server_info()
        info["fallbacks"] = list(host.fallbacks)
        info["custom_kernels"] = not config.disable_custom_kernels
    return info


def _engine_stats(state: ServerState):
    try:
        return state.engine_stats()
    except Exception:  # a dead engine must not break /info
        return None


@router.get("/info")
async def get_info(request: Request) -> dict[str, Any]:
    """Model, limits, version, and the active backend with its capability flags."""
    return info_payload(_state(request))


@router.get("/health", response_model=HealthResponse, responses={200: {"description": "Everything is working fine"}})
async def health(request: Request) -> HealthResponse:
    """200 ``{"status": "ok"}`` once warmed up and while the engine runs; 503 before warm-up and after an engine failure."""
    state = _state(request)
    if not state.ready:
        raise Unhealthy("unhealthy: warming up")
    if not state.engine_alive():
        raise Unhealthy()
    return HealthResponse()


@router.get("/", include_in_schema=False)
async def root_health(request: Request) -> HealthResponse:
    return await health(request)


@router.get("/ping", include_in_schema=False)
async def ping(request: Request) -> HealthResponse:
    return await health(request)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (TGI's ``tgi_*`` names plus ``lmport_*`` KV-cache gauges)."""
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)
