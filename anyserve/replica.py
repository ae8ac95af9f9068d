"""The replica process: one user app behind a KServe v2 gRPC server.

``run(config)`` loads the app (user code is imported here, inside the child), serves
it with grpc.aio, registers with the API server once serving, heartbeats, and on
SIGINT/SIGTERM unregisters, finishes in-flight requests within the grace period and
exits. Sync handlers run in a bounded thread pool so they never block the loop.

Who may call a replica's port: a replica must never let a caller do what the API server
in front of it would refuse. So it follows the API server's auth mode
(``ReplicaConfig.auth``, from ``$ANYSERVE_AUTH``, beside the token from ``$ANYSERVE_TOKEN``):

* ``"all"`` with a token: every RPC but the health probes ``ServerLive`` and
  ``ServerReady`` needs ``authorization: Bearer <token>`` metadata, else
  ``UNAUTHENTICATED``. The API server sends its token on each call to a replica.
* ``"writes"`` (the default) or no token: the port is open, as inference and metadata are
  open at the API server then; nothing a replica serves is a write.

A request a replica delegates (no handler here, or ``context.call``) goes to the API
server with the *caller's* ``authorization``, never the replica's own token, so whatever
the mode, delegation gets a caller nothing the API server would not give them directly.
The replica's token is for its own registration and heartbeats only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from anyserve import __version__
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.addresses import reachable_host
from anyserve.app import AnyServe, Handler
from anyserve.capability import headers_for, value_text
from anyserve.context import Context, Stream
from anyserve.credentials import bearer
from anyserve.defaults import (
    AUTH_MODE,
    AUTH_MODES,
    MAX_DELEGATION_DEPTH,
    MAX_IN_FLIGHT,
    MAX_MESSAGE_BYTES,
    OBJECT_STORE_PATH,
)
from anyserve.errors import (
    AnyServeError,
    AppLoadError,
    ConfigError,
    DelegationLoop,
    HandlerError,
    NotFound,
    StreamClosed,
    Unavailable,
    grpc_code,
)

log = logging.getLogger("anyserve.replica")

#: Seconds between registration attempts while the API server cannot be reached.
UNREACHABLE_RETRY = 0.25
#: The API server's auth mode, which the replica's port follows (set by ``up``).
ENV_AUTH = "ANYSERVE_AUTH"
#: The registration's ``instance`` secret, when the supervisor chose it (so that it can
#: unregister this replica as its owner); read from the environment, never from argv.
ENV_INSTANCE = "ANYSERVE_INSTANCE"


@dataclass(frozen=True)
class ReplicaConfig:
    """Everything a replica process needs, passed down from the CLI or the supervisor."""

    app: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_server: str | None = None
    object_store: Path | None = Path(OBJECT_STORE_PATH)
    replica_id: str | None = None
    allow_pickle: bool = False
    grace: float = 10.0
    workers: int = field(default_factory=lambda: min(32, (os.cpu_count() or 1) + 4))
    #: Requests the API server may have in flight on this replica at once (advertised).
    max_in_flight: int = MAX_IN_FLIGHT
    #: The gRPC message limit both ways: the API server's body limit plus framing slack.
    max_message_bytes: int = MAX_MESSAGE_BYTES
    token: str | None = field(default_factory=lambda: os.environ.get("ANYSERVE_TOKEN") or None)
    #: The API server's ``--auth`` mode, which this replica's port follows (module docs).
    auth: str = field(default_factory=lambda: os.environ.get(ENV_AUTH) or AUTH_MODE)
    #: The secret that makes this process the owner of its registration (see
    #: :meth:`Replica.register_and_heartbeat`); a fresh one unless ``up`` chose it.
    instance: str = field(
        default_factory=lambda: os.environ.get(ENV_INSTANCE) or secrets.token_hex(16),
        repr=False,
    )

    def to_argv(self) -> list[str]:
        """The arguments of ``anyserve replica`` that give this configuration back; the
        token, the auth mode and the instance travel in the environment instead (a command
        line is visible to every user), and ``workers`` has no option."""
        argv = [self.app, "--host", self.host, "--port", str(self.port)]
        if self.api_server is not None:
            argv += ["--api-server", self.api_server]
        if self.object_store is not None:
            argv += ["--object-store", str(self.object_store)]
        if self.replica_id is not None:
            argv += ["--replica-id", self.replica_id]
        if self.allow_pickle:
            argv.append("--allow-pickle")
        return [
            *argv,
            "--grace",
            repr(self.grace),
            "--max-in-flight",
            str(self.max_in_flight),
            "--max-message-size",
            str(self.max_message_bytes),
        ]

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(
                f"replica auth mode {self.auth!r} (ANYSERVE_AUTH): expected one of "
                f"{', '.join(AUTH_MODES)}"
            )


def load_app(ref: str) -> AnyServe:
    """Import ``module:attr`` (the current folder is importable, as with uvicorn)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"app {ref!r}: expected module:attribute, e.g. examples.app:app")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(
                f"cannot import module {module_name!r} (from {ref!r}): {exc}"
            ) from exc
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, AnyServe):
        raise AppLoadError(f"{ref} is a {type(obj).__name__}, not an AnyServe app")
    if not obj.handlers:
        raise AppLoadError(f"{ref} declares no capabilities (use @app.capability(...))")
    return obj


