"""The API server: registry, capability routing, JSON/SSE ⇄ gRPC, objects over HTTP.

The request flow is ``route function`` → :class:`Gateway` (asks the :class:`Registry` for
a replica, calls it over a cached gRPC channel) → reply. Everything that can go wrong is
an :class:`~anyserve.errors.AnyServeError` raised from there and turned into
``{"detail": message}`` with its status by the one error handler, :func:`error_response`.

Run it with ``python -m anyserve.api_server --port 8080`` or ``anyserve api-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import logging
import math
import os
import random
import re
import secrets
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc
import grpc.aio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from anyserve import kserve, openapi
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.capability import HEADER_PREFIX, add_query_key, finish_query, format_query
from anyserve.defaults import (
    MAX_BODY_SIZE,
    MAX_DELEGATION_DEPTH,
    MAX_MESSAGE_BYTES,
    OBJECT_STORE_PATH,
    max_message_bytes,
)
from anyserve.errors import (
    CHALLENGE,
    AnyServeError,
    BadRequest,
    ClientGone,
    DeadlineExceeded,
    DelegationLoop,
    HandlerError,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    error_headers,
    from_grpc,
)
from anyserve.registry import (
    MAX_QUEUE,
    Choice,
    Overloaded,
    RateLimiter,
    Registry,
    ReplicaRecord,
    TooManyRegistrations,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from anyserve.objects import ObjectStore, ObjRef

__all__ = ["ApiServerConfig", "Gateway", "create_app", "main", "run"]

log = logging.getLogger("anyserve.api_server")

#: Bodies of /register, /heartbeat and /unregister: a registration is a few kilobytes.
MAX_CONTROL_BODY = 1024 * 1024
#: How often leases are checked; well below any sensible TTL.
EVICT_EVERY = 0.5
#: Bytes per read when streaming an object out; each read is a round trip to a worker
#: thread. 256 KiB gave 850 MiB/s for a 64 MiB object from the page cache at 48 ms of API
#: server CPU, 1 MiB 1,000 MiB/s at 37 ms (2 shared cores); larger reads gained nothing
#: more, nor did reading the next chunk while writing the last (the socket is the limit).
DOWNLOAD_CHUNK = 1024 * 1024

#: Health checks: every replica is asked ServerReady this often, and fails the check if it
#: does not answer in time. A stopped or blocked replica leaves rotation within the sum
#: (1.5 s), and an answer takes well under a millisecond, so 0.5 s is no false alarm.
HEALTH_EVERY = 1.0
HEALTH_TIMEOUT = 0.5

#: Failover: a request whose replica could not be reached, or broke the connection before
#: answering, is sent once more to another, after a random pause of up to ``RETRY_BASE``
#: (doubling per retry up to ``RETRY_CAP``); Envoy's defaults for its retry back-off.
RETRY_BASE = 0.025
RETRY_CAP = 0.25
#: The retry budget: retries in progress may be this share of the active requests (Envoy's
#: retry budget, 20 %), and at least ``RETRY_MIN`` (Envoy's min_retry_concurrency), so that
#: one request alone may still retry. When most requests fail, retrying them all would
#: double the load on whatever is left.
RETRY_BUDGET = 0.2
RETRY_MIN = 3

#: A request head (request line and headers) must arrive within this many seconds of the
#: connection or the first byte of the request; a client that trickles it (slowloris) is
#: disconnected. 10 s is far beyond any real client and frees a held connection soon.
HEADER_TIMEOUT = 10.0
#: A request body may pause this long between two reads before the connection is closed
#: (nginx's client_body_timeout idea; half its default, as bodies here come from programs).
BODY_TIMEOUT = 30.0
#: A stream that sends nothing for this long is ended with an error event and cancelled
#: (nginx's proxy_read_timeout default): a generation that stalls a minute is stuck.
STREAM_IDLE_TIMEOUT = 60.0
#: Requests waiting for a replica slot give up after this long (503 with Retry-After): past
#: a few seconds a client is better told to come back than kept waiting.
QUEUE_TIMEOUT = 5.0
#: Registrations per client address: a token bucket refilled at this rate, with this burst.
#: A replica registers once and then heartbeats, so 20/s (40 at once) is ample even for
#: `anyserve up` starting many replicas on one host, and bounds what a flood can do.
REGISTER_RATE = 20.0
REGISTER_BURST = 40


def channel_options(max_message: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options of every channel to a replica, for messages up to ``max_message`` bytes."""
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        # gRPC's default backoff grows to 120 s; a replica restarted on the same port must be
        # reachable again within a second.
        # (min_reconnect_backoff_ms stays at its default: gRPC also uses it as the connect
        # timeout, and 100 ms fails first connections on a busy machine.)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # Our own "try another replica" is the retry policy; gRPC's would hide which failed.
        ("grpc.enable_retries", 0),
    ]


CHANNEL_OPTIONS = channel_options()

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_CAPABILITY_PREFIX_LEN = len(HEADER_PREFIX)
_NO_CAPABILITY = (
    "no X-Capability-* header: say which capability to call, e.g. -H 'X-Capability-Type: chat'"
)
# The routes to suggest when X-Capability-Stream disagrees with the route: (unary, stream).
_ROUTES = ("/infer/json or /infer", "/infer/stream")
_PROTOBUF = "application/x-protobuf"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ApiServerConfig:
    """Everything the API server process needs (from the CLI or the supervisor)."""

    host: str = "127.0.0.1"
    port: int = 8080
    lease_ttl: float = 8.0
    heartbeat_interval: float = 2.0
    object_store: Path = Path(OBJECT_STORE_PATH)
    request_timeout: float = 60.0
    log_level: str = "info"
    #: Largest object accepted by ``POST /objects`` (bytes).
    max_object_size: int = 1024**3
    #: On shutdown, open streams are ended at once; other requests get this long to finish.
    shutdown_timeout: float = 5.0
    #: Also serve the KServe v2 gRPC service on this port (anyserve.ingress); None: off.
    grpc_port: int | None = None
    #: Largest request body of the infer routes (bytes); gRPC messages follow it.
    max_body_size: int = MAX_BODY_SIZE
    #: Requests that may wait for a free replica, per capability asked for.
    max_queue: int = MAX_QUEUE
    #: Seconds a request may wait for a free replica before a 503.
    queue_timeout: float = QUEUE_TIMEOUT
    #: Seconds a stream may go without a message before it is ended.
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    #: Seconds for a request head to arrive; seconds a request body may pause.
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    #: The bearer token registration and object writes require (all routes with
    #: ``auth="all"``); None: no token, and only replicas on this machine may register.
    token: str | None = field(default_factory=lambda: os.environ.get("ANYSERVE_TOKEN") or None)
    #: ``"writes"``: the token guards registration and object writes; ``"all"``: every route.
    auth: str = "writes"
    #: Most replicas registered at once.
    max_replicas: int = 1024
    #: Registrations a second per client address, and the burst allowed.
    register_rate: float = REGISTER_RATE
    register_burst: int = REGISTER_BURST


