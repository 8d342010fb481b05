"""--speculate over HTTP: the flags, /info's speculation fields and the acceptance metrics."""

from __future__ import annotations

import argparse

import httpx
import pytest

from lmport.commands.launch_flags import add_flags, resolve_settings
from lmport.testing.http_checks import metric_value, post, start_server_thread, wait_until_idle


def settings_of(argv: list[str], environ: dict | None = None):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve_settings(parser.parse_args(argv), environ or {}).config


def test_flags_and_their_environment_variables():
    assert settings_of([]).speculate == 0 and settings_of([]).speculative_model is None
    assert settings_of(["--speculate", "3"]).speculate == 3
    assert settings_of([], {"SPECULATE": "2"}).speculate == 2  # TGI's variable
    config = settings_of(["--speculative-model", "/models/draft"])
    assert config.speculative_model == "/models/draft" and config.speculate == 0  # 0: the default 4 drafts


@pytest.fixture(scope="module")
def server(checkpoints):
    thread = start_server_thread(checkpoints["target"], "tiny", speculate=3, max_batch_total_tokens=2048, max_total_tokens=128)
    yield thread
    thread.stop()


def test_info_and_metrics_report_speculation(server):
    before = httpx.get(server.url + "/metrics").text  # the server's warm-up request ran already
    body = {"inputs": "ab ab ab ab ab ab ab ab", "parameters": {"max_new_tokens": 12, "details": True}}
    response = post(server, "/generate", body)
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"] >= 1
    wait_until_idle(server)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        info = client.get("/info").json()
        metrics = client.get("/metrics").text
    assert info["speculate"] == 3
    spec = info["speculation"]
    assert spec["method"] == "ngram" and spec["num_tokens"] == 3 and spec["draft_model"] is None
    assert spec["draft_tokens"] > 0  # the prompt repeats: its last token was seen before
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["draft_tokens"])
    assert metric_value(metrics, "lmport_spec_draft_tokens_total") == spec["draft_tokens"]
    assert metric_value(metrics, "lmport_spec_accepted_tokens_total") == spec["accepted_tokens"]
    assert metric_value(metrics, "lmport_spec_acceptance_rate") == pytest.approx(spec["acceptance_rate"])
    for series in ("tgi_request_skipped_tokens_count", 'tgi_request_skipped_tokens_bucket{le="+Inf"}'):
        assert metric_value(metrics, series) == metric_value(before, series) + 1
    assert metric_value(metrics, "tgi_request_skipped_tokens_sum") == spec["accepted_tokens"]