#: RPCs open even with ``auth = "all"``: health probes carry no credentials.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})


class TokenGate:
    """Which RPCs need the bearer token on this replica's port, and whether a call has it."""

    def __init__(self, token: str | None, auth: str) -> None:
        self._token = token.encode() if token else None
        self._all = auth == "all"

    def needs_token(self, rpc: str) -> bool:
        return self._token is not None and self._all and rpc not in OPEN_RPCS

    def refusal(self, rpc: str, metadata: Mapping[str, Any]) -> str | None:
        """Why ``rpc`` with this metadata is refused, or None to let it through."""
        if self._token is None or not self.needs_token(rpc):
            return None
        presented = bearer(metadata.get("authorization"))
        if presented is None:
            return (
                f"{rpc} needs the token on this replica: send "
                "'authorization: Bearer <token>' metadata (ANYSERVE_TOKEN)"
            )
        if not hmac.compare_digest(presented, self._token):
            return f"{rpc}: the bearer token is not this replica's"
        return None


class Delegator:
    """Forwards requests through the API server (delegation and ``Context.call``)."""

    def __init__(self, api_server: str, replica_id: str, token: str | None) -> None:
        import httpx

        self.api_server = api_server.rstrip("/")
        self.replica_id = replica_id
        try:  # the loop the async HTTP client belongs to (the replica's)
            self._home: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._home = None
        #: For registration and heartbeats only: forwarded requests carry the caller's.
        self.control_headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        self._async = httpx.AsyncClient(limits=limits, timeout=60.0)
        self._sync = httpx.Client(limits=limits, timeout=60.0)

    async def aclose(self) -> None:
        await self._async.aclose()
        self._sync.close()

    def _headers(
        self, query: Mapping[str, str], ctx: Context, visited: list[str], timeout: float | None
    ) -> dict[str, str]:
        headers = {
            "Content-Type": "application/x-protobuf",
            "X-Request-ID": ctx.request_id,
            "X-Delegation-Depth": str(ctx.delegation_depth + 1),
        }
        if ctx.authorization:
            headers["Authorization"] = ctx.authorization
        if visited:
            headers["X-Delegated-From"] = ",".join(visited)
        if timeout is not None:
            headers["X-Request-Timeout"] = str(timeout)
        headers.update(headers_for(query))
        return headers

    @staticmethod
    def _error(status: int, body: bytes) -> AnyServeError:
        from anyserve.errors import from_status

        try:
            message = str(json.loads(body).get("detail", ""))
        except (ValueError, AttributeError):
            message = body.decode(errors="replace")[:500]
        return from_status(status, message or f"API server answered {status}")

    async def forward(
        self,
        query: Mapping[str, str],
        request: pb.ModelInferRequest,
        ctx: Context,
        visited: list[str],
        timeout: float | None = None,
    ) -> pb.ModelInferResponse:
        import httpx

        headers = self._headers(query, ctx, visited, timeout)
        try:
            reply = await self._async.post(
                self.api_server + "/infer", content=request.SerializeToString(), headers=headers
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"API server not reachable at {self.api_server}: {exc}") from exc
        if reply.status_code != 200:
            raise self._error(reply.status_code, reply.content)
        return pb.ModelInferResponse.FromString(reply.content)

    async def forward_stream(
        self,
        query: Mapping[str, str],
        request: pb.ModelInferRequest,
        ctx: Context,
        visited: list[str],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        import httpx

        from anyserve.tensors import request_to_json, response_from_json

        headers = self._headers(query, ctx, visited, None)
        headers["Content-Type"] = "application/json"
        body = json.dumps(request_to_json(request)).encode()
        try:
            async with self._async.stream(
                "POST", self.api_server + "/infer/stream", content=body, headers=headers
            ) as reply:
                if reply.status_code != 200:
                    raise self._error(reply.status_code, await reply.aread())
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        yield pb.ModelStreamInferResponse(error_message=str(event["error"]))
                        return
                    yield pb.ModelStreamInferResponse(infer_response=response_from_json(event))
        except httpx.HTTPError as exc:
            raise Unavailable(f"API server not reachable at {self.api_server}: {exc}") from exc

    # Context.call / acall -------------------------------------------------

    async def acall(
        self,
        query: Mapping[str, str],
        request: pb.ModelInferRequest,
        ctx: Context,
        timeout: float | None,
    ) -> pb.ModelInferResponse:
        home = self._home
        if home is not None and asyncio.get_running_loop() is not home:
            # An async stream handler runs on a loop of its own; the client is not its to use.
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(
                    self.forward(query, request, ctx, [], timeout), home
                )
            )
        return await self.forward(query, request, ctx, [], timeout)

    def call(
        self,
        query: Mapping[str, str],
        request: pb.ModelInferRequest,
        ctx: Context,
        timeout: float | None,
    ) -> pb.ModelInferResponse:
        import httpx

        headers = self._headers(query, ctx, [], timeout)
        try:
            reply = self._sync.post(
                self.api_server + "/infer", content=request.SerializeToString(), headers=headers
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"API server not reachable at {self.api_server}: {exc}") from exc
        if reply.status_code != 200:
            raise self._error(reply.status_code, reply.content)
        return pb.ModelInferResponse.FromString(reply.content)


