"""Admission: the bearer token and body limits a request must pass before its route."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.responses import Response

from anyserve.credentials import bearer
from anyserve.errors import (
    CHALLENGE,
    PayloadTooLarge,
)
from anyserve.server.config import ApiServerConfig
from anyserve.server.replies import error_reply

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope


#: Bodies of /register, /heartbeat and /unregister: a registration is a few kilobytes.
MAX_CONTROL_BODY = 1024 * 1024


# --------------------------------------------------------------------------- admission

# Always open, even with ``auth = "all"``: liveness probes carry no credentials, and these
# say nothing but "the process answers".
_OPEN_PATHS = frozenset({"/health", "/v2/health/live"})
# Registration; a token-holder is the only one who may change where requests go.
_CONTROL_PATHS = frozenset({"/register", "/heartbeat", "/unregister"})
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


class Guard:
    """What a request must pass before any route sees it: the bearer token and body size.

    Both are checked from the request head, so a refused client is answered without
    reading its body; a body with no (or a false) Content-Length is counted as it is read.
    """

    def __init__(self, config: ApiServerConfig) -> None:
        self._token = config.token.encode() if config.token else None
        self._all = config.auth == "all"
        self._max_body = config.max_body_size

    def needs_token(self, method: str, path: str) -> bool:
        """Whether ``method path`` requires the bearer token (when one is configured)."""
        if self._all:
            return path not in _OPEN_PATHS
        if path in _CONTROL_PATHS:
            return True
        # Object writes: POST /objects and DELETE /objects/{key}.
        return method not in _READS and (path == "/objects" or path.startswith("/objects/"))

    def body_limit(self, method: str, path: str) -> int | None:
        """The largest body ``method path`` may send; None for no limit here."""
        if method in _READS or path == "/objects":
            return None  # uploads have their own limit (--max-object-size), checked as written
        return MAX_CONTROL_BODY if path in _CONTROL_PATHS else self._max_body

    def screen(
        self, scope: Scope, length: bytes | None, authorization: bytes | None
    ) -> Response | None:
        """The reply refusing this request (401, 413), or None to let it through."""
        method, path = scope["method"], scope["path"]
        if self._token is not None and self.needs_token(method, path):
            presented = bearer(authorization)
            # compare_digest: the time taken says nothing about how much of a guess was right.
            if presented is None or not hmac.compare_digest(presented, self._token):
                wrong = presented is not None
                message = (
                    "the bearer token is not this API server's"
                    if wrong
                    else f"{method} {path} needs the API server's token: send "
                    "'Authorization: Bearer <token>' (ANYSERVE_TOKEN)"
                )
                challenge = CHALLENGE + (', error="invalid_token"' if wrong else "")
                return error_reply(path, 401, message, {"WWW-Authenticate": challenge})
        if length is not None:
            limit = self.body_limit(method, path)
            if limit is not None and length.isdigit() and int(length) > limit:
                return error_reply(
                    path,
                    413,
                    f"the request body is {int(length)} bytes; the limit is {limit} bytes",
                )
        return None

    def limit(self, scope: Scope, receive: Receive) -> Receive:
        """``receive``, counting the body against its limit (:class:`PayloadTooLarge`)."""
        limit = self.body_limit(scope["method"], scope["path"])
        if limit is None:
            return receive
        seen = 0

        async def receive_counted() -> Message:
            nonlocal seen
            message = await receive()
            body = message.get("body")
            if body:
                seen += len(body)
                if seen > limit:
                    raise PayloadTooLarge(
                        f"the request body is over the limit of {limit} bytes "
                        "(the API server's --max-body-size)"
                    )
            return message

        return receive_counted
