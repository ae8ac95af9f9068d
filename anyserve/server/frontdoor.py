"""The front door: request ids, the request log, the ASGI app and the uvicorn subclasses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
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
from anyserve.server.config import MAX_HEADER_SIZE, MAX_HEADERS, ApiServerConfig
from anyserve.server.gateway import Gateway, check_health_forever, evict_forever
from anyserve.server.replies import error_response
from anyserve.server.routes import DIRECT_ROUTES, ROUTES
from anyserve.server.routing import REQUEST_ID, new_request_id

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


log = logging.getLogger("anyserve.api_server")

try:  # the kernel's unsent bytes of a socket (Linux; elsewhere only asyncio's are known)
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):
    _OUTQ = None


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
        f"request {state['request_id']} {scope.get('method', '')} {_bounded(path)}"
        f"{f' [{_bounded(capability)}]' if capability is not None else ''}"
        f"{f' -> {replica}' if replica is not None else ''} {status} {ms:.1f}ms"
    )
    # The path (percent-decoded: %0a is a newline) and the capability come from the
    # client: a control character in them could forge a log line or drive a terminal.
    # One search of the whole line is the hot path's cost; the rest of it is ours.
    if _CONTROL.search(line) is not None:
        line = escape_controls(line)
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


#: C0 controls, DEL, C1 controls and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Characters of one client-given field a log line shows at most (a head may be 64 KiB).
LOGGED_FIELD = 256


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN``)."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _bounded(text: str) -> str:
    """``text``, cut to :data:`LOGGED_FIELD` characters (saying how many more there were)."""
    if len(text) <= LOGGED_FIELD:
        return text
    return f"{text[:LOGGED_FIELD]}...({len(text) - LOGGED_FIELD} more)"


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


def protocol_class(max_header_size: int = MAX_HEADER_SIZE) -> type[Any]:
    """uvicorn's HTTP protocol (httptools when installed, else h11), noting for the slow
    client sweep (:func:`close_slow_clients`) when data arrived, a request head began and
    writing paused; with httptools, request heads over ``max_header_size`` bytes or
    :data:`MAX_HEADERS` fields are answered 431 (with h11, uvicorn's
    ``h11_max_incomplete_event_size``, set by ``serve.run``, bounds the head instead)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional: uvicorn falls back to h11 the same way
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class Protocol(Base):
        """An HTTP connection whose head, body and reply progress the sweep can judge."""

        #: ``time.monotonic()`` of the last bytes received.
        last_data = 0.0
        #: When the request head being waited for began (connection, or its first byte),
        #: and the finished cycle it follows (None: the connection's first request).
        head_since = 0.0
        head_after: Any = None
        #: Since when the transport has had writing paused (its buffer over the high-water
        #: mark) with the client taking none of it; 0.0 while it is not paused. And the
        #: buffer's size when last looked at, to tell a slow reader from one that stopped.
        write_paused_since = 0.0
        write_buffered = 0
        #: The request head was refused (431): what else arrives is discarded.
        refused = False

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

        def pause_writing(self) -> None:
            # Only noted: the sweep, already running every second, judges it; a timer per
            # pause would cost the relay's hot path for the rare client that stops reading.
            self.write_paused_since = time.monotonic()
            self.write_buffered = self.transport.get_write_buffer_size()
            super().pause_writing()

        def resume_writing(self) -> None:
            self.write_paused_since = 0.0
            super().resume_writing()

        def send_400_response(self, msg: str) -> None:
            if self.refused:
                return  # already answered 431 (a refused head stops the parser by raising)
            # uvicorn answers a request it cannot parse in plain text; every other error
            # from this server is JSON, so clients need only one way to read them.
            body = b'{"detail": "%s: the request is not valid HTTP/1.1"}' % msg.encode(
                "ascii", "replace"
            ).replace(b'"', b"'")
            self.transport.write(_BAD_REQUEST % (len(body), body))
            self.transport.close()

    if not hasattr(Base, "on_headers_complete"):
        return Protocol  # h11: no parser callbacks to count the head with

    class HeadLimitedProtocol(Protocol):
        """The protocol, refusing request heads too large before the parser holds them.

        httptools (llhttp) has no limit of its own: it hands a header over only once it is
        complete, so a 64 MiB header is held whole, and parsed in one go that stalls every
        other connection. The bytes of a head are counted from its first byte until
        ``on_headers_complete``; no more than the limit is ever fed to the parser.
        """

        #: Bytes of the current request head received so far; None while no head is
        #: being received (from its end until the message is complete).
        head_bytes: int | None = 0
        #: Header fields of the current head so far, and heads completed on the connection.
        header_count = 0
        heads = 0

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return  # the rest of a refused request, read only to be dropped
            # A body chunk (head_bytes None) goes straight on: one attribute test.
            while self.head_bytes is not None and len(data) > max_header_size - self.head_bytes:
                # Feed only what fits: the head may end within it, the rest is its body.
                room = max_header_size - self.head_bytes
                heads = self.heads
                self.head_bytes = max_header_size
                if room:
                    super().data_received(data[:room])
                if self.transport.is_closing():
                    return
                if self.heads == heads:  # the head did not end within the limit
                    self.refuse_head(f"the request head is over {max_header_size} bytes")
                    return
                data = data[room:]
            if self.head_bytes is not None:
                self.head_bytes += len(data)
            super().data_received(data)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.header_count += 1
            if self.header_count > MAX_HEADERS:
                self.refuse_head(f"the request has over {MAX_HEADERS} header fields")
                # Raising is the only way to stop httptools; uvicorn turns it into a 400,
                # which send_400_response skips as the connection is already answered.
                raise HeadRefused
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.head_bytes = None
            self.header_count = 0
            self.heads += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.head_bytes = 0  # what comes next is the next request's head

        def refuse_head(self, why: str) -> None:
            """Answer 431 (unless a reply is under way) and end the connection."""
            self.refused = True
            transport = self.transport
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and transport.can_write_eof():
                body = b'{"detail": "%s; the connection is closed"}' % why.encode()
                transport.write(_HEAD_TOO_LARGE % (len(body), body))
                # A lingering close: closing with the rest of the head unread would reset
                # the connection, and the client would lose the 431 with it. Only the
                # sending side is shut; what still arrives is dropped until the client
                # closes, or LINGER seconds have passed.
                transport.write_eof()
                self.loop.call_later(LINGER, transport.abort)
            else:
                transport.abort()
            client = self.client
            log.warning("refused a request from %s: %s", client[0] if client else "?", why)

    return HeadLimitedProtocol