def _handler_error(handler: Handler, exc: BaseException, request_id: str) -> str:
    """Log the traceback here; the client only gets the message."""
    log.error(
        "request %s: handler %s raised\n%s",
        request_id,
        handler.name,
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(),
    )
    message = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if not isinstance(exc, AnyServeError) else message


class InferenceServicer(pbg.GRPCInferenceServiceServicer):
    """The seven KServe v2 RPCs over one app."""

    def __init__(self, replica: Replica) -> None:
        self.r = replica

    # Health and metadata ---------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.r.ready)

    def _model_query(self, name: str, version: str) -> dict[str, str]:
        query = {"type": name} if name else {}
        if version:
            query["model"] = version
        return query

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        query = self._model_query(request.name, request.version)
        found = bool(query) and self.r.app.find_handler(query) is not None
        return pb.ModelReadyResponse(ready=self.r.ready and found)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="anyserve", version=__version__, extensions=[])

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        query = self._model_query(request.name, request.version)
        matches = [h for h in self.r.app.handlers if query and h.capability.matches(query)]
        if not matches:
            await context.abort(grpc.StatusCode.NOT_FOUND, self.r.not_found_message(query))
        versions = sorted({str(h.capability.attrs.get("model", "")) for h in matches} - {""})
        reply = pb.ModelMetadataResponse(name=request.name, versions=versions, platform="anyserve")
        # The declarations of the best match (exact first), as Triton lists a model's tensors.
        best = self.r.app.find_handler(query)
        if best is not None and best.signature is not None:
            for tensors, target in (
                (best.signature.inputs, reply.inputs),
                (best.signature.outputs, reply.outputs),
            ):
                for t in tensors:
                    target.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return reply

    # Inference ---------------------------------------------------------------

    # Errors are raised as AnyServeError below and become a gRPC status here, once.

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        try:
            return await self.r.infer(request, context)
        except AnyServeError as exc:
            await context.abort(grpc_code(exc), exc.message)

    async def ModelStreamInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        try:
            async for message in self.r.infer_stream(request, context):
                yield message
        except AnyServeError as exc:
            await context.abort(grpc_code(exc), exc.message)


