"""The seed HTTP routes: registration, stats, the infer routes and objects."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
)
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
import anyio.to_thread
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from anyserve import kserve, openapi
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from anyserve.objects import ObjRef
from anyserve.server.gateway import Admission, Gateway
from anyserve.server.metrics import metrics
from anyserve.server.replies import gateway_of, json_reply
from anyserve.server.routing import Routing, note, routing_headers
from anyserve.server.sse import EventStreamResponse, disconnected

log = logging.getLogger("anyserve.api_server")
#: Bytes per read when streaming an object out; each read is a round trip to a worker
#: thread. 256 KiB gave 850 MiB/s for a 64 MiB object from the page cache at 48 ms of API
#: server CPU, 1 MiB 1,000 MiB/s at 37 ms (2 shared cores); larger reads gained nothing
#: more, nor did reading the next chunk while writing the last (the socket is the limit).
DOWNLOAD_CHUNK = 1024 * 1024
#: Uploads written at once, each from a thread of its own (see ``_upload_threads``); the
#: next one waits for a thread, its body unread.
UPLOAD_THREADS = 64
_PROTOBUF = "application/x-protobuf"


async def _json_body(request: Request) -> Any:
    from anyserve.tensors import loads

    body = await request.body()
    if not body:
        raise BadRequest("the request body is empty; send a JSON object")
    return loads(body)


# --------------------------------------------------------------------------- routes


async def health(request: Request) -> Response:
    """``GET /health``."""
    return json_reply({"status": "healthy"})


async def register(request: Request) -> Response:
    """``POST /register``: add or replace a replica's record (docs/protocol.md).

    Rate-limited per client address (429 with Retry-After), refused when the registry is
    full (507) or, without a token, for an endpoint not on this machine (403).
    """
    gateway = gateway_of(request)
    gateway.admit_registration(_client(request))
    record = gateway.registry.register(await _json_body(request), trusted=_trusted(gateway))
    gateway.channels.retain(gateway.registry.endpoints())
    log.info(
        "registered replica %s at %s: %s",
        record.replica_id,
        record.endpoint,
        "; ".join(str(c) for c in record.capabilities) or "no capabilities",
    )
    return json_reply(_lease_reply(gateway, record.replica_id))


async def heartbeat(request: Request) -> Response:
    """``POST /heartbeat``: renew a lease; an unknown id registers again (see Registry)."""
    gateway = gateway_of(request)
    body = await _json_body(request)
    if not (isinstance(body, dict) and gateway.registry.known(body.get("replica_id"))):
        gateway.admit_registration(_client(request))  # it registers: rate-limited alike
    record, registered = gateway.registry.heartbeat(body, trusted=_trusted(gateway))
    if registered:
        gateway.channels.retain(gateway.registry.endpoints())
        log.info(
            "re-registered replica %s at %s from its heartbeat", record.replica_id, record.endpoint
        )
    return json_reply({**_lease_reply(gateway, record.replica_id), "registered": registered})


async def unregister(request: Request) -> Response:
    """``DELETE /unregister`` (or ``POST``): remove a record, only by its owning instance."""
    gateway = gateway_of(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"replica_id": ..., "instance": ...}')
    record = gateway.registry.unregister(
        body.get("replica_id"), body.get("instance"), trusted=_trusted(gateway)
    )
    if record is None:
        raise NotFound(f"no replica {body.get('replica_id')!r} is registered (see /registry)")
    gateway.channels.retain(gateway.registry.endpoints())
    log.info("unregistered replica %s at %s", record.replica_id, record.endpoint)
    return json_reply({"success": True, "replica_id": record.replica_id})


def _trusted(gateway: Gateway) -> bool:
    """Whether the caller holds the token: with one configured, the guard let no control
    request through without it. Registry ownership trusts token holders (Registry docs)."""
    return bool(gateway.config.token)


def _client(request: Request) -> str:
    """The registration rate limiter's key for the caller: every loopback address is one
    client (each of 127.0.0.0/8 would otherwise get a bucket of its own), and an IPv6
    client is its /64, the block one host is usually given."""
    host = request.client.host if request.client is not None else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_loopback:
        return "loopback"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    return host


def _lease_reply(gateway: Gateway, replica_id: str) -> dict[str, Any]:
    return {
        "success": True,
        "replica_id": replica_id,
        "lease_ttl": gateway.config.lease_ttl,
        "heartbeat_interval": gateway.config.heartbeat_interval,
    }


async def registry(request: Request) -> Response:
    """``GET /registry``: every live replica with its state and load."""
    replicas = gateway_of(request).registry.snapshot()
    return json_reply({"replicas": replicas, "total": len(replicas)})


async def stats(request: Request) -> Response:
    """``GET /stats``: totals since start and per-replica load (the dashboard reads this)."""
    gateway = gateway_of(request)
    replicas = gateway.registry.snapshot()
    return json_reply(
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


async def _read_body(request: Request) -> bytearray:
    """The request body in one buffer, which the caller alone holds.

    ``Request.body()`` joins a list of chunks (twice the body at its peak) and keeps the
    result for the request's whole life; this grows one buffer in place and lets it go as
    soon as it is parsed.
    """
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def _parse_input(body: bytearray, protobuf: bool) -> pb.ModelInferRequest:
    """The request message from its body (serialized protobuf or the seed's JSON)."""
    from google.protobuf.message import DecodeError

    from anyserve.tensors import loads_request

    if not protobuf:
        if not body:
            raise BadRequest("the request body is empty; send a JSON object")
        return loads_request(body)
    try:
        return pb.ModelInferRequest.FromString(body)
    except DecodeError as exc:
        raise BadRequest(f"the body is not a serialized ModelInferRequest: {exc}") from None


async def _infer_input(
    request: Request, protobuf: bool, stream: bool = False
) -> tuple[Routing, Admission, pb.ModelInferRequest]:
    """The routing headers, a slot on a replica and the request message.

    The slot is taken before a byte of the body is read: a request nobody serves (404) or
    that the queue refuses (503) is answered without reading its body, and the bodies held
    at once are bounded by the replicas' concurrency and the queue, not by the clients.
    """
    gateway = gateway_of(request)
    routing = Routing.from_request(request, gateway.config.request_timeout, stream)
    note(request, routing)
    admission = await gateway.admit(routing, stream)
    try:
        return routing, admission, _parse_input(await _read_body(request), protobuf)
    except BaseException:
        gateway.withdraw(admission)
        raise


async def infer_protobuf(request: Request) -> Response:
    """``POST /infer``: a serialized ``ModelInferRequest`` in, ``ModelInferResponse`` out."""
    routing, admission, message = await _infer_input(request, protobuf=True)
    reply, choice = await gateway_of(request).infer(message, routing, admission)
    note(request, routing, choice)
    headers = routing_headers(choice)
    return Response(reply.SerializeToString(), media_type=_PROTOBUF, headers=headers)


async def infer_json(request: Request) -> Response:
    """``POST /infer/json``: the seed's JSON request and reply shapes."""
    from anyserve.tensors import response_to_json

    routing, admission, message = await _infer_input(request, protobuf=False)
    reply, choice = await gateway_of(request).infer(message, routing, admission)
    note(request, routing, choice)
    return json_reply(response_to_json(reply), headers=routing_headers(choice))


async def infer_stream(request: Request) -> EventStreamResponse:
    """``POST /infer/stream``: one ``data: <json>`` SSE event per message from the handler.

    The body is the seed's JSON, or a serialized ``ModelInferRequest`` when sent as
    ``application/x-protobuf``.
    """
    protobuf = request.headers.get("content-type", "").startswith(_PROTOBUF)
    routing, admission, message = await _infer_input(request, protobuf, stream=True)
    client_gone = partial(disconnected, request.receive)
    gateway = gateway_of(request)
    stream, first = await gateway.start_stream(message, routing, client_gone, admission)
    response = EventStreamResponse(gateway, stream, first, routing)
    note(request, routing, response.stream.choice)
    return response


async def list_objects(request: Request) -> Response:
    """``GET /objects``: every stored object's reference, oldest first."""
    store = await gateway_of(request).objects()
    refs = await run_in_threadpool(store.list)
    return json_reply({"objects": [r.to_dict() for r in refs], "total": len(refs)})


async def upload_object(request: Request) -> Response:
    """``POST /objects[?key=K][&type=json|bytes]``: store the body, streamed to disk."""
    gateway = gateway_of(request)
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
    write = partial(store.write_stream, _sync_chunks(request.stream()), key, content_type, limit)
    try:
        ref = await anyio.to_thread.run_sync(write, limiter=_upload_threads(request))
    except ClientDisconnect:
        raise BadRequest("the upload ended before its last byte; nothing was stored") from None
    log.info("stored object %s (%d bytes, %s)", ref.key, ref.size, ref.content_type)
    return json_reply(ref.to_dict(), status=201)


def _upload_threads(request: Request) -> anyio.CapacityLimiter:
    """The threads uploads are written from, apart from the shared worker threads.

    The store's writer pulls the body from its thread, so an upload holds its thread while
    it waits for the network, up to the body timeout when the client stalls. In the shared
    pool (40 threads) 40 slow uploads stopped every route that does file I/O; here they
    only make the next upload wait for a thread.
    """
    state = request.app.state
    limiter: anyio.CapacityLimiter | None = getattr(state, "upload_threads", None)
    if limiter is None:
        limiter = state.upload_threads = anyio.CapacityLimiter(UPLOAD_THREADS)
    return limiter


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

    store = await gateway_of(request).objects()
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

    store = await gateway_of(request).objects()
    key = request.path_params["key"]
    if not await run_in_threadpool(store.delete, key):
        raise ObjectNotFound(f"no object {key!r} (see GET /objects)")
    log.info("deleted object %s", key)
    return json_reply({"success": True, "key": key})


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
