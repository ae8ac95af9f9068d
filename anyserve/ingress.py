"""The API server's gRPC ingress: KServe v2 ``GRPCInferenceService`` in front of the replicas.

With ``--grpc-port`` the API server also serves the replicas' own gRPC service, so a gRPC
client (Triton's, KServe's) needs only the API server's address. ``ModelInfer`` and
``ModelStreamInfer`` take the HTTP routes' path through the same
:class:`~anyserve.server.gateway.Gateway`: ``model_name`` is the capability ``type``,
``model_version`` its ``model``, and ``x-capability-<key>`` metadata adds further keys.
So they share the per-replica ``max_in_flight`` limit and the bounded queue, failover with
back-off and the retry budget, passive ejection and the stream idle timeout. ``x-request-id``
metadata is passed on (or generated); the client's deadline is the request's. Health and
metadata RPCs are answered from the registry, as on the KServe v2 REST routes.

The API server's token guards each RPC as it guards the HTTP route answering the same
question (``ModelInfer`` as ``POST /v2/models/{name}/infer``): with ``--auth all`` every RPC
but ``ServerLive`` needs ``authorization: Bearer <token>`` metadata, else
``UNAUTHENTICATED``. Messages are limited to ``--max-body-size`` (plus the protobuf framing
the HTTP routes add too); a larger one is ``RESOURCE_EXHAUSTED``. An error that says when
to retry (every ``UNAVAILABLE``) carries ``retry-after`` trailing metadata, in seconds.

A request that sends its tensors in ``raw_input_contents`` gets its outputs in
``raw_output_contents`` (Triton's clients read them from there).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from anyserve import __version__
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.capability import format_query, query_from_metadata
from anyserve.credentials import bearer
from anyserve.defaults import max_message_bytes
from anyserve.errors import (
    AnyServeError,
    NoMatchingCapability,
    Unauthorized,
    Unavailable,
    grpc_code,
    trailing_metadata,
)
from anyserve.kserve import declared_tensors, model_versions, serving, unknown_model
from anyserve.server.auth import Guard
from anyserve.server.gateway import Gateway
from anyserve.server.routing import Routing, request_id_for
from anyserve.v2codec import EXTENSIONS, with_raw_outputs

if TYPE_CHECKING:
    from typing import TypeAlias

    from anyserve.server.config import ApiServerConfig

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

__all__ = ["HTTP_EQUIVALENT", "Ingress", "TokenCheck", "start"]

log = logging.getLogger("anyserve.ingress")

_NO_CAPABILITY = (
    "say which model to call: set model_name (the capability type) or x-capability-<key> metadata"
)
# The RPCs to suggest when x-capability-stream disagrees with the RPC: (unary, stream).
_ROUTES = ("ModelInfer", "ModelStreamInfer")

#: The HTTP route (method, path) answering what each RPC answers: an RPC needs the token
#: exactly when that route does (see ``anyserve.server.auth.Guard``).
HTTP_EQUIVALENT: dict[str, tuple[str, str]] = {
    "ServerLive": ("GET", "/v2/health/live"),
    "ServerReady": ("GET", "/v2/health/ready"),
    "ServerMetadata": ("GET", "/v2"),
    "ModelReady": ("GET", "/v2/models/{name}/ready"),
    "ModelMetadata": ("GET", "/v2/models/{name}"),
    "ModelInfer": ("POST", "/v2/models/{name}/infer"),
    "ModelStreamInfer": ("POST", "/infer/stream"),
}


def _metadata(context: Context) -> dict[str, str]:
    """The request's text metadata (``-bin`` keys, which carry bytes, are left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


async def _never() -> None:
    """The ``client_gone`` of a gRPC stream: gRPC cancels the RPC's task when its client
    goes away, so there is nothing else to watch for."""
    await asyncio.Event().wait()


def grpc_query(
    name: str, version: str, metadata: Mapping[str, str], stream: bool = False
) -> dict[str, str]:
    """The query by :mod:`anyserve.capability`'s rule: ``model_name`` and
    ``model_version`` are the v2 path's name and version, ``x-capability-*`` the headers."""
    path = {"type": name} if name else {}
    if version:
        path["model"] = version
    return query_from_metadata(
        metadata.items(), stream=stream, missing=_NO_CAPABILITY, path=path, routes=_ROUTES
    )


