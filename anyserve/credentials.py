"""Bearer tokens as the HTTP ``Authorization`` header and gRPC ``authorization`` metadata
carry them: one parser for the API server's routes, its gRPC ingress and the replicas."""

from __future__ import annotations


def bearer(authorization: str | bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if isinstance(authorization, str):
        authorization = authorization.encode("utf-8", "replace")
    if not isinstance(authorization, bytes):
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None
