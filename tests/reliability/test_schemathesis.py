"""Schemathesis over every operation of ``/api-doc/openapi.json``, against the real app on
127.0.0.1: what the server answers must be what its OpenAPI document says (status codes,
content types, bodies, headers; no 5xx; 405 with ``Allow``; bad data refused).

Bounded for a shared 2-core box: a fixed derandomized seed, a fixed example count per
operation, a server whose requests stay short (``max_total_tokens`` 48).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (hypothesis comes with schemathesis)

from lmport.server.openapi import ROUTE_ERRORS  # noqa: E402

EXAMPLES = 40  # per operation

# The rules a JSON Schema cannot state (they join fields, or count tokens); docs/api.md lists
# them. A schema-valid request may get a 422 only for one of these; any other 422 means the
# document promised something the server refuses.
RULES_BEYOND_THE_SCHEMA = (
    "`inputs` tokens + `max_new_tokens` must be <=",
    "`inputs` must have less than",
    "`inputs` must have at least one token",
    "`max_new_tokens` must be strictly positive",  # a prompt that fills max_total_tokens by itself
    "you must use sampling when `best_of` is > 1",
    "`seed` must not be set when `best_of` > 1",
    "`top_logprobs` needs `logprobs`",
    "out of the vocabulary",  # token-id prompts: the vocabulary size
    "Number of prompts exceeds",  # --max-client-batch-size
    "modality is not supported",
    "not supported",  # best_of / decoder_input_details when streaming; grammar, tools, suffix ... where not built
    "`tools` holds two functions named", "which is not in `tools`", "`tool_choice` needs `tools`",  # tools
    "cannot be used together",  # response_format with tools
    "the tools' parameters cannot be used",  # a parameters schema the grammar backend cannot compile
    "cannot be used for constrained decoding",  # a grammar or JSON schema that does not compile (docs/api.md)
    "must be a JSON schema", "is not valid JSON",  # a schema given as JSON text
)


@schemathesis.check
def rejected_only_by_rules_beyond_the_schema(ctx, response, case):
    """positive_data_acceptance, with the 422s the document explains allowed."""
    if not case.meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if response.status_code == 422:
        body = response.json()
        error = body["error"]
        message = error["message"] if isinstance(error, dict) else error
        kind = error["code"] if isinstance(error, dict) else body["error_type"]
        if kind == "template_error" or any(rule in message for rule in RULES_BEYOND_THE_SCHEMA):
            return None
    if response.status_code == 429:
        return None
    raise AssertionError(f"schema-valid request refused: {response.status_code} {response.text[:500]}")


@pytest.fixture(scope="module")
def contract_server(serve_module):
    return serve_module(max_total_tokens=48, max_batch_total_tokens=4096, max_concurrent_requests=16)


@pytest.fixture(scope="module")
def api_schema(contract_server):
    return schemathesis.openapi.from_url(f"{contract_server.url}/api-doc/openapi.json")


CASES = [(method, path, mode) for method, path in sorted(ROUTE_ERRORS) for mode in schemathesis.GenerationMode
         if method == "post" or mode is schemathesis.GenerationMode.POSITIVE]  # a GET takes nothing to get wrong


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m}-{p}-{g.value}" for m, p, g in CASES])
def test_the_server_keeps_to_its_openapi_document(api_schema, method, path, mode):
    """Positive cases (schema-valid) and negative ones (schema-invalid: must get a 4xx)."""
    operation = api_schema[path][method.upper()]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )
    def check(case):
        case.call_and_validate(
            timeout=60, excluded_checks=[schemathesis.checks.positive_data_acceptance],
            additional_checks=[rejected_only_by_rules_beyond_the_schema],
        )

    check()
