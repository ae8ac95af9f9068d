"""What a handler gets besides its request: :class:`Context` and :class:`Stream`."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.capability import parse_capability
from anyserve.errors import (
    BadRequest,
    ObjectStoreError,
    StreamCancelled,
    StreamClosed,
    Unavailable,
)

if TYPE_CHECKING:
    from anyserve.objects import ObjectStore


#: How many messages a stream buffers between its handler and the gRPC writer ...
STREAM_BUFFER_MESSAGES = 64
#: ... and how many bytes: whichever fills first makes ``send`` wait for the client.
STREAM_BUFFER_BYTES = 8 * 1024 * 1024


class Sent:
    """What :meth:`Stream.send` returns: already done, and awaitable so that an ``async``
    handler may write ``await stream.send(...)`` as naturally as ``stream.send(...)``."""

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


_SENT = Sent()


class Stream:
    """The channel a stream handler sends its messages through.

    Thread-safe: the handler sends from its own thread while the replica's event loop
    (or any other thread iterating the stream) consumes. The buffer in between is
    bounded (``maxsize`` messages or ``max_bytes`` bytes, whichever fills first), and
    ``send`` blocks while it is full, so a slow client slows the producer instead of
    growing memory. This holds for ``async def`` handlers too: the replica runs each
    async stream handler on an event loop of its own, in a thread of its own, so a
    blocking ``send`` pauses only that handler (``await stream.send(...)`` works as
    well). When the client disconnects the stream is cancelled and the next ``send``
    raises :class:`StreamCancelled`.
    """

    def __init__(
        self, maxsize: int = STREAM_BUFFER_MESSAGES, max_bytes: int = STREAM_BUFFER_BYTES
    ) -> None:
        self._items: deque[tuple[pb.ModelStreamInferResponse, int]] = deque()
        self._cond = threading.Condition()
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0
        self._closed = False
        self._cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.sent = 0

    @property
    def closed(self) -> bool:
        """True once closed, ended with an error, or cancelled."""
        return self._closed

    @property
    def cancelled(self) -> bool:
        """True when the client went away."""
        return self._cancelled

    def send(self, message: pb.ModelStreamInferResponse | pb.ModelInferResponse) -> Sent:
        """Send one message (a ``ModelStreamInferResponse`` or a bare ``ModelInferResponse``).

        Blocks while the buffer is full; the result may be awaited but need not be.
        """
        if isinstance(message, pb.ModelInferResponse):
            message = pb.ModelStreamInferResponse(infer_response=message)
        elif not isinstance(message, pb.ModelStreamInferResponse):
            raise TypeError(
                f"stream.send takes a ModelStreamInferResponse or ModelInferResponse, "
                f"not {type(message).__name__}"
            )
        self._put(message)
        return _SENT

    def error(self, message: str) -> None:
        """End the stream with an error the client sees as ``{"error": message}``."""
        self._put(pb.ModelStreamInferResponse(error_message=message))
        self.close()

    def close(self) -> None:
        """End the stream; further sends raise :class:`StreamClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_locked()

    def cancel(self) -> None:
        """Called by the server when the client goes away; pending messages are dropped."""
        with self._cond:
            self._cancelled = True
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
            self._wake_locked()

    def _in_loop_thread(self) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _full_locked(self) -> bool:
        # One message always fits, however large, or it could never be sent.
        return bool(self._items) and (
            len(self._items) >= self._maxsize or self._bytes >= self._max_bytes
        )

    def _put(self, message: pb.ModelStreamInferResponse) -> None:
        size = message.ByteSize()
        with self._cond:
            # Sending from the consuming loop's own thread must not block: the loop that
            # would empty the buffer is the one waiting. Handlers never send from there.
            may_block = not self._in_loop_thread()
            while may_block and self._full_locked() and not self._closed:
                self._cond.wait(0.1)
            if self._cancelled:
                raise StreamCancelled("the client went away; stop generating")
            if self._closed:
                raise StreamClosed("send on a closed stream")
            self._items.append((message, size))
            self._bytes += size
            self.sent += 1
            self._cond.notify_all()
            self._wake_locked()

    def _wake_locked(self) -> None:
        waiter = self._waiter
        if waiter is None or self._loop is None:
            return
        self._waiter = None
        if self._in_loop_thread():
            if not waiter.done():
                waiter.set_result(None)
        else:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    # Consumers -------------------------------------------------------------

    def __iter__(self) -> Iterator[pb.ModelStreamInferResponse]:
        return self

    def __next__(self) -> pb.ModelStreamInferResponse:
        with self._cond:
            while not self._items:
                if self._closed:
                    raise StopIteration
                self._cond.wait()
            item, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return item

    async def messages(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Consume from an event loop without a thread hop per message."""
        self._loop = asyncio.get_running_loop()
        while True:
            item: pb.ModelStreamInferResponse | None = None
            with self._cond:
                if self._items:
                    item, size = self._items.popleft()
                    self._bytes -= size
                    self._cond.notify_all()
                elif self._closed:
                    return
                else:
                    waiter = self._loop.create_future()
                    self._waiter = waiter
            if item is not None:
                yield item
            else:
                await waiter


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Context:
    """Per-request facts and services a handler can use.

    ``objects`` is the shared object store, ``call``/``acall`` request another
    capability through the API server, and ``replica_id``, ``capability`` and
    ``request_id`` say where and what this request is.
    """

    def __init__(
        self,
        *,
        replica_id: str = "",
        capability: Mapping[str, Any] | None = None,
        request_id: str = "",
        objects: ObjectStore | None = None,
        api_server: str | None = None,
        delegation_depth: int = 0,
        caller: Any = None,
        authorization: str = "",
    ) -> None:
        self.replica_id = replica_id
        self.capability: dict[str, Any] = dict(capability or {})
        self.request_id = request_id
        self.api_server = api_server
        self.delegation_depth = delegation_depth
        #: The caller's ``authorization`` metadata, passed on when this request asks
        #: another capability: a caller gets through delegation only what it may ask for.
        self.authorization = authorization
        self._objects = objects
        self._caller = caller

    @property
    def objects(self) -> ObjectStore:
        """The object store shared by the replicas (``--object-store``)."""
        if self._objects is None:
            raise ObjectStoreError(
                "no object store is configured for this replica; start it with --object-store DIR"
            )
        return self._objects

    def _require_api(self) -> Any:
        if self._caller is None or not self.api_server:
            raise Unavailable(
                "context.call needs an API server; start the replica with --api-server URL"
            )
        return self._caller

    def call(
        self, capability: Mapping[str, Any] | str, inputs: Any, *, timeout: float | None = None
    ) -> pb.ModelInferResponse:
        """Run another capability through the API server and return its response.

        ``capability`` is a dict (``{"type": "embed"}``) or text (``"type=embed,model=x"``);
        ``inputs`` maps input names to text, bytes, numbers, lists or ``ObjRef``s
        (or is a ready ``ModelInferRequest``).
        """
        caller = self._require_api()
        return caller.call(parse_capability(capability), build_request(inputs), self, timeout)

    async def acall(
        self, capability: Mapping[str, Any] | str, inputs: Any, *, timeout: float | None = None
    ) -> pb.ModelInferResponse:
        """The ``async`` form of :meth:`call`, for ``async def`` handlers."""
        caller = self._require_api()
        return await caller.acall(
            parse_capability(capability), build_request(inputs), self, timeout
        )


def build_request(inputs: Any) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` from ``{name: value}`` (text, bytes, numbers, lists, ObjRefs)."""
    from anyserve.objects import ObjRef

    if isinstance(inputs, pb.ModelInferRequest):
        return inputs
    if not isinstance(inputs, Mapping):
        raise BadRequest("inputs must be a mapping of input name to value")
    request = pb.ModelInferRequest()
    for name, value in inputs.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        tensor = request.inputs.add(name=str(name))
        tensor.shape.append(len(values))
        contents = tensor.contents
        if all(isinstance(v, bool) for v in values):
            tensor.datatype = "BOOL"
            contents.bool_contents.extend(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            tensor.datatype = "INT64"
            contents.int64_contents.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            tensor.datatype = "FP32"
            contents.fp32_contents.extend(float(v) for v in values)
        elif all(isinstance(v, (str, bytes, ObjRef)) for v in values):
            tensor.datatype = "BYTES"
            contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in values
            )
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise BadRequest(
                f"input {name!r}: values must all be text/bytes/ObjRef, integers, numbers or "
                f"booleans, got {', '.join(kinds)}"
            )
    return request
