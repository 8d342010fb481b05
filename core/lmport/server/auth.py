"""``--api-key``: generation and tokenization routes need ``Authorization: Bearer <key>``.

Like TGI, the comparison ignores case, and info routes (/health, /info, /metrics, /docs) stay
open so probes and scrapers need no secret.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from lmport.server.errors import Unauthorized


def require_api_key(request: Request) -> None:
    """FastAPI dependency: raises 401 unless the bearer token matches the configured key."""
    api_key = request.app.state.lmport.config.api_key
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    expected = f"Bearer {api_key}"
    if not hmac.compare_digest(given.lower().encode(), expected.lower().encode()):
        raise Unauthorized()
