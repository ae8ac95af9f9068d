"""The AnyServe error tree.

Every expected failure is an :class:`AnyServeError`; each class carries the HTTP
status the API server answers with. It is translated once per boundary: to an HTTP
reply in ``api_server``, to a gRPC status in ``replica``, to an exit code in ``cli``::

    AnyServeError (500)
    ├── BadRequest (400)                 malformed body, header or argument
    │   ├── InvalidKey (400)             object key that is not a plain file name
    │   └── ConfigError (400)            a bad anyserve.toml (the CLI exits 2)
    ├── Unauthorized (401)               missing or wrong bearer token
    ├── Forbidden (403)                  a registration the API server's policy refuses
    ├── NotFound (404)
    │   ├── NoMatchingCapability (404)   no replica serves the requested capability
    │   └── ObjectNotFound (404)
    ├── Conflict (409)                   another process owns this replica id
    ├── Gone (410)                       a heartbeat from an unregistered replica
    ├── PayloadTooLarge (413)
    ├── RateLimited (429)
    │   └── TooManyRegistrations (429)   a client registers faster than its token bucket
    ├── ClientGone (499)                 the client left before the reply started
    ├── HandlerError (500)               a user handler raised; carries its message
    ├── AppLoadError (500)               the app reference cannot be imported
    ├── ObjectStoreError (500)           unsafe directory, pickle refused, write failed
    ├── UpstreamError (502)              a replica answered with a transport error
    ├── Unavailable (503)                no replica reachable, overloaded, shutting down
    │   ├── Overloaded (503)             every usable replica is full and so is the queue
    │   ├── NoHealthyReplica (503)       replicas match but all are ejected or failing
    │   └── NotReachable (503)           the API server itself is not reachable (client side)
    ├── DeadlineExceeded (504)
    ├── RegistryFull (507)               the registry holds its maximum of replicas
    └── DelegationLoop (508)             delegation went past the depth limit

    StreamClosed (RuntimeError)          ``stream.send`` after the stream ended
    └── StreamCancelled                  the client went away: stop generating
    BadElement                           a bad tensor element, before its path is known
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class AnyServeError(Exception):
    """Base of every expected AnyServe failure; ``status`` is its HTTP status."""

    status = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(AnyServeError):
    status = 400


class InvalidKey(BadRequest):
    pass


class ConfigError(BadRequest):
    pass


class Unauthorized(AnyServeError):
    status = 401


class NotFound(AnyServeError):
    status = 404


class NoMatchingCapability(NotFound):
    pass


class ObjectNotFound(NotFound):
    pass


class PayloadTooLarge(AnyServeError):
    status = 413


class RateLimited(AnyServeError):
    status = 429


class HandlerError(AnyServeError):
    status = 500


class ObjectStoreError(AnyServeError):
    status = 500


class UpstreamError(AnyServeError):
    status = 502


class Unavailable(AnyServeError):
    status = 503


class NotReachable(Unavailable):
    pass


class DeadlineExceeded(AnyServeError):
    status = 504


class DelegationLoop(AnyServeError):
    status = 508


class Conflict(AnyServeError):
    """Another process owns this replica id (a different ``instance``)."""

    status = 409


class Gone(AnyServeError):
    """A heartbeat from a replica process that was explicitly unregistered."""

    status = 410


class Forbidden(AnyServeError):
    """A registration the API server's policy does not allow (a non-loopback endpoint
    without a token)."""

    status = 403


class RegistryFull(AnyServeError):
    """The registry holds its maximum number of replicas."""

    status = 507


class TooManyRegistrations(RateLimited):
    """A client registers faster than its token bucket allows."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        #: Seconds until the client may try again (the ``Retry-After`` header).
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """Every usable replica is at its limit and the queue is full, or the wait ran out."""

    #: Seconds a client should wait before retrying (the ``Retry-After`` header).
    retry_after: float = 1.0


class NoHealthyReplica(Unavailable):
    """Replicas match, but every one of them is ejected or failing its health checks."""

    retry_after: float = 1.0


class ClientGone(AnyServeError):
    """The client disconnected before the reply started (nginx's 499)."""

    status = 499


class AppLoadError(AnyServeError):
    """The app reference cannot be imported or is not an AnyServe app."""


