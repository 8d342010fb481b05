"""``--api-key`` / ``--api-key-file``: the generation and tokenization routes need
``Authorization: Bearer <key>``.

The scheme is matched case-insensitively (RFC 7235), the key exactly (TGI lowercases both,
which halves each letter's entropy). Each candidate is compared through SHA-256 digests with
:func:`hmac.compare_digest`, against every configured key with no early exit, so the answer's
timing says nothing about a key's length or prefix. ``/health``, ``/info``, ``/metrics``,
``/v1/models`` and the API docs stay open, as in TGI (see docs/api.md, Authentication).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

from fastapi import Request

from lmport.server.errors import Unauthorized


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The keys a server accepts (none: authentication is off)."""

    def __init__(self, keys: Iterable[str]):
        self._digests = tuple(_digest(key) for key in dict.fromkeys(k for k in keys if k))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str) -> bool:
        scheme, _, token = authorization.strip().partition(" ")
        given = _digest(token.strip())
        matched = False
        for digest in self._digests:  # no early exit
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == "bearer"


def require_api_key(request: Request) -> None:
    """FastAPI dependency: raises 401 unless the bearer token is one of the configured keys."""
    keys: ApiKeys = request.app.state.api_keys
    if keys.enabled and not keys.allows(request.headers.get("authorization", "")):
        error = Unauthorized()
        error.headers["WWW-Authenticate"] = "Bearer"
        raise error
