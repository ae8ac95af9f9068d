"""The API server's gRPC ingress: KServe v2 ``GRPCInferenceService`` in front of the replicas.

With ``--grpc-port`` the API server also serves the replicas' own gRPC service, so a gRPC
client (Triton's, KServe's) needs only the API server's address. ``ModelInfer`` and
``ModelStreamInfer`` are routed like the HTTP routes, through the same
:class:`~anyserve.api_server.Gateway`: ``model_name`` is the capability ``type``,
``model_version`` its ``model``, and ``x-capability-<key>`` metadata adds further keys.
``x-request-id`` metadata is passed on (or generated). Health and metadata RPCs are
answered from the registry, as on the KServe v2 REST routes.

A request that sends its tensors in ``raw_input_contents`` gets its outputs in
``raw_output_contents`` (Triton's clients read them from there).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from anyserve import __version__
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.errors import AnyServeError, BadRequest, NotFound, Unavailable
from anyserve.kserve import EXTENSIONS, model_versions, serving, with_raw_outputs
from anyserve.registry import format_query

if TYPE_CHECKING:
    from anyserve.api_server import Gateway, Routing

__all__ = ["Ingress", "start"]

log = logging.getLogger("anyserve.ingress")

_CAPABILITY_PREFIX = "x-capability-"


def _request_id(metadata: dict[str, str]) -> str:
    given = metadata.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable() and " " not in given:
        return given
    return secrets.token_hex(8)


class Ingress(pbg.GRPCInferenceServiceServicer):
    """The seven KServe v2 RPCs, answered through the gateway and its registry."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    # Routing ----------------------------------------------------------------------------

    def _query(self, name: str, version: str, metadata: dict[str, str]) -> dict[str, str]:
        query = {"type": name} if name else {}
        if version:
            query["model"] = version
        for key, value in metadata.items():
            if key.startswith(_CAPABILITY_PREFIX) and len(key) > len(_CAPABILITY_PREFIX):
                attr = key[len(_CAPABILITY_PREFIX) :].replace("-", "_")
                if attr not in query and value.strip():
                    query[attr] = value.strip()
        if not query:
            raise BadRequest(
                "say which model to call: set model_name (the capability type) or "
                "x-capability-<key> metadata"
            )
        return query

    def _routing(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Routing:
        from anyserve.api_server import Routing

        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        remaining = context.time_remaining()
        timeout = self.gateway.config.request_timeout
        if remaining is not None and 0 < remaining < timeout * 10:
            timeout = remaining  # the client's own deadline
        return Routing(
            query=self._query(request.model_name, request.model_version, metadata),
            request_id=_request_id(metadata),
            timeout=timeout,
            visited=[],
            depth=0,
        )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: AnyServeError) -> None:
        from anyserve.replica import grpc_code

        await context.abort(grpc_code(exc), exc.message)

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

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=len(self.gateway.registry) > 0)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="anyserve", version=__version__, extensions=EXTENSIONS
        )

    def _matching(self, request: Any, context: Any) -> tuple[dict[str, str], list[Any]]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        query = self._query(request.name, request.version, metadata)
        return query, list(serving(self.gateway.registry, query))

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            _, found = self._matching(request, context)
        except AnyServeError:
            found = []
        return pb.ModelReadyResponse(ready=bool(found))

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        try:
            query, found = self._matching(request, context)
            if not found:
                raise NotFound(self.gateway.registry.describe_miss(query, stream=False))
        except AnyServeError as exc:
            await self._abort(context, exc)
        versions = [request.version] if request.version else model_versions(found)
        return pb.ModelMetadataResponse(name=request.name, versions=versions, platform="anyserve")

    # Inference --------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        routing: Routing | None = None
        try:
            routing = self._routing(request, context)
            reply, choice = await self.gateway.infer(request, routing)
            if request.raw_input_contents:
                reply = with_raw_outputs(reply)
        except AnyServeError as exc:
            if routing is not None:
                self._log("ModelInfer", routing, "", str(exc.status), started)
            await self._abort(context, exc)
            raise  # abort raises; this is for the type checker
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
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        from anyserve.api_server import OpenStream, _translate

        started = time.perf_counter()
        gateway = self.gateway
        try:
            routing = self._routing(request, context)
        except AnyServeError as exc:
            await self._abort(context, exc)
            return
        exclude = list(routing.visited)
        raw = bool(request.raw_input_contents)
        while True:
            try:
                choice = gateway.registry.choose(routing.query, stream=True, exclude=exclude)
            except AnyServeError as exc:
                self._log("ModelStreamInfer", routing, "", str(exc.status), started)
                await self._abort(context, exc)
                return
            gateway.registry.begin(choice)
            call = gateway.channels.stub(choice.endpoint).ModelStreamInfer(
                request, metadata=routing.metadata(choice), timeout=routing.timeout
            )
            stream = OpenStream(call, choice, gateway)
            gateway.streams.add(stream)
            sent = 0
            ok = False
            try:
                async for message in call:
                    if raw and message.HasField("infer_response"):
                        message.infer_response.CopyFrom(with_raw_outputs(message.infer_response))
                    sent += 1
                    yield message
                ok = True
            except asyncio.CancelledError:
                ok = True  # the client went away (or shutdown ended the call): not an error
                raise
            except (grpc.aio.AioRpcError, AnyServeError) as exc:
                stream.finish(ok=False)
                if isinstance(exc, AnyServeError):  # a reply that cannot be made raw
                    error: AnyServeError = exc
                elif not sent and gateway._retry(exc, choice, routing, exclude, stream=True):
                    continue
                elif stream.shutting_down:
                    error = Unavailable("the API server is shutting down; retry the request")
                else:
                    error = _translate(exc, choice, routing.timeout)
                self._log(
                    "ModelStreamInfer", routing, choice.replica_id, str(error.status), started
                )
                await self._abort(context, error)
                return
            finally:
                stream.finish(ok)
            self._log("ModelStreamInfer", routing, choice.replica_id, f"ok {sent} msg", started)
            return


async def start(gateway: Gateway, host: str, port: int) -> grpc.aio.Server:
    """Serve the ingress on ``host:port`` (0: a free port); the started server.

    Raises :class:`~anyserve.errors.Unavailable` when the port cannot be bound.
    """
    from anyserve.api_server import MAX_MESSAGE_BYTES

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
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