_BY_STATUS: dict[int, type[AnyServeError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    413: PayloadTooLarge,
    429: RateLimited,
    500: HandlerError,
    502: UpstreamError,
    503: Unavailable,
    504: DeadlineExceeded,
    508: DelegationLoop,
}


def from_status(status: int, message: str) -> AnyServeError:
    """The error for an HTTP status received from an AnyServe server."""
    cls = _BY_STATUS.get(status, AnyServeError)
    err = cls(message)
    err.status = status
    return err


# --------------------------------------------------------------------------- translation tables
# One table per boundary. gRPC is imported only when a table needs it: the SDK and the CLI
# import this module and need not pay for grpc.

#: The gRPC status each error class is answered with (first match wins; else INTERNAL).
_GRPC_CODE: tuple[tuple[type[AnyServeError], str], ...] = (
    (BadRequest, "INVALID_ARGUMENT"),
    (Unauthorized, "UNAUTHENTICATED"),
    (NotFound, "NOT_FOUND"),
    (PayloadTooLarge, "RESOURCE_EXHAUSTED"),
    (RateLimited, "RESOURCE_EXHAUSTED"),
    (Unavailable, "UNAVAILABLE"),
    (DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (DelegationLoop, "FAILED_PRECONDITION"),
    (HandlerError, "UNKNOWN"),
)

#: The bearer challenge of every 401 (RFC 6750).
CHALLENGE = 'Bearer realm="anyserve"'


def grpc_code(exc: AnyServeError) -> grpc.StatusCode:
    """The gRPC status code ``exc`` is answered with (replica and ingress alike)."""
    import grpc

    for cls, name in _GRPC_CODE:
        if isinstance(exc, cls):
            return grpc.StatusCode[name]
    return grpc.StatusCode.INTERNAL


def from_grpc(
    code: grpc.StatusCode, details: str, where: str, timeout: float, max_message: int
) -> AnyServeError:
    """The error for a failed gRPC call to a replica: ``where`` names the replica, ``timeout``
    is the call's deadline and ``max_message`` the channel's message limit (for the 413)."""
    import grpc

    sc = grpc.StatusCode
    if code in (sc.UNKNOWN, sc.INTERNAL):
        # A handler error: the replica already logged the traceback; the client gets the message.
        return HandlerError(details or f"{where} failed without a message")
    if code == sc.UNAVAILABLE:
        return Unavailable(f"{where} is unavailable: {details}")
    if code == sc.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            f"no reply from {where} within {timeout:g}s "
            "(send X-Request-Timeout: <seconds> for longer requests)"
        )
    if code == sc.NOT_FOUND:
        return NotFound(details)
    if code in (sc.INVALID_ARGUMENT, sc.OUT_OF_RANGE):
        return BadRequest(details)
    if code == sc.RESOURCE_EXHAUSTED:
        if "larger than max" in details or "message larger" in details.lower():
            return PayloadTooLarge(f"{details} (the limit is {max_message} bytes)")
        return Unavailable(f"{where} is overloaded: {details}")
    if code == sc.FAILED_PRECONDITION:
        # The replica uses this code for a delegation that went past the depth limit.
        return DelegationLoop(details)
    if code in (sc.UNAUTHENTICATED, sc.PERMISSION_DENIED):
        return Unauthorized(details)
    if code == sc.CANCELLED:
        return Unavailable(f"{where} cancelled the request: {details}")
    return UpstreamError(f"{where} answered {code.name}: {details}")


def error_headers(exc: AnyServeError) -> dict[str, str] | None:
    """The HTTP headers an error's reply carries: when to retry, how to authenticate."""
    retry_after: float | None = getattr(exc, "retry_after", None)
    if retry_after is not None:
        # Retry-After is whole seconds; rounding down to 0 would invite an immediate retry.
        return {"Retry-After": str(max(1, math.ceil(retry_after)))}
    if exc.status == 401:
        return {"WWW-Authenticate": CHALLENGE}
    # (A 413 keeps the connection: closing it with the body unread would make the kernel
    # reset it, and the client would see the reset instead of the answer. The rest of the
    # body is read and dropped, within the request head timeout.)
    return None


def trailing_metadata(exc: AnyServeError) -> tuple[tuple[str, str], ...]:
    """What an error's gRPC status carries besides its code and message: the HTTP reply's
    headers (``retry-after``, ``www-authenticate``); every ``UNAVAILABLE`` says when to
    retry, as every HTTP 503 does."""
    headers = {k.lower(): v for k, v in (error_headers(exc) or {}).items()}
    if exc.status == 503:
        headers.setdefault("retry-after", "1")
    return tuple(headers.items())


# -- outside the tree: the SDK's stream signals and the tensor codec's element error ------


class StreamClosed(RuntimeError):
    """``send`` on a stream that was closed, ended with an error, or cancelled."""


class StreamCancelled(StreamClosed):
    """The client went away: stop generating."""


class BadElement(Exception):
    """A bad tensor element found by a value setter (``anyserve.tensors``); the caller knows
    the element's path and turns it into a :class:`BadRequest` naming it."""

    def __init__(self, index: int | None, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message