# --------------------------------------------------------------------------- per-request routing


@dataclass
class Routing:
    """What the headers of one infer request say about where it may go."""

    query: dict[str, str]
    request_id: str
    timeout: float
    visited: list[str]
    depth: int
    #: Whether the client set the timeout (X-Request-Timeout): only then does a stream have
    #: a deadline; otherwise it runs as long as it keeps sending (see the idle timeout).
    timeout_given: bool = False

    @classmethod
    def from_request(
        cls, request: Request, default_timeout: float, stream: bool = False
    ) -> Routing:
        """Parse the ``X-Capability-*``, delegation and timeout headers; 400/508 when wrong."""
        scope = request.scope
        return cls.from_headers(
            scope["headers"], scope["state"]["request_id"], default_timeout, stream
        )

    @classmethod
    def from_headers(
        cls,
        headers: Iterable[tuple[bytes, bytes]],
        request_id: str,
        default_timeout: float,
        stream: bool = False,
        path: Mapping[str, str] | None = None,
    ) -> Routing:
        """:meth:`from_request` from the raw ASGI headers (lowercase names), in one pass.

        Starlette's ``request.headers`` would decode every header for the capability scan
        and scan again for each of the three others; this reads the raw pairs once. The
        query follows :mod:`anyserve.capability` (``path``: keys the route's path gives,
        as on the v2 REST routes); the other headers count by their first value.
        """
        query: dict[str, str] = {}
        raw_timeout = raw_visited = raw_depth = None
        for name, raw in headers:
            if not name.startswith(b"x-"):
                continue
            if name.startswith(b"x-capability-"):
                add_query_key(
                    query, name[_CAPABILITY_PREFIX_LEN:].decode("latin-1"), raw.decode("latin-1")
                )
            elif name == b"x-request-timeout":
                if raw_timeout is None:
                    raw_timeout = raw.decode("latin-1")
            elif name == b"x-delegated-from":
                if raw_visited is None:
                    raw_visited = raw.decode("latin-1")
            elif name == b"x-delegation-depth" and raw_depth is None:
                raw_depth = raw.decode("latin-1")
        query = finish_query(
            query, stream=stream, missing=_NO_CAPABILITY, path=path, routes=_ROUTES
        )
        timeout = default_timeout
        if raw_timeout is not None:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and timeout > 0):
                raise BadRequest(
                    f"X-Request-Timeout must be a positive number of seconds, not {raw_timeout!r}"
                )
        visited: list[str] = []
        if raw_visited:
            visited = [v for v in (v.strip() for v in raw_visited.split(",")) if v]
            if any(not (v.isascii() and v.isprintable()) for v in visited):
                raise BadRequest("X-Delegated-From must be a comma-separated list of replica ids")
        depth = 0
        if raw_depth is not None:
            raw_depth = raw_depth.strip() or "0"
            if not raw_depth.isdigit():
                raise BadRequest(f"X-Delegation-Depth must be a whole number, not {raw_depth!r}")
            depth = int(raw_depth)
        if depth > MAX_DELEGATION_DEPTH:
            trail = f" (visited: {', '.join(visited)})" if visited else ""
            raise DelegationLoop(
                f"request for {format_query(query)} was delegated {depth} times, past the "
                f"limit of {MAX_DELEGATION_DEPTH}{trail}: replicas keep forwarding a request "
                "none of them serves; check the capabilities in /registry"
            )
        return cls(
            query=query,
            request_id=request_id,
            timeout=timeout,
            visited=visited,
            depth=depth,
            timeout_given=raw_timeout is not None,
        )

    def metadata(self, choice: Choice) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata of docs/protocol.md for a call to ``choice``."""
        items = [
            ("x-request-id", self.request_id),
            ("anyserve-capability", choice.capability.metadata),
            ("x-delegation-depth", str(self.depth)),
        ]
        if self.visited:
            items.append(("x-delegated-from", ",".join(self.visited)))
        return tuple(items)


def _routing_headers(choice: Choice) -> dict[str, str]:
    """Reply headers that say which replica answered and what the alternatives were."""
    return {"X-AnyServe-Replica": choice.replica_id, "X-AnyServe-Candidates": _candidates(choice)}


def _candidates(choice: Choice) -> str:
    return ",".join(f"{rid}={n}" for rid, n in choice.candidates)


# How gRPC words UNAVAILABLE when the transport failed (no connection, or the connection
# broke: the process died or was killed). A replica's own UNAVAILABLE (a handler or its
# delegation saying so) has other text and is neither retried nor a reason to eject.
_TRANSPORT_FAILURES = (
    "failed to connect",
    "socket closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "connection aborted",
    "goaway",
    "stream removed",
    "end of tcp stream",
    "recvmsg",
    "sendmsg",
    "keepalive",
)


def _transport_failure(exc: grpc.aio.AioRpcError) -> bool:
    """True when the replica could not be reached or dropped the connection."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return any(marker in details for marker in _TRANSPORT_FAILURES)


def _translate(
    exc: grpc.aio.AioRpcError, choice: Choice, timeout: float, max_message: int
) -> AnyServeError:
    """The AnyServe error for a failed gRPC call to ``choice``."""
    where = f"replica {choice.replica_id} at {choice.endpoint}"
    return from_grpc(exc.code(), exc.details() or "", where, timeout, max_message)


# --------------------------------------------------------------------------- channels and streams


