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
    │   │   └── Saturated (503)          every usable replica is at its limit
    │   ├── NoHealthyReplica (503)       replicas match but all are ejected or failing
    │   └── NotReachable (503)           the API server itself is not reachable (client side)
    ├── DeadlineExceeded (504)
    ├── RegistryFull (507)               the registry holds its maximum of replicas
    └── DelegationLoop (508)             delegation went past the depth limit
"""

from __future__ import annotations


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


class Saturated(Overloaded):
    """Raised by :meth:`Registry.choose` when every usable replica is at its limit: the
    caller may wait for a slot (:meth:`Registry.enqueue`) or answer 503 as it is."""


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
