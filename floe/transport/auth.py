"""The one API-key check, shared by HTTP and gRPC.

RFC 6750: the credential is ``Bearer <token>``; the scheme is case-insensitive and separated from
the token by whitespace. The token is compared in constant time. A bare token (no scheme) is
refused: clients that send one would also send it to any other server they are pointed at.
"""

from __future__ import annotations

import hmac
from typing import Optional, Union

AUTH_HINT = "missing or invalid API key: send `Authorization: Bearer KEY`"


def bearer_ok(header: Optional[Union[str, bytes]], key: str) -> bool:
    """True when ``header`` (the Authorization value) carries ``key`` as a Bearer token."""
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "replace"), key.encode("utf-8"))
