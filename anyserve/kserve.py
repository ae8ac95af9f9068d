"""KServe v2 (Open Inference Protocol) REST routes on the API server.

A v2 *model* is a capability: the model ``name`` is its ``type``, the ``version`` its
``model``, and ``X-Capability-*`` headers add further keys, exactly as on ``/infer/json``.
Requests go through the API server's :class:`~anyserve.server.gateway.Gateway` (least-loaded
replica, cached gRPC channel), so a v2 client needs only the API server's address.

Routes (``routes`` is mounted by the API server)::

    GET  /v2                                              server metadata
    GET  /v2/health/live                                  200: the API server is up
    GET  /v2/health/ready                                 200: at least one replica is registered
    GET  /v2/models/{name}[/versions/{version}]           model metadata, from the registry
    GET  /v2/models/{name}[/versions/{version}]/ready     200: a replica serves it
    GET  /v2/models/{name}[/versions/{version}]/config    Triton's model configuration
    POST /v2/models/{name}[/versions/{version}]/infer     inference

Errors are ``{"error": message}`` with the status of the
:class:`~anyserve.errors.AnyServeError` (400 malformed, 404 no such model, 500 handler
error, 503 no replica reachable, ...). A health check that is false answers 400 (server)
or 404 (model) with such a body, so probes and ``tritonclient``'s ``is_*_ready`` see false.

The binary tensor extension is supported both ways. A request with an
``Inference-Header-Content-Length: N`` header carries an N-byte JSON header followed by the
raw data of every input whose ``parameters.binary_data_size`` is set (little-endian; BYTES
elements each prefixed by a 4-byte little-endian length). Such a request reaches the
replica with all its inputs in ``raw_input_contents``. An output is returned in binary when
its ``parameters.binary_data`` says so, else when the request's ``parameters`` has
``binary_data_output``, else when the request itself carried binary data (as Triton's
clients expect); the reply then has an ``Inference-Header-Content-Length`` header.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from anyserve import __version__
from anyserve.defaults import max_message_bytes
from anyserve.errors import (
    AnyServeError,
    BadRequest,
    NoMatchingCapability,
    error_headers,
)
from anyserve.server.routing import Routing, note, routing_headers
from anyserve.tensors import (
    check_json_elements,
    dumps,
)
from anyserve.v2codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    decode_request,
    decompressed,
    encode_response,
    json_header_length,
    raw_tensor,
    split_bytes,
    with_raw_outputs,
)

if TYPE_CHECKING:
    from anyserve._proto.grpc_predict_v2_pb2 import ModelInferRequest
    from anyserve.registry import Capability, Registry
    from anyserve.server.gateway import Gateway

__all__ = [
    "EXTENSIONS",
    "HEADER_LENGTH",
    "decode_request",
    "encode_response",
    "model_versions",
    "raw_tensor",
    "routes",
    "serving",
    "split_bytes",
    "with_raw_outputs",
]

_JSON = "application/json"

_BINARY = "application/octet-stream"

# The catch-all route takes every method, so that a wrong one on a v2 path is answered here.
_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

# --------------------------------------------------------------------------- routes


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(
        dumps({"error": message}), status_code=status, media_type=_JSON, headers=headers
    )


def _json(data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), media_type=_JSON, headers=headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def unknown_model(name: str, exc: AnyServeError) -> AnyServeError:
    """``exc`` as the v2 surfaces report it: a model no replica serves starts with the words
    Triton's and KServe's clients test for, then AnyServe's list of what is registered."""
    if name and isinstance(exc, NoMatchingCapability):
        return NoMatchingCapability(f"Request for unknown model: '{name}' is not found; {exc}")
    return exc


def _v2(endpoint: Endpoint) -> Endpoint:
    """Answer the endpoint's errors in the v2 shape ``{"error": message}``, with the headers
    the API server's other replies carry for them (``Retry-After``, ``WWW-Authenticate``)."""

    @functools.wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except AnyServeError as exc:
            exc = unknown_model(request.path_params.get("name", ""), exc)
            return _error(exc.message, exc.status, error_headers(exc))

    return answer


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _model(request: Request) -> tuple[str, str]:
    params = request.path_params
    return params["name"], params.get("version", "")


def _routing(request: Request, gateway: Gateway) -> Routing:
    """The request's routing: the path's name/version plus its ``X-Capability-*`` headers."""
    name, version = _model(request)
    # The path's keys win over X-Capability-Type/-Model headers; without a version in the
    # path, X-Capability-Model may narrow the choice.
    path = {"type": name, "model": version} if version else {"type": name}
    scope = request.scope
    return Routing.from_headers(
        scope["headers"], scope["state"]["request_id"], gateway.config.request_timeout, path=path
    )


def serving(registry: Registry, query: Mapping[str, str]) -> Iterator[Capability]:
    """Every registered capability (unary or stream) matching ``query``."""
    for record in registry.records():
        for capability in record.capabilities:
            if capability.matches(query, capability.stream):
                yield capability


def _served(request: Request) -> tuple[str, str, list[Capability]]:
    """The path's model name and version, and the capabilities serving it; 404 if none."""
    gateway = _gateway(request)
    routing = _routing(request, gateway)
    name, version = _model(request)
    capabilities = list(serving(gateway.registry, routing.query))
    if not capabilities:
        raise NoMatchingCapability(gateway.registry.describe_miss(routing.query, stream=False))
    return name, version, capabilities


def model_versions(capabilities: Iterable[Capability]) -> list[str]:
    """The ``model`` values of ``capabilities``: a v2 model's versions."""
    return sorted({c.match_keys["model"] for c in capabilities if "model" in c.match_keys})


