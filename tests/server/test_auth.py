"""``--api-key`` / ``--api-key-file`` and CORS, over a real socket: every route of the app with
no key, a wrong key and the right one; which routes stay open; what the OpenAPI document says;
CORS off unless ``--cors-allow-origin`` is given."""

from __future__ import annotations

import argparse
import hmac

import httpx
import pytest

from lmport.commands.launch_flags import add_flags, resolve_settings
from lmport.server.auth import ApiKeys
from lmport.server.openapi import iter_routes
from lmport.testing.http_checks import error_of

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GEN = {"inputs": "The quick", "parameters": {"max_new_tokens": 2}}

# Every route of the app: (method, path) -> the body of a request that succeeds with the key.
PROTECTED = {
    ("POST", "/generate"): GEN,
    ("POST", "/generate_stream"): GEN,
    ("POST", "/"): GEN,
    ("POST", "/tokenize"): {"inputs": "The quick"},
    ("POST", "/chat_tokenize"): {"messages": CHAT["messages"]},
    ("POST", "/v1/chat/completions"): CHAT,
    ("POST", "/v1/completions"): {"prompt": "The quick", "max_tokens": 2},
}
OPEN = {("GET", path) for path in ("/", "/health", "/ping", "/info", "/metrics", "/v1/models", "/docs",
                                    "/docs/oauth2-redirect", "/redoc", "/api-doc/openapi.json")}


def app_routes(server) -> set[tuple[str, str]]:
    routes = iter_routes(server.server.config.app.routes)
    return {(method, route.path) for route in routes for method in (getattr(route, "methods", None) or ()) if method != "HEAD"}


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server(api_key="s3cret", api_keys=("second-key", "third-key"))


def test_the_tables_cover_every_route(keyed):
    assert app_routes(keyed) == set(PROTECTED) | OPEN


@pytest.mark.parametrize("method, path", sorted(PROTECTED))
def test_protected_routes_need_a_right_key(keyed, method, path):
    body = PROTECTED[(method, path)]
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer S3CRET"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cret-and-more"}):
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert error_of(response)[1] == "authentication"
            assert response.headers["www-authenticate"] == "Bearer"
        for key in ("s3cret", "second-key", "third-key"):
            for scheme in ("Bearer", "bearer"):
                response = client.request(method, path, json=body, headers={"Authorization": f"{scheme} {key}"})
                assert response.status_code == 200, response.text


@pytest.mark.parametrize("method, path", sorted(OPEN))
def test_open_routes_need_no_key(keyed, method, path):
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            assert client.request(method, path, headers=headers).status_code == 200


def test_the_document_of_a_keyed_server_says_which_routes_need_the_key(keyed):
    spec = httpx.get(f"{keyed.url}/api-doc/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            needs_key = (method.upper(), path) in PROTECTED
            assert ("security" in operation) is needs_key, (method, path)
            assert ("401" in operation["responses"]) is needs_key, (method, path)


def test_every_key_is_compared_without_an_early_exit(monkeypatch):
    keys = ApiKeys(["a-key", "b-key", "c-key"])
    calls = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for header in ("Bearer a-key", "Bearer c-key", "Bearer wrong", "Bearer " + "x" * 500):
        calls.clear()
        keys.allows(header)
        assert calls == [(32, 32)] * 3  # digests: the same length whatever was sent
    assert keys.allows("Bearer b-key") and not keys.allows("Bearer b-ke") and not keys.allows("Token b-key")
    assert not ApiKeys([]).enabled and not ApiKeys(["", ""]).enabled


def settings_for(argv: list[str], environ: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve_settings(parser.parse_args(argv), environ or {})


def test_api_key_file_reads_one_key_per_line(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# ops team\nalpha-key\n\n  beta-key  \n#old-key\n")
    assert settings_for(["--api-key-file", str(path)]).config.api_keys == ("alpha-key", "beta-key")
    assert settings_for([], {"LMPORT_API_KEY_FILE": str(path)}).config.api_keys == ("alpha-key", "beta-key")
    (tmp_path / "empty").write_text("# nothing\n\n")
    for bad in (str(tmp_path / "empty"), str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="--api-key-file"):
            settings_for(["--api-key-file", bad])


def preflight(server, origin: str, headers: str = "content-type") -> httpx.Response:
    return httpx.options(f"{server.url}/generate", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers,
    })


def test_cors_is_off_by_default(server):
    response = preflight(server, "http://anywhere.example")
    assert "access-control-allow-origin" not in response.headers
    simple = httpx.post(f"{server.url}/generate", json=GEN, headers={"Origin": "http://anywhere.example"}, timeout=60)
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_the_given_origins(start_server):
    server = start_server(cors_allow_origin=("http://good.example",))
    allowed = preflight(server, "http://good.example")
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://good.example"
    refused = preflight(server, "http://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert preflight(server, "http://good.example", "authorization").status_code == 400  # no key, no Authorization
    keyed = start_server(cors_allow_origin=("http://good.example",), api_key="k")
    assert preflight(keyed, "http://good.example", "authorization, content-type").status_code == 200