class Channels:
    """One gRPC channel per replica endpoint, created on first use and reused.

    A channel whose endpoint has left the registry is closed with a grace period, so
    requests still running on it (a replica being drained in a rolling reload) finish.
    """

    def __init__(
        self, close_grace: float, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS
    ) -> None:
        self._close_grace = close_grace
        self._options = list(options)
        self._stubs: dict[str, tuple[grpc.aio.Channel, pbg.GRPCInferenceServiceStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, endpoint: str) -> pbg.GRPCInferenceServiceStub:
        entry = self._stubs.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(endpoint, options=self._options)
            entry = (channel, pbg.GRPCInferenceServiceStub(channel))
            self._stubs[endpoint] = entry
        return entry[1]

    def retain(self, endpoints: set[str]) -> None:
        """Close (gracefully, in the background) every channel not in ``endpoints``."""
        for endpoint in [e for e in self._stubs if e not in endpoints]:
            channel, _ = self._stubs.pop(endpoint)
            task = asyncio.ensure_future(channel.close(grace=self._close_grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel now (server shutdown)."""
        channels = [channel for channel, _ in self._stubs.values()]
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels), *self._closing)

    def __len__(self) -> int:
        return len(self._stubs)


class OpenStream:
    """One stream being relayed: its gRPC call, and the bookkeeping to undo at its end."""

    def __init__(
        self, call: grpc.aio.UnaryStreamCall[Any, Any], choice: Choice, gateway: Gateway
    ) -> None:
        self.call = call
        self.choice = choice
        self.shutting_down = False
        #: Why the API server itself ended the stream (shutdown, idle), told to the client.
        self.ended_by: AnyServeError | None = None
        #: ``time.monotonic()`` of the last message (or of the start), for the idle timeout;
        #: infinity (never idle) until the relay sets it, as only a relay that updates it
        #: for every message can be judged by it.
        self.last_message = math.inf
        self._gateway = gateway
        self._started = time.perf_counter()
        self._finished = False

    def end(self, reason: AnyServeError) -> None:
        """Cancel the call on the API server's behalf; the client is told ``reason``."""
        if self.ended_by is None:
            self.ended_by = reason
        self.call.cancel()

    def finish(self, ok: bool) -> None:
        """Cancel the call and settle the counters; only the first call counts."""
        if self._finished:
            return
        self._finished = True
        # Cancelling the call is what makes the handler's next stream.send raise.
        self.call.cancel()
        self._gateway.streams.discard(self)
        ms = (time.perf_counter() - self._started) * 1000
        self._gateway.registry.finish(self.choice, ms, ok)


class Streams:
    """The streams being relayed, so that shutdown and the idle timeout can end them."""

    def __init__(self) -> None:
        self._open: set[OpenStream] = set()

    def add(self, stream: OpenStream) -> None:
        self._open.add(stream)

    def discard(self, stream: OpenStream) -> None:
        self._open.discard(stream)

    def end_all(self) -> int:
        """Cancel every open stream's gRPC call; each ends with an error event."""
        for stream in list(self._open):
            stream.shutting_down = True
            stream.end(_SHUTTING_DOWN)
        return len(self._open)

    def end_idle(self, idle_timeout: float) -> int:
        """End every stream that has sent nothing for ``idle_timeout`` seconds."""
        cutoff = time.monotonic() - idle_timeout
        idle = [s for s in self._open if s.last_message < cutoff and s.ended_by is None]
        for stream in idle:
            log.warning(
                "ending a stream from replica %s: no message for %gs",
                stream.choice.replica_id,
                idle_timeout,
            )
            stream.end(
                DeadlineExceeded(
                    f"replica {stream.choice.replica_id} sent nothing for {idle_timeout:g}s; "
                    "the stream was ended (the API server's --stream-idle-timeout)"
                )
            )
        return len(idle)

    def __len__(self) -> int:
        return len(self._open)


class EventStreamResponse:
    """The ASGI response relaying one stream as SSE: one ``data:`` event per gRPC message,
    written as soon as it arrives.

    Not Starlette's ``StreamingResponse``: that costs an anyio task group with two tasks
    and their cancel scopes per stream, and an async generator step per event, about a
    fifth of the API server's CPU per event. Here the request's own task relays, and one
    plain task waits for the client to disconnect; when it does, the gRPC call is
    cancelled, which ends the relay's pending read. Events are not held back to be
    coalesced: grpc.aio completes one read per event-loop turn, so by the time a message
    is written the next one has never been read yet (measured: 1.0-1.07 messages would
    share a write, at the cost of a task switch per message).
    """

    status_code = 200

    def __init__(self, gateway: Gateway, stream: OpenStream, first: Any, routing: Routing) -> None:
        self.stream = stream
        self._gateway = gateway
        self._first = first
        self._routing = routing
        self._client_left = False
        choice = stream.choice
        self.raw_headers = [
            *_SSE_RAW_HEADERS,
            (b"x-anyserve-replica", choice.replica_id.encode("latin-1")),
            (b"x-anyserve-candidates", _candidates(choice).encode("latin-1")),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        ok = False
        watcher: asyncio.Future[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            watcher = asyncio.ensure_future(_disconnected(receive))
            watcher.add_done_callback(self._watched)
            ok = await self._relay(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.remove_done_callback(self._watched)
                if not watcher.cancel() and not watcher.cancelled():
                    watcher.exception()  # (retrieved, so that asyncio does not log it)
            stream.finish(ok)

    def _watched(self, watcher: asyncio.Future[None]) -> None:
        """The client disconnected: stop the relay by cancelling its gRPC call."""
        if not watcher.cancelled() and watcher.exception() is None:
            self._client_left = True
            self.stream.call.cancel()

    async def _relay(self, send: Send) -> bool:
        """Relay every message until the call ends; whether the stream went well."""
        from anyserve.tensors import stream_event_to_json

        stream = self.stream
        read = stream.call.read
        ok = True
        message = self._first
        try:
            while message is not grpc.aio.EOF:
                if message.error_message:
                    ok = False
                await send(
                    {
                        "type": "http.response.body",
                        "body": _sse(stream_event_to_json(message)),
                        "more_body": True,
                    }
                )
                message = await read()
                stream.last_message = time.monotonic()
        except grpc.aio.AioRpcError as exc:
            if self._client_left:
                return True
            error = self._gateway.relay_error(stream, exc, self._routing.timeout)
            await send(_sse_body(error))
            return stream.shutting_down
        except asyncio.CancelledError:
            if self._client_left:
                return ok  # nobody is left to tell
            if stream.ended_by is not None and not _task_cancelling():
                # The API server ended the call (idle, shutdown): tell the client, then end.
                await send(_sse_body(stream.ended_by))
                return stream.shutting_down
            raise
        return ok


_SSE_RAW_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *((k.lower().encode(), v.encode()) for k, v in _SSE_HEADERS.items()),
)


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """The API server's state and the request path: registry, channels, streams, store."""

    def __init__(self, config: ApiServerConfig, registry: Registry | None = None) -> None:
        self.config = config
        #: The gRPC message limit both ways, from the configured body limit.
        self.max_message = max_message_bytes(config.max_body_size)
        if registry is None:  # (an empty registry is falsy: it has a length)
            registry = Registry(
                config.lease_ttl,
                config.heartbeat_interval,
                max_replicas=config.max_replicas,
                max_queue=config.max_queue,
                # Without a token anyone who reaches the API server could register: only
                # replicas on this machine may, so requests go nowhere else.
                loopback_only=not config.token,
            )
        self.registry = registry
        self.channels = Channels(
            close_grace=config.request_timeout,
            options=channel_options(self.max_message),
        )
        self.streams = Streams()
        self.registrations = RateLimiter(config.register_rate, config.register_burst)
        self.started = time.time()
        #: Retries in progress (the retry budget's numerator).
        self.retrying = 0
        self._store: ObjectStore | None = None

    # Registry changes ---------------------------------------------------------------

    def forget_gone(self) -> None:
        """Evict expired leases and close the channels nobody needs any more."""
        for record in self.registry.expire():
            log.warning(
                "evicted replica %s at %s: no heartbeat for over %gs",
                record.replica_id,
                record.endpoint,
                self.config.lease_ttl,
            )
        self.channels.retain(self.registry.endpoints())
        # Ejections that ran out free slots that waiting requests may take.
        self.registry.dispatch()

    def admit_registration(self, client: str) -> None:
        """Take a registration token for ``client``; :class:`TooManyRegistrations` if none."""
        wait = self.registrations.take(client)
        if wait:
            raise TooManyRegistrations(
                f"too many registrations from {client}: at most "
                f"{self.config.register_rate:g} a second (bursts of "
                f"{self.config.register_burst}); retry in {wait:.2f}s",
                retry_after=wait,
            )

    # Health ----------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Ask every registered replica ``ServerReady`` once, all at the same time."""
        records = self.registry.records()
        if records:
            await asyncio.gather(*(self._check(record) for record in records))

    async def _check(self, record: ReplicaRecord) -> None:
        since = self.registry.now()
        stats = record.stats
        answered = stats.requests - stats.errors
        problem: str | None = None
        try:
            stub = self.channels.stub(record.endpoint)
            reply = await stub.ServerReady(_READY_REQUEST, timeout=HEALTH_TIMEOUT)
            if not reply.ready:
                problem = "it says it is not ready (starting or shutting down)"
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # A replica that completed requests meanwhile is busy, not stuck.
                if stats.requests - stats.errors > answered:
                    return
                problem = f"no answer to ServerReady within {HEALTH_TIMEOUT:g}s"
            else:
                problem = f"ServerReady failed: {exc.code().name}: {(exc.details() or '')[:200]}"
        except Exception as exc:  # a bug here must not stop the other checks
            problem = f"health check failed: {exc!r}"
        if self.registry.set_health(record, problem is None, problem, since):
            if problem is None:
                log.info("replica %s at %s is back in rotation", record.replica_id, record.endpoint)
            else:
                log.warning(
                    "replica %s at %s out of rotation: %s",
                    record.replica_id,
                    record.endpoint,
                    problem,
                )

    # Choosing a replica ------------------------------------------------------------------

    async def _wait(
        self, routing: Routing, stream: bool, exclude: list[str], deadline: float
    ) -> Choice:
        """Wait in the queue for a slot on a matching replica (every one is at its limit).

        :class:`Overloaded` (503) when the queue is full or the queue timeout passes first,
        :class:`DeadlineExceeded` (504) when the request's own deadline does.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Choice] = loop.create_future()

        def deliver(choice: Choice) -> bool:
            if future.done():
                return False
            future.set_result(choice)
            return True

        waiter = self.registry.enqueue(routing.query, stream, exclude, deliver)
        left = deadline - time.perf_counter()
        wait = min(self.config.queue_timeout, left)

        def expire() -> None:
            if future.done():
                return
            self.registry.dequeue(waiter)
            what = format_query(routing.query)
            if wait < left:
                future.set_exception(
                    Overloaded(
                        f"every replica serving {what} stayed at its limit for "
                        f"{self.config.queue_timeout:g}s (the queue timeout); retry later, "
                        "or add replicas"
                    )
                )
            else:
                future.set_exception(
                    DeadlineExceeded(
                        f"no replica serving {what} was free within the request's "
                        f"{routing.timeout:g}s (X-Request-Timeout)"
                    )
                )

        timer = loop.call_later(max(0.0, wait), expire)
        try:
            return await future
        except BaseException:
            # Handed a slot, but cancelled before taking it (the client went away): give it back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.registry.release(future.result())
            raise
        finally:
            timer.cancel()
            self.registry.dequeue(waiter)

    def _retry(
        self,
        exc: grpc.aio.AioRpcError,
        choice: Choice,
        routing: Routing,
        exclude: list[str],
        stream: bool,
    ) -> bool:
        """Whether to send the request to another replica after ``exc`` (at most once).

        Only a transport failure qualifies: the replica could not be reached, or dropped the
        connection before answering. That replica is ejected either way. ``exclude`` gets
        its id when the answer is yes. A retry needs another candidate and room in the
        retry budget.
        """
        if not _transport_failure(exc):
            return False
        self._eject(choice, exc)
        if len(exclude) > len(routing.visited):
            return False  # this request was retried already
        budget = max(RETRY_MIN, RETRY_BUDGET * self.registry.active)
        if self.retrying >= budget:
            log.warning(
                "request %s: replica %s at %s failed; not retried, %d retries are in progress "
                "already (the retry budget)",
                routing.request_id,
                choice.replica_id,
                choice.endpoint,
                self.retrying,
            )
            return False
        exclude.append(choice.replica_id)
        if not self.registry.candidates(routing.query, stream, exclude):
            return False
        log.warning(
            "request %s: replica %s at %s not reachable, trying another",
            routing.request_id,
            choice.replica_id,
            choice.endpoint,
        )
        return True

    def _eject(self, choice: Choice, exc: grpc.aio.AioRpcError) -> None:
        """Take a replica whose connection failed out of rotation (see Registry.eject)."""
        problem = f"{exc.code().name}: {(exc.details() or '')[:200]}"
        period = self.registry.eject(choice.record, problem)
        if period is not None:
            log.warning(
                "replica %s at %s out of rotation for %gs: %s",
                choice.replica_id,
                choice.endpoint,
                period,
                problem,
            )

    @staticmethod
    async def _back_off(
        routing: Routing, deadline: float, exc: grpc.aio.AioRpcError, attempt: int = 1
    ) -> None:
        """The pause before retry number ``attempt``: random up to ``RETRY_BASE`` doubled per
        attempt, capped (full jitter, so that retries of many requests spread out); the
        error itself when the request's deadline would pass first."""
        pause = random.uniform(0.0, min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1)))
        if time.perf_counter() + pause >= deadline:
            raise DeadlineExceeded(
                f"replica failed ({exc.code().name}: {exc.details()}) and no time was left "
                f"in the request's {routing.timeout:g}s to try another"
            )
        await asyncio.sleep(pause)

    # Unary -----------------------------------------------------------------------------

    async def infer(
        self, request: pb.ModelInferRequest, routing: Routing
    ) -> tuple[pb.ModelInferResponse, Choice]:
        """Send ``request`` to the least-loaded usable matching replica; its reply and the choice.

        When every such replica is at its limit the request waits for a slot (bounded queue,
        queue timeout). A replica that cannot be reached, or that drops the connection
        before answering, is ejected and the request goes once to another; the request's
        deadline covers the wait, every attempt and the pause between them.
        """
        started = time.perf_counter()
        deadline = started + routing.timeout
        exclude = routing.visited
        retried = False
        try:
            while True:
                choice = self.registry.try_acquire(routing.query, False, exclude)
                if choice is None:  # every matching replica is at its limit: wait for a slot
                    choice = await self._wait(routing, False, exclude, deadline)
                stub = self.channels.stub(choice.endpoint)
                sent = time.perf_counter()
                ok = False
                try:
                    reply = await stub.ModelInfer(
                        request, metadata=routing.metadata(choice), timeout=deadline - sent
                    )
                    ok = True
                    return reply, choice
                except grpc.aio.AioRpcError as exc:
                    if not retried:
                        exclude = [*exclude]
                    if retried or not self._retry(exc, choice, routing, exclude, stream=False):
                        raise _translate(exc, choice, routing.timeout, self.max_message) from None
                    failure = exc
                finally:
                    self.registry.finish(choice, (time.perf_counter() - sent) * 1000, ok)
                retried = True
                self.retrying += 1
                await self._back_off(routing, deadline, failure)
        finally:
            if retried:
                self.retrying -= 1

    # Streaming -----------------------------------------------------------------------

    async def open_stream(
        self,
        request: pb.ModelInferRequest,
        routing: Routing,
        client_gone: Callable[[], Awaitable[None]],
    ) -> EventStreamResponse:
        """Start a stream (:meth:`start_stream`); the SSE response relaying it."""
        stream, first = await self.start_stream(request, routing, client_gone)
        return EventStreamResponse(self, stream, first, routing)

    async def start_stream(
        self,
        request: pb.ModelInferRequest,
        routing: Routing,
        client_gone: Callable[[], Awaitable[None]],
    ) -> tuple[OpenStream, Any]:
        """Start a stream on the least-loaded usable matching replica; it and its first message.

        The first message is awaited here, so that a replica or handler that fails before
        sending anything is an error status rather than a reply carrying an error event;
        a replica that cannot be reached is replaced once, as for unary requests. Once a
        message was relayed the stream is never replayed: a failure is an error event.
        ``client_gone`` returns when the client disconnects: the stream is then
        cancelled even though no reply has started yet. A stream has a deadline only when
        the client set one (``timeout_given``); otherwise the idle timeout bounds it. The
        relay must set ``last_message`` for every message it reads, and settle the stream
        with ``finish`` (errors: :meth:`relay_error`).
        """
        timeout = routing.timeout if routing.timeout_given else None
        deadline = time.perf_counter() + timeout if timeout is not None else math.inf
        exclude = routing.visited
        retried = False
        try:
            while True:
                choice = self.registry.try_acquire(routing.query, True, exclude)
                if choice is None:  # every matching replica is at its limit: wait for a slot
                    choice = await self._wait(routing, True, exclude, deadline)
                stub = self.channels.stub(choice.endpoint)
                left = None if timeout is None else deadline - time.perf_counter()
                call = stub.ModelStreamInfer(
                    request, metadata=routing.metadata(choice), timeout=left
                )
                stream = OpenStream(call, choice, self)
                stream.last_message = time.monotonic()
                self.streams.add(stream)
                try:
                    first = await _first_message(call, client_gone)
                except grpc.aio.AioRpcError as exc:
                    stream.finish(ok=False)
                    if not retried:
                        exclude = [*exclude]
                    if retried or not self._retry(exc, choice, routing, exclude, stream=True):
                        raise _translate(exc, choice, routing.timeout, self.max_message) from None
                    retried = True
                    self.retrying += 1
                    await self._back_off(routing, deadline, exc)
                    continue
                except asyncio.CancelledError:
                    stream.finish(ok=stream.ended_by is None or stream.shutting_down)
                    if stream.ended_by is not None and not _task_cancelling():
                        raise stream.ended_by from None
                    raise
                except BaseException:
                    stream.finish(ok=False)
                    raise
                if first is not grpc.aio.EOF and first.error_message:
                    # The handler failed before producing anything: say so with a status.
                    stream.finish(ok=False)
                    raise HandlerError(first.error_message)
                stream.last_message = time.monotonic()
                return stream, first
        finally:
            if retried:
                self.retrying -= 1

    def relay_error(
        self, stream: OpenStream, exc: grpc.aio.AioRpcError, timeout: float
    ) -> AnyServeError:
        """What the client of a relayed stream is told when its call fails: why the API
        server ended it, else the replica's failure (ejecting a replica whose connection
        broke)."""
        if stream.ended_by is not None:
            return stream.ended_by
        if _transport_failure(exc):
            self._eject(stream.choice, exc)
        return _translate(exc, stream.choice, timeout, self.max_message)

    # Objects ---------------------------------------------------------------------------

    async def objects(self) -> ObjectStore:
        """The object store, opened on first use (its directory checks do I/O)."""
        if self._store is None:
            from anyserve.objects import ObjectStore

            self._store = await run_in_threadpool(ObjectStore, self.config.object_store)
        return self._store


_READY_REQUEST = pb.ServerReadyRequest()


_SHUTTING_DOWN = Unavailable("the API server is shutting down; retry the request")


async def _first_message(
    call: grpc.aio.UnaryStreamCall[Any, Any], client_gone: Callable[[], Awaitable[None]]
) -> Any:
    """The call's first message, unless the client disconnects first (:class:`ClientGone`)."""
    read = asyncio.ensure_future(call.read())
    gone = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not read.done():
            read.cancel()
    if read.done():
        # A call cancelled by shutdown raises CancelledError here, as a plain read would.
        return read.result()
    raise ClientGone("the client disconnected before the first message")


async def _disconnected(receive: Receive) -> None:
    """Return once the client has disconnected (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _task_cancelling() -> bool:
    """Whether the current task itself is being cancelled (not just a call inside it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _sse(event: Any) -> bytes:
    from anyserve.tensors import dumps

    return b"data: " + dumps(event) + b"\n\n"


def _sse_error(exc: AnyServeError) -> bytes:
    return _sse({"error": exc.message, "status": exc.status})


def _sse_body(exc: AnyServeError) -> Message:
    """The body message of the error event that ends a stream."""
    return {"type": "http.response.body", "body": _sse_error(exc), "more_body": True}


# --------------------------------------------------------------------------- helpers for routes


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    from anyserve.tensors import dumps

    return Response(dumps(data), status_code=status, headers=headers, media_type="application/json")


async def _json_body(request: Request) -> Any:
    from anyserve.tensors import loads

    body = await request.body()
    if not body:
        raise BadRequest("the request body is empty; send a JSON object")
    return loads(body)


def _note(request: Request, routing: Routing, choice: Choice | None = None) -> None:
    """Record what the request-log line should say about routing (the query's text is
    made once, the first time: a route notes before and after choosing a replica)."""
    state = request.scope["state"]
    if "capability" not in state:
        state["capability"] = format_query(routing.query)
    if choice is not None:
        state["replica"] = choice.replica_id


# --------------------------------------------------------------------------- routes


async def health(request: Request) -> Response:
    """``GET /health``."""
    return _json({"status": "healthy"})


async def register(request: Request) -> Response:
    """``POST /register``: add or replace a replica's record (docs/protocol.md).

    Rate-limited per client address (429 with Retry-After), refused when the registry is
    full (507) or, without a token, for an endpoint not on this machine (403).
    """
    gateway = _gateway(request)
    gateway.admit_registration(_client(request))
    record = gateway.registry.register(await _json_body(request))
    gateway.channels.retain(gateway.registry.endpoints())
    log.info(
        "registered replica %s at %s: %s",
        record.replica_id,
        record.endpoint,
        "; ".join(str(c) for c in record.capabilities) or "no capabilities",
    )
    return _json(_lease_reply(gateway, record.replica_id))


async def heartbeat(request: Request) -> Response:
    """``POST /heartbeat``: renew a lease; an unknown id registers again (see Registry)."""
    gateway = _gateway(request)
    body = await _json_body(request)
    if not (isinstance(body, dict) and gateway.registry.known(body.get("replica_id"))):
        gateway.admit_registration(_client(request))  # it registers: rate-limited alike
    record, registered = gateway.registry.heartbeat(body)
    if registered:
        gateway.channels.retain(gateway.registry.endpoints())
        log.info(
            "re-registered replica %s at %s from its heartbeat", record.replica_id, record.endpoint
        )
    return _json({**_lease_reply(gateway, record.replica_id), "registered": registered})


async def unregister(request: Request) -> Response:
    """``DELETE /unregister`` (or ``POST``): remove a record, only by its owning instance."""
    gateway = _gateway(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"replica_id": ..., "instance": ...}')
    record = gateway.registry.unregister(body.get("replica_id"), body.get("instance"))
    if record is None:
        raise NotFound(f"no replica {body.get('replica_id')!r} is registered (see /registry)")
    gateway.channels.retain(gateway.registry.endpoints())
    log.info("unregistered replica %s at %s", record.replica_id, record.endpoint)
    return _json({"success": True, "replica_id": record.replica_id})


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _lease_reply(gateway: Gateway, replica_id: str) -> dict[str, Any]:
    return {
        "success": True,
        "replica_id": replica_id,
        "lease_ttl": gateway.config.lease_ttl,
        "heartbeat_interval": gateway.config.heartbeat_interval,
    }


async def registry(request: Request) -> Response:
    """``GET /registry``: every live replica with its state and load."""
    replicas = _gateway(request).registry.snapshot()
    return _json({"replicas": replicas, "total": len(replicas)})


async def stats(request: Request) -> Response:
    """``GET /stats``: totals since start and per-replica load (the dashboard reads this)."""
    gateway = _gateway(request)
    replicas = gateway.registry.snapshot()
    return _json(
        {
            "uptime_s": round(time.time() - gateway.started, 3),
            **gateway.registry.totals(),
            "open_streams": len(gateway.streams),
            # Requests waiting for a free replica, and retries in progress.
            "waiting": gateway.registry.waiting,
            "retrying": gateway.retrying,
            "lease_ttl": gateway.config.lease_ttl,
            "heartbeat_interval": gateway.config.heartbeat_interval,
            "replicas": replicas,
            "total": len(replicas),
        }
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the same counters in the Prometheus text format."""
    gateway = _gateway(request)
    return Response(
        _prometheus(gateway),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


# name, type, help, and the /registry field it reports per replica
_PER_REPLICA = (
    ("anyserve_replica_requests_total", "counter", "Requests sent to each replica.", "requests"),
    ("anyserve_errors_total", "counter", "Requests to each replica that failed.", "errors"),
    ("anyserve_in_flight", "gauge", "Requests each replica is serving now.", "in_flight"),
)


def _prometheus(gateway: Gateway) -> str:
    """The registry's counters in the Prometheus text exposition format."""
    replicas = gateway.registry.snapshot()
    totals = gateway.registry.totals()
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{labels} {value}" for labels, value in samples if value is not None)

    family("anyserve_replicas", "gauge", "Registered replicas.", [("", len(replicas))])
    family("anyserve_open_streams", "gauge", "Streams being relayed.", [("", len(gateway.streams))])
    for name, kind, help_text, key in _PER_REPLICA:
        family(name, kind, help_text, [(_labels(r), r[key]) for r in replicas])
    latency = [
        (_labels(r, quantile=q), r[key])
        for r in replicas
        for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms"))
    ]
    family("anyserve_request_latency_ms", "gauge", "Recent latency per replica (ms).", latency)
    family(
        "anyserve_routed_requests_total",
        "counter",
        "Requests routed since start.",
        [("", totals["requests"])],
    )
    family(
        "anyserve_routed_errors_total",
        "counter",
        "Failed requests since start.",
        [("", totals["errors"])],
    )
    # Per capability and replica: outcomes (code="ok"|"error"), in flight, latency histograms;
    # unary requests and streams apart. A series appears with the first request.
    from anyserve.registry import LATENCY_BUCKETS

    records = gateway.registry.records()
    serving: dict[str, int] = {}
    for record in records:
        for capability in record.capabilities:
            text = format_query(capability.match_keys)
            serving[text] = serving.get(text, 0) + 1
    family(
        "anyserve_capability_replicas",
        "gauge",
        "Registered replicas serving each capability.",
        [(f'{{capability="{_label(c)}"}}', n) for c, n in serving.items()],
    )
    les = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    for kind, what in (("requests", "Unary requests"), ("streams", "Streams")):
        stream = kind == "streams"
        counts: list[tuple[str, Any]] = []
        open_now: list[tuple[str, Any]] = []
        hist: list[tuple[str, Any]] = []
        for record in records:
            for cs in record.stats.by_capability.values():
                if cs.capability.stream != stream:
                    continue
                text = format_query(cs.capability.match_keys)
                base = f'capability="{_label(text)}",replica="{_label(record.replica_id)}"'
                counts += [
                    (f'{{{base},code="ok"}}', cs.ok),
                    (f'{{{base},code="error"}}', cs.errors),
                ]
                open_now.append((f"{{{base}}}", cs.in_flight))
                total = 0
                for le, n in zip(les, cs.buckets, strict=True):
                    total += n
                    hist.append((f'_bucket{{{base},le="{le}"}}', total))
                hist += [(f"_sum{{{base}}}", round(cs.seconds, 6)), (f"_count{{{base}}}", total)]
        unit = "stream" if stream else "request"
        family(f"anyserve_{kind}_total", "counter", f"{what} per capability and replica.", counts)
        family(
            "anyserve_streams_open" if stream else "anyserve_requests_in_flight",
            "gauge",
            f"{what} in progress per capability and replica.",
            open_now,
        )
        family(
            f"anyserve_{unit}_duration_seconds",
            "histogram",
            f"{what} duration per capability and replica (seconds).",
            hist,
        )
    return "\n".join(lines) + "\n"


def _labels(replica: Mapping[str, Any], **extra: str) -> str:
    pairs = {"replica": replica["replica_id"], **extra}
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs.items()) + "}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def _infer_input(
    request: Request, protobuf: bool, stream: bool = False
) -> tuple[Routing, pb.ModelInferRequest]:
    """The routing headers and the request message (serialized protobuf or the seed's JSON)."""
    from google.protobuf.message import DecodeError

    from anyserve.tensors import request_from_json

    routing = Routing.from_request(request, _gateway(request).config.request_timeout, stream)
    _note(request, routing)
    if not protobuf:
        return routing, request_from_json(await _json_body(request))
    try:
        return routing, pb.ModelInferRequest.FromString(await request.body())
    except DecodeError as exc:
        raise BadRequest(f"the body is not a serialized ModelInferRequest: {exc}") from None


async def infer_protobuf(request: Request) -> Response:
    """``POST /infer``: a serialized ``ModelInferRequest`` in, ``ModelInferResponse`` out."""
    routing, message = await _infer_input(request, protobuf=True)
    reply, choice = await _gateway(request).infer(message, routing)
    _note(request, routing, choice)
    headers = _routing_headers(choice)
    return Response(reply.SerializeToString(), media_type=_PROTOBUF, headers=headers)


async def infer_json(request: Request) -> Response:
    """``POST /infer/json``: the seed's JSON request and reply shapes."""
    from anyserve.tensors import response_to_json

    routing, message = await _infer_input(request, protobuf=False)
    reply, choice = await _gateway(request).infer(message, routing)
    _note(request, routing, choice)
    return _json(response_to_json(reply), headers=_routing_headers(choice))


async def infer_stream(request: Request) -> EventStreamResponse:
    """``POST /infer/stream``: one ``data: <json>`` SSE event per message from the handler.

    The body is the seed's JSON, or a serialized ``ModelInferRequest`` when sent as
    ``application/x-protobuf``.
    """
    protobuf = request.headers.get("content-type", "").startswith(_PROTOBUF)
    routing, message = await _infer_input(request, protobuf, stream=True)
    client_gone = partial(_disconnected, request.receive)
    response = await _gateway(request).open_stream(message, routing, client_gone)
    _note(request, routing, response.stream.choice)
    return response


async def list_objects(request: Request) -> Response:
    """``GET /objects``: every stored object's reference, oldest first."""
    store = await _gateway(request).objects()
    refs = await run_in_threadpool(store.list)
    return _json({"objects": [r.to_dict() for r in refs], "total": len(refs)})


async def upload_object(request: Request) -> Response:
    """``POST /objects[?key=K][&type=json|bytes]``: store the body, streamed to disk."""
    gateway = _gateway(request)
    limit = gateway.config.max_object_size
    content_type = request.query_params.get("type", "bytes")
    if content_type not in ("json", "bytes"):
        raise BadRequest(f"type must be json or bytes, not {content_type!r}")
    key = request.query_params.get("key") or None
    if key is not None:
        from anyserve.objects import validate_key

        validate_key(key)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        # Refused before reading a byte of it.
        raise PayloadTooLarge(f"the upload is {length} bytes; the limit is {limit} bytes")
    store = await gateway.objects()
    try:
        ref = await run_in_threadpool(
            store.write_stream, _sync_chunks(request.stream()), key, content_type, limit
        )
    except ClientDisconnect:
        raise BadRequest("the upload ended before its last byte; nothing was stored") from None
    log.info("stored object %s (%d bytes, %s)", ref.key, ref.size, ref.content_type)
    return _json(ref.to_dict(), status=201)


def _sync_chunks(chunks: AsyncIterator[bytes]) -> Iterator[bytes]:
    """Pull an async byte stream from a worker thread (for the store's sync writer)."""
    import anyio.from_thread

    async def next_chunk() -> bytes | None:
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk


async def download_object(request: Request) -> Response:
    """``GET /objects/{key}``: the object's raw data, streamed."""
    import anyio.to_thread

    store = await _gateway(request).objects()
    key = request.path_params["key"]

    def stat_and_open() -> tuple[ObjRef, BinaryIO]:
        ref = store.stat(key)  # the key checks (400, 404) happen here
        return ref, store.open(key)

    ref, file = await run_in_threadpool(stat_and_open)
    size = os.fstat(file.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await anyio.to_thread.run_sync(file.read, DOWNLOAD_CHUNK):
                yield chunk
        finally:
            file.close()

    media = "application/json" if ref.content_type == "json" else "application/octet-stream"
    headers = {
        "Content-Length": str(size),
        "X-Object-Key": ref.key,
        "X-Object-Type": ref.content_type,
        "X-Object-Created-At": repr(ref.created_at),
    }
    return StreamingResponse(chunks(), media_type=media, headers=headers)


async def delete_object(request: Request) -> Response:
    """``DELETE /objects/{key}``."""
    from anyserve.errors import ObjectNotFound

    store = await _gateway(request).objects()
    key = request.path_params["key"]
    if not await run_in_threadpool(store.delete, key):
        raise ObjectNotFound(f"no object {key!r} (see GET /objects)")
    log.info("deleted object %s", key)
    return _json({"success": True, "key": key})


#: The routes RequestLog answers without Starlette (POST only; see RequestLog).
DIRECT_ROUTES: dict[str, Callable[[Request], Awaitable[ASGIApp]]] = {
    "/infer": infer_protobuf,
    "/infer/json": infer_json,
    "/infer/stream": infer_stream,
}

ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/register", register, methods=["POST"]),
    Route("/heartbeat", heartbeat, methods=["POST"]),
    Route("/unregister", unregister, methods=["DELETE", "POST"]),
    Route("/registry", registry, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/infer", infer_protobuf, methods=["POST"]),
    Route("/infer/json", infer_json, methods=["POST"]),
    Route("/infer/stream", infer_stream, methods=["POST"]),
    Route("/objects", list_objects, methods=["GET"]),
    Route("/objects", upload_object, methods=["POST"]),
    # `:path` so that a key with a '/' reaches the store's key check (400), not a 404.
    Route("/objects/{key:path}", download_object, methods=["GET"]),
    Route("/objects/{key:path}", delete_object, methods=["DELETE"]),
    Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    # KServe v2 REST (the Open Inference Protocol), routed by capability.
    *kserve.routes,
]


# --------------------------------------------------------------------------- the error handler


async def error_response(request: Request, exc: Exception) -> Response:
    """The one place an exception becomes an HTTP reply: ``{"detail": message}``."""
    if isinstance(exc, AnyServeError):
        return _json({"detail": exc.message}, status=exc.status, headers=error_headers(exc))
    if isinstance(exc, HTTPException):  # Starlette's own: unknown route, wrong method
        return _json({"detail": exc.detail}, status=exc.status_code, headers=exc.headers)
    if isinstance(exc, ClientDisconnect):
        # The client left (or was disconnected for a stalled body): nobody reads this.
        return Response(status_code=ClientGone.status)
    # Anything else is a bug: the traceback goes to the log (RequestLog), not to the client.
    request_id = getattr(request.state, "request_id", "?")
    return _json({"detail": f"internal error (request id {request_id})"}, status=500)


def _error_reply(
    path: str, status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An error answered before routing, in the shape of the route it was meant for."""
    key = "error" if path == "/v2" or path.startswith("/v2/") else "detail"
    return _json({key: message}, status=status, headers=headers)


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
            presented = _bearer(authorization)
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
                return _error_reply(path, 401, message, {"WWW-Authenticate": challenge})
        if length is not None:
            limit = self.body_limit(method, path)
            if limit is not None and length.isdigit() and int(length) > limit:
                return _error_reply(
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


def _bearer(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


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
                request_id = text if _REQUEST_ID.fullmatch(text) else ""
        elif name == b"content-length":
            length = value
        elif name == b"authorization":
            authorization = value
    return request_id or _new_request_id(), length, authorization


class RequestIds:
    """Request ids for requests that came without one: ``<prefix><counter>`` in hex.

    The prefix is 8 random hex digits drawn once per process, the counter counts from a
    random start; ids are unique within a process (the counter only grows, past 8 digits
    if need be) and, with near certainty, across processes and restarts. They name log
    lines, not secrets: ids of one process are sequential, and whoever sees one can
    guess its neighbours. ``secrets.token_hex`` per request cost a ``getrandom`` system
    call each (2 % of the API server's CPU at concurrency 16).
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = itertools.count(secrets.randbelow(1 << 28)).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():08x}"


_new_request_id = RequestIds()


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
    elif _fast_info.handler is not None:
        _fast_info.write(line)
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


_fast_info = FastInfo()
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
                from anyserve import ingress as grpc_ingress

                ingress = await grpc_ingress.start(gateway, config.host, config.grpc_port)
            sweeper = asyncio.ensure_future(_evict_forever(gateway))
            checker = asyncio.ensure_future(_check_health_forever(gateway))
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


async def _evict_forever(gateway: Gateway) -> None:
    """Expire leases and end idle streams, twice a second."""
    while True:
        await asyncio.sleep(EVICT_EVERY)
        try:
            gateway.forget_gone()
            gateway.streams.end_idle(gateway.config.stream_idle_timeout)
        except Exception:  # never let a bug stop eviction
            log.exception("lease sweep failed")


async def _check_health_forever(gateway: Gateway) -> None:
    """Health-check every replica each ``HEALTH_EVERY`` seconds, on a fixed beat."""
    loop = asyncio.get_running_loop()
    beat = loop.time()
    while True:
        # A fixed beat, not a pause after each round, so that a round of timeouts does not
        # stretch the interval: a stuck replica is found within HEALTH_EVERY + HEALTH_TIMEOUT.
        beat = max(beat + HEALTH_EVERY, loop.time())
        await asyncio.sleep(beat - loop.time())
        try:
            await gateway.check_health()
        except Exception:  # never let a bug stop health checks
            log.exception("health check round failed")


def _protocol_class() -> type[Any]:
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


def _server_class() -> type[Any]:
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


def run(config: ApiServerConfig) -> None:
    """Serve until SIGINT/SIGTERM (the sync shell around uvicorn)."""
    import uvicorn

    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    _fast_info.install(log)
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="auto",
        http=_protocol_class(),
        lifespan="on",
        access_log=False,  # RequestLog writes one line per request with its id
        # No X-Forwarded-For rewriting: nothing sits in front of the API server by default,
        # and the registration rate limit must key on the real peer, not on a header
        # any local client can set (uvicorn trusts it from 127.0.0.1).
        proxy_headers=False,
        # No "server: uvicorn" on every reply (the Date header stays: HTTP requires it).
        server_header=False,
        log_config=None,  # keep the logging set up above
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=max(1, math.ceil(config.shutdown_timeout)),
    )
    server = _server_class()(uv_config)
    server.gateway = app.gateway
    log.info(
        "API server on http://%s:%d (lease %gs, heartbeat %gs, objects in %s; %s)",
        config.host,
        config.port,
        config.lease_ttl,
        config.heartbeat_interval,
        config.object_store,
        f"token required for {'every route' if config.auth == 'all' else 'registration and writes'}"
        if config.token
        else "no token: only replicas on this machine may register",
    )
    server.run()
    if not server.started:
        # uvicorn logged why (usually: the port is taken); exit non-zero for the supervisor.
        sys.exit(1)


def parse_size(text: str) -> int:
    """``"1G"``, ``"200M"``, ``"512k"`` or a number of bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in units else cleaned
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number: {text!r}")
    return value


def parse_args(
    argv: Sequence[str] | None = None, prog: str = "python -m anyserve.api_server"
) -> ApiServerConfig:
    """The command line of ``python -m anyserve.api_server`` (and ``anyserve api-server``)."""
    defaults = ApiServerConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="AnyServe API server: registry, capability routing, objects over HTTP.",
    )
    for flag, kind, help_text in (
        ("--host", str, "address to bind"),
        ("--port", int, "HTTP port"),
        ("--lease-ttl", _positive, "seconds without a heartbeat before a replica is evicted"),
        ("--heartbeat-interval", _positive, "seconds between heartbeats, told to replicas"),
        ("--object-store", Path, "object store directory served at /objects"),
        ("--request-timeout", _positive, "default unary deadline (X-Request-Timeout)"),
        ("--max-object-size", parse_size, "largest upload to POST /objects, e.g. 500M, 2G"),
        ("--max-body-size", parse_size, "largest request body of the other routes (413)"),
        ("--max-queue", _whole, "requests that may wait for a busy capability"),
        ("--queue-timeout", _positive, "seconds a request may wait for a free replica"),
        ("--stream-idle-timeout", _positive, "seconds a stream may send nothing"),
        ("--header-timeout", _positive, "seconds for a request head to arrive"),
        ("--body-timeout", _positive, "seconds a request body may pause"),
        ("--max-replicas", _whole, "replicas the registry holds at most"),
        ("--register-rate", _positive, "registrations a second per client address"),
        ("--register-burst", _whole, "registrations at once per client address"),
    ):
        default = getattr(defaults, flag[2:].replace("-", "_"))
        parser.add_argument(flag, type=kind, default=default, help=f"{help_text} ({default})")
    parser.add_argument(
        "--token",
        default=defaults.token,
        help="bearer token for registration and object writes (default: $ANYSERVE_TOKEN; "
        "prefer the variable: a command line is visible to other users)",
    )
    parser.add_argument(
        "--auth",
        default=defaults.auth,
        choices=["writes", "all"],
        help="what the token guards: registration and object writes, or every route",
    )
    parser.add_argument(
        "--log-level", default=defaults.log_level, choices=list(_LOG_LEVELS), help="verbosity"
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve KServe v2 gRPC (GRPCInferenceService) on this port (off)",
    )
    return ApiServerConfig(**vars(parser.parse_args(argv)))


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def main(argv: Sequence[str] | None = None, prog: str = "python -m anyserve.api_server") -> None:
    """``python -m anyserve.api_server [--host H] [--port P] ...``."""
    run(parse_args(argv, prog))


if __name__ == "__main__":
    main()