#: Seconds a connection whose head was refused is kept to drop what the client still
#: sends (nginx's lingering_timeout is 5 s; a client that has the 431 closes at once).
LINGER = 2.0


class HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head that was refused."""


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def unsent(transport: Any) -> int:
    """Bytes written to ``transport`` that the client has not taken: the transport's buffer
    and, where the system says (Linux), the kernel's send queue, which on a fast link holds
    a few MiB that a slow reader takes before the transport's buffer shrinks at all."""
    size: int = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and _OUTQ is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
            size += int.from_bytes(queued, sys.byteorder, signed=True)
    return size


def close_slow_clients(
    connections: Iterable[Any], header_timeout: float, body_timeout: float, write_timeout: float
) -> int:
    """Close connections whose request head is late, whose body stalled or that leave
    the replies unread; how many.

    A connection waits for a head from its start (or from the first byte after a finished
    request; an idle kept-alive connection is uvicorn's to close) and must have it within
    ``header_timeout``. A body being received may pause at most ``body_timeout`` between
    reads, unless the server itself paused reading. The client gets a 408 if no response
    has started; the route reading the body sees a disconnect.

    A connection whose writes have stayed paused for ``write_timeout`` with the client
    taking none of the reply is aborted: its buffered reply is dropped, the route sees a
    disconnect, and a stream's relay cancels the replica call and releases its slot.
    """
    now = time.monotonic()
    closed = 0
    for conn in list(connections):
        transport = getattr(conn, "transport", None)
        if transport is None:
            continue
        paused = getattr(conn, "write_paused_since", 0.0)
        if paused:
            buffered = unsent(transport)
            if buffered < conn.write_buffered:
                # The client took some since the last look: slow, but reading (one large
                # reply to a slow reader stays paused until nearly all of it is taken).
                conn.write_paused_since = paused = now
            conn.write_buffered = buffered
        if paused and now - paused > write_timeout:
            # Even if closing: close() waits for the buffer to drain, which it never will.
            conn.write_paused_since = 0.0  # (aborted once; connection_lost follows)
            transport.abort()
            closed += 1
            client = getattr(conn, "client", None)
            log.warning(
                "closed a connection from %s: it took none of the reply for over %gs "
                "(--write-timeout)",
                client[0] if client else "?",
                write_timeout,
            )
            continue
        if transport.is_closing():
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
                    self.server_state.connections,
                    config.header_timeout,
                    config.body_timeout,
                    config.write_timeout,
                )
            return bool(await super().on_tick(counter))

        async def shutdown(self, sockets: Any = None) -> None:
            ended = self.gateway.streams.end_all()
            if ended:
                log.info("ending %d open stream(s)", ended)
            await super().shutdown(sockets)

    return Server