def declared_tensors(capabilities: Iterable[Capability]) -> dict[str, list[dict[str, Any]]]:
    """The ``inputs``/``outputs`` of v2 metadata: the first declaring capability's tensors
    (replicas of one model declare the same), or empty lists for undeclared handlers."""
    for c in capabilities:
        if c.inputs or c.outputs:
            return {
                "inputs": [t.to_dict() for t in c.inputs],
                "outputs": [t.to_dict() for t in c.outputs],
            }
    return {"inputs": [], "outputs": []}


@_v2
async def server_metadata(request: Request) -> Response:
    """``GET /v2``: server name, version and protocol extensions."""
    return _json({"name": "anyserve", "version": __version__, "extensions": EXTENSIONS})


@_v2
async def server_live(request: Request) -> Response:
    """``GET /v2/health/live``: 200 while the API server answers."""
    return Response(status_code=200)


@_v2
async def server_ready(request: Request) -> Response:
    """``GET /v2/health/ready``: 200 once at least one replica is registered, else 400."""
    if not len(_gateway(request).registry):
        return _error("not ready: no replica is registered (start one with `anyserve up`)", 400)
    return Response(status_code=200)


@_v2
async def model_metadata(request: Request) -> Response:
    """``GET /v2/models/{name}[/versions/{version}]``: the model as the registry knows it."""
    name, version, capabilities = _served(request)
    return _json(
        {
            "name": name,
            "versions": [version] if version else model_versions(capabilities),
            "platform": "anyserve",
            **declared_tensors(capabilities),
        }
    )


def triton_dims(tensor: dict[str, Any]) -> dict[str, Any]:
    """One declared tensor in Triton's model configuration shape (``TYPE_*`` datatypes;
    KServe's BYTES is Triton's TYPE_STRING)."""
    datatype = tensor["datatype"]
    return {
        "name": tensor["name"],
        "data_type": "TYPE_" + ("STRING" if datatype == "BYTES" else datatype),
        "dims": tensor["shape"],
    }


@_v2
async def model_config(request: Request) -> Response:
    """``GET /v2/models/{name}[/versions/{version}]/config``: Triton's model configuration,
    from the declared tensors, so the tools that size their requests from it work.
    ``max_batch_size`` is 0: the declared shapes include any batch dimension."""
    name, _, capabilities = _served(request)
    tensors = declared_tensors(capabilities)
    return _json(
        {
            "name": name,
            "platform": "anyserve",
            "backend": "anyserve",
            "max_batch_size": 0,
            "input": [triton_dims(t) for t in tensors["inputs"]],
            "output": [triton_dims(t) for t in tensors["outputs"]],
        }
    )


@_v2
async def model_ready(request: Request) -> Response:
    """``GET /v2/models/{name}[/versions/{version}]/ready``: 200 when a replica serves it."""
    gateway = _gateway(request)
    routing = _routing(request, gateway)
    if next(serving(gateway.registry, routing.query), None) is None:
        raise NoMatchingCapability(gateway.registry.describe_miss(routing.query, stream=False))
    return Response(status_code=200)


@_v2
async def infer(request: Request) -> Response:
    """``POST /v2/models/{name}[/versions/{version}]/infer``: v2 JSON or binary in and out."""
    gateway = _gateway(request)
    routing = _routing(request, gateway)
    note(request, routing)
    name, version = _model(request)
    # A slot first, then the body: a model nobody serves (404) costs no body to refuse.
    admission = await gateway.admit(routing)
    try:
        message, wanted = await _decode(request, gateway)
    except BaseException:
        gateway.withdraw(admission)
        raise
    message.model_name = name
    message.model_version = version
    reply, choice = await gateway.infer(message, routing, admission)
    note(request, routing, choice)
    # Without a version in the path, the reply names the one that answered.
    version = version or choice.capability.match_keys.get("model", "")
    content, header_length = encode_response(reply, wanted, name, version, message.id)
    headers = routing_headers(choice)
    if header_length is None:
        return Response(content, media_type=_JSON, headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(content, media_type=_BINARY, headers=headers)


async def _decode(
    request: Request, gateway: Gateway
) -> tuple[ModelInferRequest, dict[str, bool] | None]:
    """The request message of a v2 infer body, and which outputs to return how."""
    body = decompressed(
        await request.body(),
        request.headers.get("content-encoding", ""),
        max_message_bytes(gateway.config.max_body_size),
    )
    if not body:
        raise BadRequest('the body is empty; send {"inputs": [...]}')
    length = json_header_length(request.headers.get(HEADER_LENGTH), len(body))
    check_json_elements(body, length)
    return decode_request(body, length)


async def unknown(request: Request) -> Response:
    """Any other ``/v2`` path or method: a v2-shaped 404 (405 when only the method is wrong)."""
    for route in routes:
        if route.endpoint is not unknown and route.matches(request.scope)[0] is Match.PARTIAL:
            allowed = ", ".join(sorted(route.methods or ()))
            return _error(
                f"{request.method} is not allowed on {request.url.path}; use {allowed}",
                405,
                headers={"Allow": allowed},
            )
    return _error(
        f"no route {request.url.path}: AnyServe answers the KServe v2 health, server and model "
        "metadata, config, ready and infer endpoints (model repository, statistics, trace, logging "
        "and shared memory are not supported)",
        404,
    )


routes = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    Route("/v2/models/{name}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/config", model_config, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/config", model_config, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    # Last: it matches every other path under /v2.
    Route("/v2/{path:path}", unknown, methods=_ANY_METHOD),
]