class TokenCheck:
    """Which RPCs need the API server's bearer token, and whether a request carries it."""

    def __init__(self, config: ApiServerConfig) -> None:
        self._token = config.token.encode() if config.token else None
        self._guard = Guard(config)

    def needs_token(self, rpc: str) -> bool:
        """Whether ``rpc`` needs the token: when its HTTP equivalent does."""
        if self._token is None:
            return False
        method, path = HTTP_EQUIVALENT[rpc]
        return self._guard.needs_token(method, path)

    def check(self, rpc: str, metadata: Mapping[str, str]) -> None:
        """:class:`Unauthorized` unless ``rpc`` is open or ``metadata`` carries the token."""
        if self._token is None or not self.needs_token(rpc):
            return
        presented = bearer(metadata.get("authorization"))
        if not presented:
            raise Unauthorized(
                f"{rpc} needs the API server's token: send the metadata "
                "'authorization: Bearer <token>' (ANYSERVE_TOKEN)"
            )
        # compare_digest: the time taken says nothing about how much of a guess was right.
        if not hmac.compare_digest(presented, self._token):
            raise Unauthorized("the bearer token is not this API server's")


class Ingress(pbg.GRPCInferenceServiceServicer):
    """The seven KServe v2 RPCs, answered through the gateway and its registry."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.tokens = TokenCheck(gateway.config)

    # Routing ----------------------------------------------------------------------------

    def _routing(self, rpc: str, request: pb.ModelInferRequest, context: Context) -> Routing:
        """Check the token, then read where the request may go and its deadline."""
        metadata = _metadata(context)
        request_id = request_id_for(metadata.get("x-request-id"))
        try:
            self.tokens.check(rpc, metadata)
            query = grpc_query(
                request.model_name, request.model_version, metadata, rpc == "ModelStreamInfer"
            )
        except AnyServeError as exc:
            log.info("grpc %s %s -> %d %s", request_id, rpc, exc.status, exc.message)
            raise
        remaining = context.time_remaining()
        return Routing(
            query=query,
            request_id=request_id,
            # The client's deadline, when it set one, else the API server's default.
            timeout=self.gateway.config.request_timeout
            if remaining is None
            else max(remaining, 1e-3),
            visited=[],
            depth=0,
            timeout_given=remaining is not None,
        )

    async def _check(self, rpc: str, context: Context) -> dict[str, str]:
        """The metadata of a health or metadata RPC, once its token was checked."""
        metadata = _metadata(context)
        try:
            self.tokens.check(rpc, metadata)
        except AnyServeError as exc:
            await self._abort(context, exc)
        return metadata

    @staticmethod
    async def _abort(context: Context, exc: AnyServeError) -> NoReturn:
        await context.abort(grpc_code(exc), exc.message, trailing_metadata(exc))
        raise AssertionError("grpc.aio's abort always raises")  # (untyped: tell mypy so)

    def _log(self, rpc: str, routing: Routing, replica: str, outcome: str, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000
        log.info(
            "grpc %s %s [%s] -> %s %s %.1fms",
            routing.request_id,
            rpc,
            format_query(routing.query),
            replica or "-",
            outcome,
            ms,
        )

    # Health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Context) -> pb.ServerLiveResponse:
        await self._check("ServerLive", context)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> pb.ServerReadyResponse:
        await self._check("ServerReady", context)
        return pb.ServerReadyResponse(ready=len(self.gateway.registry) > 0)

    async def ServerMetadata(self, request: Any, context: Context) -> pb.ServerMetadataResponse:
        await self._check("ServerMetadata", context)
        return pb.ServerMetadataResponse(
            name="anyserve", version=__version__, extensions=EXTENSIONS
        )

    def _matching(
        self, request: Any, metadata: Mapping[str, str]
    ) -> tuple[dict[str, str], list[Any]]:
        query = grpc_query(request.name, request.version, metadata)
        return query, list(serving(self.gateway.registry, query))

    async def ModelReady(self, request: Any, context: Context) -> pb.ModelReadyResponse:
        metadata = await self._check("ModelReady", context)
        try:
            _, found = self._matching(request, metadata)
        except AnyServeError:
            found = []
        return pb.ModelReadyResponse(ready=bool(found))

    async def ModelMetadata(self, request: Any, context: Context) -> pb.ModelMetadataResponse:
        metadata = await self._check("ModelMetadata", context)
        try:
            query, found = self._matching(request, metadata)
            if not found:
                raise NoMatchingCapability(self.gateway.registry.describe_miss(query, stream=False))
        except AnyServeError as exc:
            await self._abort(context, unknown_model(request.name, exc))
        versions = [request.version] if request.version else model_versions(found)
        reply = pb.ModelMetadataResponse(name=request.name, versions=versions, platform="anyserve")
        tensors = declared_tensors(found)
        for t in tensors["inputs"]:
            reply.inputs.add(**t)
        for t in tensors["outputs"]:
            reply.outputs.add(**t)
        return reply

    # Inference --------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        routing: Routing | None = None
        try:
            routing = self._routing("ModelInfer", request, context)
            reply, choice = await self.gateway.infer(request, routing)
            if request.raw_input_contents:
                reply = with_raw_outputs(reply)
        except AnyServeError as exc:
            if routing is not None:
                self._log("ModelInfer", routing, "", str(exc.status), started)
            await self._abort(context, unknown_model(request.model_name, exc))
        self._log("ModelInfer", routing, choice.replica_id, "ok", started)
        await context.send_initial_metadata((("x-anyserve-replica", choice.replica_id),))
        if not reply.model_name:
            reply.model_name = request.model_name
        if not reply.model_version:
            reply.model_version = request.model_version or choice.capability.match_keys.get(
                "model", ""
            )
        return reply

    async def ModelStreamInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Relay a stream started by :meth:`Gateway.start_stream
        <anyserve.server.gateway.Gateway.start_stream>`; a failure once a message was relayed
        ends it with an error status (it is never replayed)."""
        started = time.perf_counter()
        gateway = self.gateway
        routing: Routing | None = None
        try:
            routing = self._routing("ModelStreamInfer", request, context)
            stream, message = await gateway.start_stream(request, routing, _never)
        except AnyServeError as exc:
            if routing is not None:
                self._log("ModelStreamInfer", routing, "", str(exc.status), started)
            await self._abort(context, unknown_model(request.model_name, exc))
        replica = stream.choice.replica_id
        raw = bool(request.raw_input_contents)
        sent = 0
        ok = True
        error: AnyServeError | None = None
        try:
            await context.send_initial_metadata((("x-anyserve-replica", replica),))
            while message is not grpc.aio.EOF:
                if message.error_message:
                    ok = False
                elif raw and message.HasField("infer_response"):
                    message.infer_response.CopyFrom(with_raw_outputs(message.infer_response))
                yield message
                sent += 1
                message = await stream.call.read()
                stream.last_message = time.monotonic()
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            # A client that goes away cancels this task (gRPC does): end_of_relay says
            # re-raise then, as nobody is left to tell.
            ended = gateway.end_of_relay(stream, exc, routing.timeout, ok)
            if ended is None:
                raise
            ok, error = ended
        except AnyServeError as exc:  # a reply that cannot be made raw
            ok = False
            error = exc
        finally:
            stream.finish(ok)
        if error is not None:
            self._log("ModelStreamInfer", routing, replica, str(error.status), started)
            await self._abort(context, error)
        self._log("ModelStreamInfer", routing, replica, f"ok {sent} msg", started)


async def start(gateway: Gateway, host: str, port: int) -> grpc.aio.Server:
    """Serve the ingress on ``host:port`` (0: a free port); the started server.

    Messages may be as large as the HTTP routes' bodies (``max_body_size``) plus the
    protobuf framing, the limit of the channels to the replicas too. Raises
    :class:`~anyserve.errors.Unavailable` when the port cannot be bound.
    """
    max_message = max_message_bytes(gateway.config.max_body_size)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
    )
    pbg.add_GRPCInferenceServiceServicer_to_server(Ingress(gateway), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise Unavailable(
            f"cannot serve gRPC on {address}: the port is in use or the address is not "
            "available; choose another --grpc-port"
        )
    await server.start()
    log.info("gRPC ingress (KServe v2 GRPCInferenceService) on %s:%d", host, bound)
    return server