class _Malformed:
    """A request body that is not the protobuf message it should be."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(message_cls: Any) -> Any:
    from google.protobuf.message import DecodeError

    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return parse


async def _refuse(gate: TokenGate, rpc: str, context: Any) -> None:
    """Abort with UNAUTHENTICATED unless the call carries the token ``rpc`` needs."""
    refusal = gate.refusal(rpc, dict(context.invocation_metadata() or ()))
    if refusal is not None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)


def _guard(method: Any, streaming: bool, gate: TokenGate) -> Any:
    """Check the token, then answer a malformed request with INVALID_ARGUMENT (gRPC's own
    answer is INTERNAL)."""
    name = method.__name__
    gated = gate.needs_token(name)
    if streaming:

        async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if gated:
                await _refuse(gate, name, context)
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{name}: malformed request: {request.error}"
                )
            async for message in method(request, context):
                yield message

        return guarded_stream

    async def guarded(request: Any, context: Any) -> Any:
        if gated:
            await _refuse(gate, name, context)
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name}: malformed request: {request.error}"
            )
        return await method(request, context)

    return guarded


def add_servicer(servicer: InferenceServicer, server: Any, gate: TokenGate) -> None:
    """Register the service like the generated adder, but with lenient request parsing
    and the token checked where ``gate`` says."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = factory(
            _guard(getattr(servicer, method.name), method.server_streaming, gate),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


#: Bounds a ``heartbeat_interval`` from the API server is clamped to, in seconds: a
#: shorter one would spin, a longer one would let the lease run out unnoticed.
HEARTBEAT_BOUNDS = (0.05, 3600.0)


def _lease_reply(reply: Any, interval: float) -> tuple[Mapping[str, Any], float, str]:
    """``(body, interval, problem)`` of a 200 to /register or /heartbeat: the JSON object
    (else empty), the interval it asks for (else ``interval``), and what was wrong, if
    anything, said for a log line."""
    try:
        body = reply.json()
    except ValueError:  # not JSON, or not UTF-8
        return {}, interval, f"with a body that is not JSON ({reply.text[:100]!r})"
    if not isinstance(body, dict):
        return {}, interval, f"with JSON that is not an object ({type(body).__name__})"
    asked = body.get("heartbeat_interval")
    if asked is None:
        return body, interval, ""
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not 0 < asked < math.inf:
        return body, interval, f"with heartbeat_interval {str(asked)[:50]!r}, not seconds"
    low, high = HEARTBEAT_BOUNDS
    return body, min(max(float(asked), low), high), ""


class Replica:
    """One app served over gRPC, plus its registration with the API server."""

    def __init__(self, config: ReplicaConfig, app: AnyServe) -> None:
        self.config = config
        self.app = app
        self.replica_id = config.replica_id or f"replica-{secrets.token_hex(4)}"
        self.instance = config.instance
        self.ready = False
        self.endpoint = ""
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="handler")
        self.delegator: Delegator | None = None
        self._objects: Any = None
        self._registered = False
        self._stop = asyncio.Event()
        self._in_flight = 0
        self._resolved: dict[tuple[str, bool], tuple[Handler | None, dict[str, str]]] = {}

    # Handler resolution ---------------------------------------------------------

    def objects(self) -> Any:
        if self._objects is None and self.config.object_store is not None:
            from anyserve.objects import ObjectStore

            self._objects = ObjectStore(
                self.config.object_store, allow_pickle=self.config.allow_pickle
            )
        return self._objects

    def not_found_message(self, query: Mapping[str, str], stream: bool | None = None) -> str:
        wanted = ",".join(f"{k}={v}" for k, v in query.items()) or "(no capability given)"
        serves = "; ".join(h.capability.label() for h in self.app.handlers)
        kind = "stream " if stream else ""
        return f"no {kind}handler for {wanted} on replica {self.replica_id} (it serves: {serves})"

    def resolve(
        self, request: pb.ModelInferRequest, metadata: Mapping[str, str], stream: bool
    ) -> tuple[Handler | None, dict[str, str]]:
        raw = metadata.get("anyserve-capability")
        if raw:
            # The API server sends the same few capabilities over and over: parse each once.
            cached = self._resolved.get((raw, stream))
            if cached is not None:
                return cached
            try:
                query = {str(k): value_text(v) for k, v in json.loads(raw).items()}
            except (ValueError, AttributeError):
                query = {}
            if query:
                found = next(
                    (
                        h
                        for h in self.app.handlers
                        if h.capability.stream == stream and h.capability.equals(query)
                    ),
                    None,
                ) or self.app.find_handler(query, stream=stream)
                if len(self._resolved) >= 1024:
                    self._resolved.clear()
                self._resolved[(raw, stream)] = (found, query)
                return found, query
        query = {"type": request.model_name} if request.model_name else {}
        if request.model_version:
            query["model"] = request.model_version
        if not query:
            return None, query
        return self.app.find_handler(query, stream=stream), query

    def context(self, metadata: Mapping[str, str], query: Mapping[str, str]) -> Context:
        try:
            depth = int(metadata.get("x-delegation-depth", "0") or 0)
        except ValueError:
            depth = 0
        return Context(
            replica_id=self.replica_id,
            capability=query,
            request_id=metadata.get("x-request-id") or secrets.token_hex(8),
            objects=self.objects(),
            api_server=self.config.api_server,
            delegation_depth=depth,
            caller=self.delegator,
            authorization=metadata.get("authorization", ""),
        )

    def _delegate_check(
        self, query: Mapping[str, str], metadata: Mapping[str, str], stream: bool
    ) -> tuple[Delegator, list[str]]:
        """Raise unless this request may be delegated; return the visited replica ids."""
        if self.delegator is None or not query:
            raise NotFound(self.not_found_message(query, stream))
        visited = [v for v in metadata.get("x-delegated-from", "").split(",") if v]
        try:
            depth = int(metadata.get("x-delegation-depth", "0") or 0)
        except ValueError:
            depth = 0
        if depth >= MAX_DELEGATION_DEPTH:
            raise DelegationLoop(
                f"delegation depth limit ({MAX_DELEGATION_DEPTH}) reached for "
                f"{','.join(f'{k}={v}' for k, v in query.items())}; visited: {', '.join(visited)}"
            )
        return self.delegator, [*visited, self.replica_id]

    async def infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        metadata = dict(context.invocation_metadata() or ())
        handler, query = self.resolve(request, metadata, stream=False)
        ctx = self.context(metadata, query)
        started = time.perf_counter()
        if handler is None:
            delegator, visited = self._delegate_check(query, metadata, False)
            log.info("request %s: delegating %s", ctx.request_id, query)
            return await delegator.forward(query, request, ctx, visited)
        _name_model(request, handler)
        if handler.signature is not None:
            handler.signature.check_request(request)
        self._in_flight += 1
        try:
            args: tuple[Any, ...] = (request, ctx)[: handler.arity]
            if handler.is_async:
                result = await handler.func(*args)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.pool, handler.func, *args)
        except AnyServeError as exc:
            _handler_error(handler, exc, ctx.request_id)
            raise
        except Exception as exc:
            raise HandlerError(_handler_error(handler, exc, ctx.request_id)) from exc
        finally:
            self._in_flight -= 1
        response = self._coerce(result, request)
        if response is None:  # never an empty 200: the client sees what went wrong
            message = (
                f"handler {handler.name} returned {type(result).__name__}, "
                "expected a ModelInferResponse"
            )
            log.error("request %s: %s", ctx.request_id, message)
            raise AnyServeError(message)
        if handler.signature is not None:
            broken = handler.signature.check_response(response)
            if broken:  # the handler's fault, not the client's: a 500 and a log line
                message = f"handler {handler.name} broke its declared outputs: {broken}"
                log.error("request %s: %s", ctx.request_id, message)
                raise AnyServeError(message)
        if request.raw_input_contents:
            # Triton's clients send raw tensors and read raw outputs back (as Triton answers).
            from anyserve.v2codec import with_raw_outputs

            response = with_raw_outputs(response)
        log.info(
            "request %s %s ok %.1fms",
            ctx.request_id,
            handler.capability.label(),
            (time.perf_counter() - started) * 1000,
        )
        return response

    @staticmethod
    def _coerce(result: Any, request: pb.ModelInferRequest) -> pb.ModelInferResponse | None:
        if isinstance(result, pb.ModelInferResponse):
            return result
        if isinstance(result, Mapping):
            from anyserve.tensors import make_response

            return make_response(request, **{str(k): v for k, v in result.items()})
        return None

    async def infer_stream(
        self, request: pb.ModelInferRequest, context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        metadata = dict(context.invocation_metadata() or ())
        handler, query = self.resolve(request, metadata, stream=True)
        ctx = self.context(metadata, query)
        if handler is None:
            delegator, visited = self._delegate_check(query, metadata, True)
            try:
                async for message in delegator.forward_stream(query, request, ctx, visited):
                    yield message
            except AnyServeError as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)
            return
        _name_model(request, handler)
        if handler.signature is not None:
            # Inputs only: a stream's outputs arrive piecewise, so no one message is the whole.
            handler.signature.check_request(request)
        stream = Stream()
        # The RPC ends (client gone, deadline, server stop): the handler's next send raises.
        context.add_done_callback(lambda _ctx: stream.cancel())
        task = asyncio.ensure_future(self._produce(handler, request, ctx, stream))
        self._in_flight += 1
        raw = bool(request.raw_input_contents)
        try:
            async for message in stream.messages():
                if raw and message.HasField("infer_response"):
                    from anyserve.v2codec import with_raw_outputs

                    message.infer_response.CopyFrom(with_raw_outputs(message.infer_response))
                yield message
            await task
        finally:
            self._in_flight -= 1
            stream.cancel()
            if not task.done():
                # Async handlers stop here; a sync one stops at its next send.
                task.cancel()

    async def _produce(
        self, handler: Handler, request: pb.ModelInferRequest, ctx: Context, stream: Stream
    ) -> None:
        """Run a stream handler to its end, then close the stream (with an error if it raised)."""
        args = (request, ctx, stream)[: handler.arity]
        try:
            if handler.is_async:
                await _run_on_own_loop(handler, args, stream, ctx.request_id)
            else:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.pool, _run_sync_stream, handler, args, stream)
        except StreamClosed:
            pass  # the client went away or the handler closed the stream itself
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = _handler_error(handler, exc, ctx.request_id)
            if not stream.closed:
                stream.error(message)
        finally:
            stream.close()

    # Registration --------------------------------------------------------------------

    def registration(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "endpoint": self.endpoint,
            "capabilities": self.app.get_capabilities(),
            "instance": self.instance,
            "max_in_flight": self.config.max_in_flight,
        }

    async def register_and_heartbeat(self) -> None:
        """Register once serving, then heartbeat; never give up while the replica runs.

        While the API server is unreachable the replica keeps serving and retries every
        quarter second, so a restarted API server has it back almost at once.
        """
        assert self.delegator is not None
        client = self.delegator._async
        url = self.delegator.api_server
        interval = 2.0
        last_problem = ""
        path = "/register"
        while not self._stop.is_set():
            wait = interval
            problem = ""
            try:
                reply = await client.post(
                    url + path,
                    json=self.registration(),
                    headers=self.delegator.control_headers,
                    timeout=5.0,
                )
            except Exception as exc:  # keep serving standalone while the API server is away
                problem = f"API server {url} not reachable ({type(exc).__name__}); retrying"
                path, wait = "/register", UNREACHABLE_RETRY
            else:
                status = reply.status_code
                if status == 200:
                    # A 200 is a lease, whatever its body: keep heartbeating and unregister
                    # at shutdown even if the body cannot be read (a proxy's page, a bug).
                    body, interval, problem = _lease_reply(reply, interval)
                    if problem:
                        problem = f"API server answered 200 {problem}; heartbeating on"
                    if not self._registered or body.get("registered"):
                        log.info("registered %s at %s as %s", self.endpoint, url, self.replica_id)
                    self._registered = True
                    path, wait = "/heartbeat", interval
                elif status == 410:
                    # Unregistered on purpose (draining, `anyserve registry rm`): stay out.
                    log.info(
                        "the API server took %s out of rotation; serving on without heartbeats",
                        self.replica_id,
                    )
                    return
                else:
                    problem = f"API server answered {status} to {path}: {reply.text[:300]}"
                    if status == 429:
                        wait = _retry_after(reply.headers.get("retry-after"), interval)
            if problem and problem != last_problem:
                log.warning(problem)
            last_problem = problem
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=wait)

    async def unregister(self) -> None:
        if self.delegator is None or not self._registered:
            return
        try:
            await self.delegator._async.request(
                "DELETE",
                self.delegator.api_server + "/unregister",
                json={"replica_id": self.replica_id, "instance": self.instance},
                headers=self.delegator.control_headers,
                timeout=2.0,
            )
            log.info("unregistered %s", self.replica_id)
        except Exception as exc:
            log.warning("could not unregister from %s: %s", self.delegator.api_server, exc)

    # Lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        server = grpc.aio.server(options=options)
        add_servicer(
            InferenceServicer(self), server, TokenGate(self.config.token, self.config.auth)
        )
        address = f"{self.config.host}:{self.config.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise Unavailable(
                f"cannot listen on {address}: the port is already in use or the address is "
                "not available; choose another --port (0 picks a free one)"
            )
        advertised = reachable_host(self.config.host)
        if ":" in advertised and not advertised.startswith("["):
            advertised = f"[{advertised}]"  # an IPv6 address, as host:port needs it
        self.endpoint = f"{advertised}:{port}"
        if self.config.api_server:
            self.delegator = Delegator(self.config.api_server, self.replica_id, self.config.token)
        await server.start()
        self.ready = True
        caps = "; ".join(h.capability.label() for h in self.app.handlers)
        print(
            f"anyserve replica {self.replica_id} serving on {self.endpoint}: {caps}",
            flush=True,
        )
        loop = asyncio.get_running_loop()
        signalled: list[int] = []

        def on_signal(signum: int) -> None:
            signalled.append(signum)
            if len(signalled) > 1:
                os._exit(128 + signum)  # a second signal forces
            self._stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        beat = asyncio.ensure_future(self.register_and_heartbeat()) if self.delegator else None
        await self._stop.wait()
        log.info("shutting down: finishing in-flight requests (grace %.1fs)", self.config.grace)
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        await self.unregister()
        self.ready = False
        await server.stop(self.config.grace)
        if self.delegator is not None:
            await self.delegator.aclose()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _name_model(request: pb.ModelInferRequest, handler: Handler) -> None:
    """A request routed by capability headers names no model: name it after the capability
    (model name = ``type``, version = ``model``), so replies built from it say who answered."""
    if not request.model_name:
        attrs = handler.capability.attrs
        request.model_name = value_text(attrs.get("type", ""))
        if not request.model_version and "model" in attrs:
            request.model_version = value_text(attrs["model"])


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.1, float(value)) if value else default
    except ValueError:
        return default


