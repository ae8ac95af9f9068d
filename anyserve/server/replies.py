"""JSON replies and the one error handler: how an exception becomes an HTTP reply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from anyserve.errors import (
    AnyServeError,
    ClientGone,
    error_headers,
)

if TYPE_CHECKING:
    from anyserve.server.gateway import Gateway

    pass


def json_reply(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    from anyserve.tensors import dumps

    return Response(dumps(data), status_code=status, headers=headers, media_type="application/json")


# --------------------------------------------------------------------------- the error handler


async def error_response(request: Request, exc: Exception) -> Response:
    """The one place an exception becomes an HTTP reply: ``{"detail": message}``."""
    if isinstance(exc, AnyServeError):
        return json_reply({"detail": exc.message}, status=exc.status, headers=error_headers(exc))
    if isinstance(exc, HTTPException):  # Starlette's own: unknown route, wrong method
        return json_reply({"detail": exc.detail}, status=exc.status_code, headers=exc.headers)
    if isinstance(exc, ClientDisconnect):
        # The client left (or was disconnected for a stalled body): nobody reads this.
        return Response(status_code=ClientGone.status)
    # Anything else is a bug: the traceback goes to the log (RequestLog), not to the client.
    request_id = getattr(request.state, "request_id", "?")
    return json_reply({"detail": f"internal error (request id {request_id})"}, status=500)


def error_reply(
    path: str, status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An error answered before routing, in the shape of the route it was meant for."""
    key = "error" if path == "/v2" or path.startswith("/v2/") else "detail"
    return json_reply({key: message}, status=status, headers=headers)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway
