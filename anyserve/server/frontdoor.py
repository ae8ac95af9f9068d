"""The front door: request ids, the request log, the ASGI app and the uvicorn subclasses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from anyserve import ingress as grpc_ingress
from anyserve.errors import AnyServeError
from anyserve.registry import Registry
from anyserve.server.auth import Guard
from anyserve.server.config import ApiServerConfig
from anyserve.server.gateway import Gateway, check_health_forever, evict_forever
from anyserve.server.replies import error_response
from anyserve.server.routes import DIRECT_ROUTES, ROUTES
from anyserve.server.routing import REQUEST_ID, new_request_id

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


log = logging.getLogger("anyserve.api_server")


# --------------------------------------------------------------------------- request log


class RequestLog:
    """Outermost ASGI layer: the request id, and one log line per request.

    The id is the client's ``X-Request-ID`` when it is sane, else a new one; it is echoed
    on every reply. An unexpected exception is logged here once, with its traceback and
    the request id, after the error handler has answered 500. With a :class:`Guard`, the
    request must pass it first; and every 503 says when to retry (``Retry-After``).

    ``direct`` maps paths whose ``POST`` is answered by a route function straight from
    here (the infer routes, the ones a deployment calls thousands of times a second):
    Starlette's two middlewares, its linear route match and ``request_response`` cost
    about a tenth of such a request, and their three ``send`` wrappers sit on every
    message of a stream. What they do for these routes is done in :meth:`_direct`.
    """

    def __init__(
        self,
        app: ASGIApp,
        guard: Guard | None = None,
        direct: Mapping[str, Callable[[Request], Awaitable[ASGIApp]]] | None = None,
    ) -> None:
        self.app = app
        self.guard = guard
        self.direct = dict(direct or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        request_id, length, authorization = _scan_headers(scope)
        state["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if status == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", b"1"))
                message["headers"] = headers
            await send(message)

        failure: BaseException | None = None
        try:
            guard = self.guard
            refused = guard.screen(scope, length, authorization) if guard is not None else None
            if refused is not None:
                await refused(scope, receive, send_with_id)
            else:
                if guard is not None:
                    receive = guard.limit(scope, receive)
                route = self.direct.get(scope["path"]) if scope["method"] == "POST" else None
                if route is None:
                    await self.app(scope, receive, send_with_id)
                else:
                    await self._direct(route, scope, receive, send_with_id, lambda: status)
        except Exception as exc:  # already answered 500 by the error handler
            failure = exc
        finally:
            ms = (time.perf_counter() - started) * 1000
            _log_request(scope, state, status or 500, ms, failure)

    async def _direct(
        self,
        route: Callable[[Request], Awaitable[ASGIApp]],
        scope: Scope,
        receive: Receive,
        send: Send,
        status: Callable[[], int],
    ) -> None:
        """Run ``route`` as the Starlette app would: its reply, or the error handler's.

        As there, an error the handler knows (AnyServeError, HTTPException, a client that
        disconnected) is only answered; anything else is answered 500 and raised on, to
        be logged with its traceback; once the reply has started, nothing can be answered.
        """
        scope["app"] = self.app  # what request.app is inside the router
        request = Request(scope, receive)
        try:
            response = await route(request)
            await response(scope, receive, send)
        except Exception as exc:
            if status():
                raise
            reply = await error_response(request, exc)
            await reply(scope, receive, send)
            if not isinstance(exc, (AnyServeError, HTTPException, ClientDisconnect)):
                raise


def _scan_headers(scope: Scope) -> tuple[str, bytes | None, bytes | None]:
    """One pass over the headers: the request id, Content-Length and Authorization."""
    request_id = length = authorization = None
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            if request_id is None:
                text = value.decode("latin-1").strip()
                request_id = text if REQUEST_ID.fullmatch(text) else ""
        elif name == b"content-length":
            length = value
        elif name == b"authorization":
            authorization = value
    return request_id or new_request_id(), length, authorization


# Routes polled all the time (or logged by their route function already).
_QUIET = ("/health", "/heartbeat", "/registry", "/stats", "/metrics", "/register", "/unregister")


def _log_request(
    scope: Scope, state: Mapping[str, Any], status: int, ms: float, failure: BaseException | None
) -> None:
    path = scope.get("path", "")
    capability = state.get("capability")
    replica = state.get("replica")
    line = (
        f"request {state['request_id']} {scope.get('method', '')} {path}"
        f"{f' [{capability}]' if capability is not None else ''}"
        f"{f' -> {replica}' if replica is not None else ''} {status} {ms:.1f}ms"
    )
    if failure is not None:
        log.error("%s: unexpected error", line, exc_info=failure)
    elif status >= 500:
        log.warning(line)
    elif path in _QUIET and status < 400:
        log.debug(line)  # replicas heartbeat every few seconds; keep that out of the log
    elif fast_info.handler is not None:
        fast_info.write(line)
    else:
        log.info(line)


class FastInfo:
    """Writes INFO lines of ``log`` straight to the stream handler ``run()`` set up.

    ``Logger.info`` costs about 0.03 ms of the API server's CPU per request (0.4 ms in all):
    it looks up the caller's frame, builds a ``LogRecord`` and formats the time with
    ``strftime`` every time. The per-request line needs none of that: it is written here,
    formatted exactly as ``LOG_FORMAT`` would, with the date text made once a second, in
    one ``write`` under the handler's lock (so it never interleaves with a record that
    another thread logs). Only installed when ``log``'s records would go to that one handler
    alone, and it checks the level on every line, so it writes exactly what logging would.
    """

    def __init__(self) -> None:
        self.handler: logging.StreamHandler[Any] | None = None
        self._logger = log
        self._second = -1
        self._date = ""

    def install(self, logger: logging.Logger) -> None:
        """Take over ``logger``'s INFO lines if they go to one plain stream handler only."""
        self.handler = None
        root = logging.getLogger()
        handlers = root.handlers
        if (
            logger.handlers
            or logger.filters
            or not logger.propagate
            or root.filters
            or len(handlers) != 1
            or type(handlers[0]) is not logging.StreamHandler
            or handlers[0].filters
            or handlers[0].level > logging.INFO
            or type(handlers[0].formatter) is not logging.Formatter
            or handlers[0].formatter._fmt != LOG_FORMAT
            or handlers[0].formatter.datefmt is not None
        ):
            return
        self.handler = handlers[0]
        self._logger = logger

    def write(self, line: str) -> None:
        handler = self.handler
        assert handler is not None
        if not self._logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            # Formatter.formatTime's default: local time, then ",<milliseconds>".
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        text = f"{self._date},{int((now - second) * 1000):03d} INFO {self._logger.name}: {line}\n"
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:  # as logging does: a broken log stream must not fail requests
            handler.handleError(logging.makeLogRecord({"msg": line, "levelname": "INFO"}))
        finally:
            handler.release()


