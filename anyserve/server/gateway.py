"""The gateway: replica choice, gRPC channels, retries, streams and their ends (no HTTP here)."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import (
    Awaitable,
    Callable,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import grpc
import grpc.aio

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.capability import format_query
from anyserve.defaults import (
    MAX_MESSAGE_BYTES,
    max_message_bytes,
)
from anyserve.errors import (
    AnyServeError,
    ClientGone,
    DeadlineExceeded,
    HandlerError,
    Unavailable,
    from_grpc,
)
from anyserve.registry import (
    Choice,
    Overloaded,
    RateLimiter,
    Registry,
    ReplicaRecord,
    TooManyRegistrations,
)

if TYPE_CHECKING:
    from anyserve.objects import ObjectStore
from anyserve.server.config import ApiServerConfig
from anyserve.server.routing import Routing

log = logging.getLogger("anyserve.api_server")
#: How often leases are checked; well below any sensible TTL.
EVICT_EVERY = 0.5

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
        """Cancel the call on the API server's behalf; the client is told ``reason``.

        The replica slot is released here and now, not when the relay finishes: the
        relay may still be blocked writing to a client that does not read, and the slot
        must not wait for it (the relay's own finish then counts for nothing). A stream
        ended for shutdown counts as a success, one ended as idle as a failure, as the
        relay would have settled them.
        """
        if self.ended_by is None:
            self.ended_by = reason
        self.finish(self.shutting_down)

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
        """Cancel every open stream's gRPC call; each ends with an error event. How many."""
        ending = list(self._open)
        for stream in ending:
            stream.shutting_down = True
            stream.end(_SHUTTING_DOWN)
        return len(ending)

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


# --------------------------------------------------------------------------- the gateway


@dataclass(frozen=True)
class Admission:
    """A slot taken on a replica before the request's body was read (:meth:`Gateway.admit`)."""

    choice: Choice
    #: ``time.perf_counter()`` by which the request must be answered; the wait for the slot
    #: and reading the body count against the request's timeout.
    deadline: float


class Gateway:
    """The API server's state and the request path: registry, channels, streams, store."""

    def __init__(self, config: ApiServerConfig, registry: Registry | None = None) -> None:
        self.config = config
        #: The gRPC message limit both ways, from the configured body limit.
        self.max_message = max_message_bytes(config.max_body_size)
        #: Sent on every call to a replica: a replica whose port follows ``--auth all``
        #: requires the token (replica.py), and the API server is who it trusts.
        self.replica_auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )
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

    async def _take(
        self,
        routing: Routing,
        stream: bool,
        exclude: list[str],
        deadline: float,
        admission: Admission | None,
    ) -> Choice:
        """The slot ``admission`` took, else the least-loaded matching replica's, else the
        first that frees while the request waits in the queue."""
        if admission is not None:
            return admission.choice
        choice = self.registry.try_acquire(routing.query, stream, exclude)
        if choice is None:  # every matching replica is at its limit: wait for a slot
            choice = await self._wait(routing, stream, exclude, deadline)
        return choice

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

    # Admission ---------------------------------------------------------------------------

    async def admit(self, routing: Routing, stream: bool = False) -> Admission:
        """Take a slot on a matching replica, waiting in the queue if need be, before the
        body is read: a request that is refused (404, 503) costs no body, and bodies being
        parsed at once are bounded by the replicas' concurrency.

        Hand the admission to :meth:`infer` or :meth:`start_stream`, or give it back with
        :meth:`withdraw` (the body was malformed, the client left).
        """
        timeout = routing.timeout if routing.timeout_given or not stream else None
        deadline = time.perf_counter() + timeout if timeout is not None else math.inf
        choice = self.registry.try_acquire(routing.query, stream, routing.visited)
        if choice is None:  # every matching replica is at its limit: wait for a slot
            choice = await self._wait(routing, stream, routing.visited, deadline)
        return Admission(choice, deadline)

    def withdraw(self, admission: Admission) -> None:
        """Give back an admission's slot: its request is not sent."""
        self.registry.release(admission.choice)

    # Unary -----------------------------------------------------------------------------

    async def infer(
        self,
        request: pb.ModelInferRequest,
        routing: Routing,
        admission: Admission | None = None,
    ) -> tuple[pb.ModelInferResponse, Choice]:
        """Send ``request`` to the least-loaded usable matching replica; its reply and the choice.

        When every such replica is at its limit the request waits for a slot (bounded queue,
        queue timeout). A replica that cannot be reached, or that drops the connection
        before answering, is ejected and the request goes once to another; the request's
        deadline covers the wait, every attempt and the pause between them. With an
        ``admission`` (see :meth:`admit`) the first attempt goes to its replica.
        """
        if admission is None:
            deadline = time.perf_counter() + routing.timeout
        else:
            deadline = admission.deadline
        exclude = routing.visited
        retried = False
        try:
            while True:
                choice = await self._take(routing, False, exclude, deadline, admission)
                admission = None  # a retry takes a slot of its own
                stub = self.channels.stub(choice.endpoint)
                sent = time.perf_counter()
                ok = False
                try:
                    reply = await stub.ModelInfer(
                        request,
                        metadata=routing.metadata(choice, self.replica_auth),
                        timeout=deadline - sent,
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

    async def start_stream(
        self,
        request: pb.ModelInferRequest,
        routing: Routing,
        client_gone: Callable[[], Awaitable[None]],
        admission: Admission | None = None,
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
        with ``finish`` (errors: :meth:`relay_error`). With an ``admission`` (see
        :meth:`admit`) the first attempt goes to its replica.
        """
        timeout = routing.timeout if routing.timeout_given else None
        if admission is None:
            deadline = time.perf_counter() + timeout if timeout is not None else math.inf
        else:
            deadline = admission.deadline
        exclude = routing.visited
        retried = False
        try:
            while True:
                choice = await self._take(routing, True, exclude, deadline, admission)
                admission = None  # a retry takes a slot of its own
                stub = self.channels.stub(choice.endpoint)
                left = None if timeout is None else deadline - time.perf_counter()
                call = stub.ModelStreamInfer(
                    request, metadata=routing.metadata(choice, self.replica_auth), timeout=left
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
                    if stream.ended_by is not None and not task_cancelling():
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

    def end_of_relay(
        self,
        stream: OpenStream,
        exc: BaseException,
        timeout: float,
        ok: bool,
        client_left: bool = False,
    ) -> tuple[bool, AnyServeError | None] | None:
        """How a relay (SSE or the gRPC ingress) ends when reading ``stream`` raised ``exc``
        (a gRPC error or a cancellation), after ``ok`` so far: whether the stream counts as
        a success, and the error to tell the client (None: nobody to tell). None when
        ``exc`` is the relay's own task being cancelled: the caller re-raises it.

        The one place that says who ended a stream: the client (it left; ``client_left``),
        the API server (idle timeout, shutdown: ``stream.ended_by``) or the replica.
        """
        if isinstance(exc, grpc.aio.AioRpcError):
            if client_left:
                return True, None
            return stream.shutting_down, self.relay_error(stream, exc, timeout)
        if client_left:
            return ok, None  # nobody is left to tell
        if stream.ended_by is not None and not task_cancelling():
            # The API server ended the call (idle, shutdown): tell the client, then end.
            return stream.shutting_down, stream.ended_by
        return None

    # Objects ---------------------------------------------------------------------------

    async def objects(self) -> ObjectStore:
        """The object store, opened on first use (its directory checks do I/O)."""
        if self._store is None:
            from anyserve.objects import ObjectStore

            self._store = await anyio.to_thread.run_sync(ObjectStore, self.config.object_store)
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


def task_cancelling() -> bool:
    """Whether the current task itself is being cancelled (not just a call inside it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


# --------------------------------------------------------------------------- helpers for routes


async def evict_forever(gateway: Gateway) -> None:
    """Expire leases and end idle streams, twice a second."""
    while True:
        await asyncio.sleep(EVICT_EVERY)
        try:
            gateway.forget_gone()
            gateway.streams.end_idle(gateway.config.stream_idle_timeout)
        except Exception:  # never let a bug stop eviction
            log.exception("lease sweep failed")


async def check_health_forever(gateway: Gateway) -> None:
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
