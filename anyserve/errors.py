"""The AnyServe error tree.

Every expected failure is an :class:`AnyServeError`; each class carries the HTTP
status the API server answers with. It is translated once per boundary: to an HTTP
reply in ``api_server``, to a gRPC status in ``replica``, to an exit code in ``cli``::

    AnyServeError (500)
    ├── BadRequest (400)                 malformed body, header or argument
    │   ├── InvalidKey (400)             object key that is not a plain file name
    │   └── ConfigError (400)            a bad anyserve.toml (the CLI exits 2)
    ├── Unauthorized (401)               missing or wrong bearer token
    ├── NotFound (404)
    │   ├── NoMatchingCapability (404)   no replica serves the requested capability
    │   └── ObjectNotFound (404)
    ├── PayloadTooLarge (413)
    ├── RateLimited (429)
    ├── HandlerError (500)               a user handler raised; carries its message
    ├── ObjectStoreError (500)           unsafe directory, pickle refused, write failed
    ├── UpstreamError (502)              a replica answered with a transport error
    ├── DelegationLoop (508)             delegation went past the depth limit
    ├── Unavailable (503)                no replica reachable, overloaded, shutting down
    │   └── NotReachable (503)           the API server itself is not reachable (client side)
    └── DeadlineExceeded (504)
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