def _run_sync_stream(handler: Handler, args: tuple[Any, ...], stream: Stream) -> None:
    result = handler.func(*args)
    if handler.is_generator:
        for message in result:
            stream.send(message)


class _OwnLoop:
    """One async stream handler on an event loop of its own, run by :meth:`run` in a
    thread of its own.

    ``stream.send`` blocks while the client is behind; on the replica's loop that would
    stall every request, here it pauses only this handler, so a fast async producer is
    held to the stream's buffer like a sync one.
    """

    def __init__(self, handler: Handler, args: tuple[Any, ...], stream: Stream) -> None:
        self.handler = handler
        self.args = args
        self.stream = stream
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False

    async def _main(self) -> None:
        if self.handler.is_generator:
            async for message in self.handler.func(*self.args):
                self.stream.send(message)
        else:
            await self.handler.func(*self.args)

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            with self._lock:
                if self._cancelled:
                    return
                task = loop.create_task(self._main())
                self._loop, self._task = loop, task
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            with self._lock:
                self._loop = self._task = None
            loop.close()

    def cancel(self) -> None:
        """Stop the handler at its next ``await`` (thread-safe; the RPC has ended)."""
        with self._lock:
            self._cancelled = True
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)


async def _run_on_own_loop(
    handler: Handler, args: tuple[Any, ...], stream: Stream, request_id: str
) -> None:
    """Run an async stream handler via :class:`_OwnLoop`; its exceptions raise here."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    runner = _OwnLoop(handler, args, stream)

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def target() -> None:
        error: BaseException | None = None
        try:
            runner.run()
        except Exception as exc:  # handed to the awaiting coroutine, which reports it
            error = exc
        with contextlib.suppress(RuntimeError):  # the replica's loop is already closed
            loop.call_soon_threadsafe(settle, error)

    # Not the handler pool: that would cap concurrent async streams at its few workers.
    threading.Thread(target=target, name=f"stream-{request_id}", daemon=True).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        runner.cancel()
        raise


def run(config: ReplicaConfig) -> None:
    """Serve ``config.app`` until SIGINT/SIGTERM (the sync shell around :meth:`Replica.serve`)."""
    logging.basicConfig(
        level=os.environ.get("ANYSERVE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per heartbeat would drown the request log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = load_app(config.app)
    replica = Replica(config, app)
    try:  # uvloop spends about 15 % less CPU per request than the stdlib loop
        import uvloop
    except ImportError:
        asyncio.run(replica.serve())
    else:
        uvloop.run(replica.serve())