fast_info = FastInfo()
#: The API server's log line: ``2026-01-01 12:00:00,123 INFO anyserve.api_server: ...``.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --------------------------------------------------------------------------- app and process


def create_app(
    config: ApiServerConfig | None = None, registry: Registry | None = None
) -> ApiServer:
    """The ASGI application (a :class:`RequestLog` around the Starlette router)."""
    return ApiServer(Gateway(config or ApiServerConfig(), registry))


class ApiServer(RequestLog):
    """The API server's ASGI app; ``gateway`` holds its state."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            config = gateway.config
            ingress = None
            if config.grpc_port is not None:
                ingress = await grpc_ingress.start(gateway, config.host, config.grpc_port)
            sweeper = asyncio.ensure_future(evict_forever(gateway))
            checker = asyncio.ensure_future(check_health_forever(gateway))
            try:
                yield
            finally:
                for task in (sweeper, checker):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                gateway.streams.end_all()
                if ingress is not None:
                    await ingress.stop(config.shutdown_timeout)
                await gateway.channels.close()

        router = Starlette(
            routes=ROUTES,
            # One handler; Starlette needs it listed per base class it dispatches on.
            exception_handlers={
                AnyServeError: error_response,
                HTTPException: error_response,
                ClientDisconnect: error_response,
                Exception: error_response,
            },
            lifespan=lifespan,
        )
        router.state.gateway = gateway
        super().__init__(router, Guard(gateway.config), DIRECT_ROUTES)


def protocol_class() -> type[Any]:
    """uvicorn's HTTP protocol (httptools when installed, else h11), noting for the slow
    client sweep (:func:`close_slow_clients`) when data arrived and a request head began."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional: uvicorn falls back to h11 the same way
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class Protocol(Base):
        """An HTTP connection whose head and body progress the sweep can judge."""

        #: ``time.monotonic()`` of the last bytes received.
        last_data = 0.0
        #: When the request head being waited for began (connection, or its first byte),
        #: and the finished cycle it follows (None: the connection's first request).
        head_since = 0.0
        head_after: Any = None

        def connection_made(self, transport: Any) -> None:
            self.head_since = self.last_data = time.monotonic()
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            now = self.last_data = time.monotonic()
            cycle = self.cycle
            if cycle is not None and cycle.response_complete and self.head_after is not cycle:
                # The first bytes of the next request on a kept-alive connection.
                self.head_after = cycle
                self.head_since = now
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers a request it cannot parse in plain text; every other error
            # from this server is JSON, so clients need only one way to read them.
            body = b'{"detail": "%s: the request is not valid HTTP/1.1"}' % msg.encode(
                "ascii", "replace"
            ).replace(b'"', b"'")
            self.transport.write(_BAD_REQUEST % (len(body), body))
            self.transport.close()

    return Protocol


_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def close_slow_clients(
    connections: Iterable[Any], header_timeout: float, body_timeout: float
) -> int:
    """Close connections whose request head is late or whose body stalled; how many.

    A connection waits for a head from its start (or from the first byte after a finished
    request; an idle kept-alive connection is uvicorn's to close) and must have it within
    ``header_timeout``. A body being received may pause at most ``body_timeout`` between
    reads, unless the server itself paused reading. The client gets a 408 if no response
    has started; the route reading the body sees a disconnect.
    """
    now = time.monotonic()
    closed = 0
    for conn in list(connections):
        transport = getattr(conn, "transport", None)
        if transport is None or transport.is_closing():
            continue
        cycle = conn.cycle
        if cycle is None or cycle.response_complete:
            started = cycle is None or conn.head_after is cycle
            late = started and now - conn.head_since > header_timeout
            what = f"the request head did not arrive within {header_timeout:g}s"
        else:
            late = (
                cycle.more_body
                and not conn.flow.read_paused
                and not getattr(cycle, "waiting_for_100_continue", False)
                and now - conn.last_data > body_timeout
            )
            what = f"the request body stalled for over {body_timeout:g}s"
        if not late:
            continue
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = b'{"detail": "%s; the connection is closed"}' % what.encode()
            transport.write(_REQUEST_TIMEOUT % (len(body), body))
        transport.close()
        closed += 1
        client = getattr(conn, "client", None)
        log.warning("closed a connection from %s: %s", client[0] if client else "?", what)
    return closed


def server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but open SSE streams are ended before waiting for connections to close,
        and slow clients are disconnected (uvicorn has no request head deadline)."""

        gateway: Gateway

        async def on_tick(self, counter: int) -> bool:
            if counter % 10 == 0:  # ticks are 0.1 s apart
                config = self.gateway.config
                close_slow_clients(
                    self.server_state.connections, config.header_timeout, config.body_timeout
                )
            return bool(await super().on_tick(counter))

        async def shutdown(self, sockets: Any = None) -> None:
            ended = self.gateway.streams.end_all()
            if ended:
                log.info("ending %d open stream(s)", ended)
            await super().shutdown(sockets)

    return Server
