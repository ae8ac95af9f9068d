"""KServe v2 (Open Inference Protocol) REST routes on the API server.

A v2 *model* is a capability: the model ``name`` is its ``type``, the ``version`` its
``model``, and ``X-Capability-*`` headers add further keys, exactly as on ``/infer/json``.
Requests go through the API server's :class:`~anyserve.api_server.Gateway` (least-loaded
replica, cached gRPC channel), so a v2 client needs only the API server's address.

Routes (``routes`` is mounted by the API server)::

    GET  /v2                                              server metadata
    GET  /v2/health/live                                  200: the API server is up
    GET  /v2/health/ready                                 200: at least one replica is registered
    GET  /v2/models/{name}[/versions/{version}]           model metadata, from the registry
    GET  /v2/models/{name}[/versions/{version}]/ready     200: a replica serves it
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
import math
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from anyserve import __version__
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.defaults import max_message_bytes
from anyserve.errors import (
    AnyServeError,
    BadRequest,
    HandlerError,
    NotFound,
    PayloadTooLarge,
    error_headers,
)
from anyserve.tensors import (
    DATATYPE_FIELD,
    RAW_STRUCT_CODE,
    dumps,
    loads,
    request_from_json,
    response_to_json,
)

if TYPE_CHECKING:
    from anyserve.api_server import Gateway, Routing
    from anyserve.registry import Capability, Registry

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

#: The v2 protocol extensions this server implements (``GET /v2``).
EXTENSIONS = ["binary_tensor_data", "parameters"]
#: The binary tensor extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"
_BINARY = "application/octet-stream"

_LENGTH = struct.Struct("<I")
# The catch-all route takes every method, so that a wrong one on a v2 path is answered here.
_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
# Parameters that describe the HTTP encoding, not the request: not passed to the handler.
_TRANSPORT_PARAMS = ("binary_data_size", "binary_data", "binary_data_output")


# --------------------------------------------------------------------------- raw tensor codec


def split_bytes(raw: bytes, where: str = "tensor") -> list[bytes]:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then data)."""
    out = []
    pos, end = 0, len(raw)
    unpack = _LENGTH.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise BadRequest(f"{where}: BYTES data ends inside a 4-byte length prefix")
        (size,) = unpack(raw, pos)
        pos += 4
        if pos + size > end:
            raise BadRequest(f"{where}: a BYTES element of {size} bytes runs past the data")
        out.append(raw[pos : pos + size])
        pos += size
    return out


def _join_bytes(items: Sequence[bytes]) -> bytes:
    pack = _LENGTH.pack
    return b"".join(part for item in items for part in (pack(len(item)), item))


def _element_count(datatype: str, raw: bytes, where: str) -> int:
    """How many elements ``raw`` holds; 400 when it is not a whole number of them."""
    if datatype == "BYTES":
        return len(split_bytes(raw, where))
    code = RAW_STRUCT_CODE.get(datatype)
    if code is None:
        raise BadRequest(
            f"{where}: datatype {datatype!r} is not supported; expected one of "
            + ", ".join(DATATYPE_FIELD)
        )
    size = struct.calcsize(code)
    if len(raw) % size:
        raise BadRequest(
            f"{where}: {len(raw)} bytes is not a whole number of {datatype} elements "
            f"({size} bytes each)"
        )
    return len(raw) // size


def _values(tensor: Any) -> list[Any]:
    """The values of a tensor's ``contents``: the datatype's field, else any non-empty one."""
    if not tensor.HasField("contents"):
        return []
    contents = tensor.contents
    field = DATATYPE_FIELD.get(tensor.datatype)
    if field is not None:
        values = getattr(contents, field)
        if values:
            return list(values)
    for name in set(DATATYPE_FIELD.values()):
        values = getattr(contents, name)
        if values:
            return list(values)
    return []


def raw_tensor(tensor: Any) -> bytes:
    """A tensor's ``contents`` in the raw little-endian layout of its datatype."""
    values = _values(tensor)
    if tensor.datatype == "BYTES":
        if not all(isinstance(v, bytes) for v in values):
            raise HandlerError(f"tensor {tensor.name!r}: BYTES output holds numbers, not bytes")
        return _join_bytes(values)
    code = RAW_STRUCT_CODE.get(tensor.datatype)
    if code is None:
        raise HandlerError(f"tensor {tensor.name!r}: cannot encode datatype {tensor.datatype!r}")
    try:
        return struct.pack(f"<{len(values)}{code}", *values)
    except (struct.error, OverflowError) as exc:
        raise HandlerError(
            f"tensor {tensor.name!r}: values do not fit {tensor.datatype}: {exc}"
        ) from None


def _fill_from_raw(tensor: Any, raw: bytes) -> None:
    """Put raw data into the tensor's typed ``contents`` field (for a JSON reply)."""
    field = DATATYPE_FIELD.get(tensor.datatype)
    if field is None:
        raise HandlerError(
            f"output {tensor.name!r} of datatype {tensor.datatype!r} can only be sent in binary; "
            'ask for it with "parameters": {"binary_data": true}'
        )
    try:
        if tensor.datatype == "BYTES":
            values: Sequence[Any] = split_bytes(raw, f"output {tensor.name!r}")
        else:
            count = _element_count(tensor.datatype, raw, f"output {tensor.name!r}")
            values = struct.unpack(f"<{count}{RAW_STRUCT_CODE[tensor.datatype]}", raw)
    except BadRequest as exc:  # the handler's raw data is malformed: its error, not the client's
        raise HandlerError(exc.message) from None
    getattr(tensor.contents, field).extend(values)


def with_raw_outputs(response: pb.ModelInferResponse) -> pb.ModelInferResponse:
    """``response`` with every output in ``raw_output_contents`` (as Triton answers a request
    that sent ``raw_input_contents``); returned unchanged when it already is."""
    if len(response.raw_output_contents) >= len(response.outputs):
        return response
    raw = [
        response.raw_output_contents[i]
        if i < len(response.raw_output_contents)
        else raw_tensor(tensor)
        for i, tensor in enumerate(response.outputs)
    ]
    out = pb.ModelInferResponse()
    out.CopyFrom(response)
    for tensor in out.outputs:
        tensor.ClearField("contents")
    del out.raw_output_contents[:]
    out.raw_output_contents.extend(raw)
    return out


# --------------------------------------------------------------------------- request body


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """The body under ``Content-Encoding: gzip|deflate`` (what tritonclient can send), at
    most ``limit`` bytes once inflated (the gRPC message limit the replicas use)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body is over {limit} bytes")
    return out


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or int(text) > size:
        raise BadRequest(
            f"Inference-Header-Content-Length must be a byte count within the body "
            f"({size} bytes), not {value!r}"
        )
    return int(text)


def _pop_binary_size(item: dict[str, Any], where: str) -> int | None:
    """Remove and return an input's ``parameters.binary_data_size`` (validated)."""
    params = item.get("parameters")
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    params = dict(params)
    size = params.pop("binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(f"{where}.parameters.binary_data_size: expected a byte count")
    if "data" in item:
        raise BadRequest(f"{where}: give either data or parameters.binary_data_size, not both")
    item["parameters"] = params
    return size


def _strip_transport(item: Any) -> None:
    """Drop the binary-extension parameters from a JSON object's ``parameters``."""
    if isinstance(item, dict) and isinstance(item.get("parameters"), dict):
        params = item["parameters"]
        if any(key in params for key in _TRANSPORT_PARAMS):
            item["parameters"] = {k: v for k, v in params.items() if k not in _TRANSPORT_PARAMS}


def _wanted_outputs(body: dict[str, Any], binary_default: bool) -> dict[str, bool] | None:
    """Requested output name → whether it goes back in binary; None when all are wanted."""
    params = body.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("binary_data_output"), bool):
        binary_default = params["binary_data_output"]
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return {"*": True} if binary_default else None
    wanted: dict[str, bool] = {}
    for item in outputs:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            binary = binary_default
            params = item.get("parameters")
            if isinstance(params, dict) and isinstance(params.get("binary_data"), bool):
                binary = params["binary_data"]
            wanted[item["name"]] = binary
    return wanted


def decode_request(
    body: bytes, header_length: int | None
) -> tuple[pb.ModelInferRequest, dict[str, bool] | None]:
    """A v2 REST infer body as a ``ModelInferRequest``, and which outputs to return how.

    The second value maps each requested output to whether it is returned in binary
    (``{"*": True}``: every output, in binary); None means every output, as JSON.
    """
    head = body if header_length is None else memoryview(body)[:header_length]
    obj = loads(head)
    if not isinstance(obj, dict):
        raise BadRequest("the body must be a JSON object with inputs")
    inputs = obj.get("inputs")
    blobs: list[bytes | None] = []
    if isinstance(inputs, list):
        obj["inputs"] = inputs = [dict(i) if isinstance(i, dict) else i for i in inputs]
        pos, end = header_length or 0, len(body)
        for index, item in enumerate(inputs):
            size = _pop_binary_size(item, f"inputs[{index}]") if isinstance(item, dict) else None
            if size is None:
                blobs.append(None)
                continue
            if header_length is None:
                raise BadRequest(
                    f"inputs[{index}] has parameters.binary_data_size but the request has no "
                    "Inference-Header-Content-Length header saying where its JSON ends"
                )
            if pos + size > end:
                raise BadRequest(
                    f"inputs[{index}]: binary_data_size {size} runs past the end of the body "
                    f"({end - pos} binary bytes left)"
                )
            blobs.append(body[pos : pos + size])
            pos += size
        if header_length is not None and pos != end:
            raise BadRequest(
                f"the body has {end - pos} binary bytes that no input's binary_data_size covers"
            )
    binary_in = any(blob is not None for blob in blobs)
    wanted = _wanted_outputs(obj, binary_in)
    _strip_transport(obj)
    outputs = obj.get("outputs")
    for item in outputs if isinstance(outputs, list) else ():
        _strip_transport(item)
    if isinstance(obj.get("parameters"), dict) and not obj["parameters"]:
        del obj["parameters"]
    request = request_from_json(obj)
    if binary_in:
        _to_raw_inputs(request, blobs)
    return request, wanted


def _to_raw_inputs(request: pb.ModelInferRequest, blobs: list[bytes | None]) -> None:
    """Put every input into ``raw_input_contents`` (the protocol allows no mixing)."""
    raw: list[bytes] = []
    for index, (tensor, blob) in enumerate(zip(request.inputs, blobs, strict=True)):
        where = f"inputs[{index}] ({tensor.name})"
        if blob is None:
            try:
                raw.append(raw_tensor(tensor))
            except HandlerError as exc:  # e.g. an FP16 value too large for half precision
                raise BadRequest(f"{where}: {exc.message}") from None
            tensor.ClearField("contents")
            continue
        count = _element_count(tensor.datatype, blob, where)
        expected = math.prod(tensor.shape)
        if count != expected:
            raise BadRequest(
                f"{where}: shape {list(tensor.shape)} holds {expected} element(s) but its "
                f"binary data has {count}"
            )
        raw.append(blob)
    request.raw_input_contents.extend(raw)


# --------------------------------------------------------------------------- reply body


def encode_response(
    response: pb.ModelInferResponse,
    wanted: dict[str, bool] | None,
    name: str,
    version: str,
    request_id: str,
) -> tuple[bytes, int | None]:
    """The v2 reply body, and the length of its JSON header when it carries binary data.

    ``wanted`` is :func:`decode_request`'s second value. ``name``, ``version`` and
    ``request_id`` fill in what the handler's response leaves empty.
    """
    every = wanted is None or "*" in wanted
    chosen: list[tuple[int, bool]] = []
    if every:
        binary = wanted is not None
        chosen = [(i, binary) for i in range(len(response.outputs))]
    else:
        assert wanted is not None
        index = {t.name: i for i, t in enumerate(response.outputs)}
        missing = [n for n in wanted if n not in index]
        if missing:
            produced = ", ".join(index) or "none"
            raise BadRequest(
                f"requested output(s) {', '.join(missing)} not produced by {name}; "
                f"it produced: {produced}"
            )
        chosen = [(index[n], binary) for n, binary in wanted.items()]

    raw = response.raw_output_contents
    head = pb.ModelInferResponse(
        model_name=response.model_name or name,
        model_version=response.model_version or version,
        id=response.id or request_id,
    )
    head.parameters.MergeFrom(response.parameters)
    blobs: list[bytes] = []
    for i, binary in chosen:
        tensor = response.outputs[i]
        if binary:
            blobs.append(raw[i] if i < len(raw) else raw_tensor(tensor))
            out = head.outputs.add(name=tensor.name, datatype=tensor.datatype)
            out.shape.extend(tensor.shape)
            out.parameters.MergeFrom(tensor.parameters)
        else:
            out = head.outputs.add()
            out.CopyFrom(tensor)
            if i < len(raw):
                out.ClearField("contents")
                _fill_from_raw(out, raw[i])
    obj = response_to_json(head)
    sizes = iter(len(b) for b in blobs)
    for item, (_, binary) in zip(obj["outputs"], chosen, strict=True):
        contents = item.pop("contents", None) or {}
        if binary:
            item.setdefault("parameters", {})["binary_data_size"] = next(sizes)
        else:
            field = DATATYPE_FIELD.get(item["datatype"])
            data = contents.get(field) if field else None
            item["data"] = data if data is not None else next(iter(contents.values()), [])
    text = dumps(obj)
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


# --------------------------------------------------------------------------- routes


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(
        dumps({"error": message}), status_code=status, media_type=_JSON, headers=headers
    )


def _json(data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), media_type=_JSON, headers=headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def _v2(endpoint: Endpoint) -> Endpoint:
    """Answer the endpoint's errors in the v2 shape ``{"error": message}``, with the headers
    the API server's other replies carry for them (``Retry-After``, ``WWW-Authenticate``)."""

    @functools.wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except AnyServeError as exc:
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
    from anyserve.api_server import Routing

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


def model_versions(capabilities: Iterable[Capability]) -> list[str]:
    """The ``model`` values of ``capabilities``: a v2 model's versions."""
    return sorted({c.match_keys["model"] for c in capabilities if "model" in c.match_keys})


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
    gateway = _gateway(request)
    routing = _routing(request, gateway)
    name, version = _model(request)
    capabilities = list(serving(gateway.registry, routing.query))
    if not capabilities:
        raise NotFound(gateway.registry.describe_miss(routing.query, stream=False))
    return _json(
        {
            "name": name,
            "versions": [version] if version else model_versions(capabilities),
            "platform": "anyserve",
            "inputs": [],
            "outputs": [],
        }
    )


@_v2
async def model_ready(request: Request) -> Response:
    """``GET /v2/models/{name}[/versions/{version}]/ready``: 200 when a replica serves it."""
    gateway = _gateway(request)
    routing = _routing(request, gateway)
    if next(serving(gateway.registry, routing.query), None) is None:
        raise NotFound(gateway.registry.describe_miss(routing.query, stream=False))
    return Response(status_code=200)


@_v2
async def infer(request: Request) -> Response:
    """``POST /v2/models/{name}[/versions/{version}]/infer``: v2 JSON or binary in and out."""
    from anyserve.api_server import _note, _routing_headers

    gateway = _gateway(request)
    routing = _routing(request, gateway)
    _note(request, routing)
    name, version = _model(request)
    body = _decompressed(
        await request.body(),
        request.headers.get("content-encoding", ""),
        max_message_bytes(gateway.config.max_body_size),
    )
    if not body:
        raise BadRequest('the body is empty; send {"inputs": [...]}')
    length = _header_length(request.headers.get(HEADER_LENGTH), len(body))
    message, wanted = decode_request(body, length)
    message.model_name = name
    message.model_version = version
    reply, choice = await gateway.infer(message, routing)
    _note(request, routing, choice)
    # Without a version in the path, the reply names the one that answered.
    version = version or choice.capability.match_keys.get("model", "")
    content, header_length = encode_response(reply, wanted, name, version, message.id)
    headers = _routing_headers(choice)
    if header_length is None:
        return Response(content, media_type=_JSON, headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(content, media_type=_BINARY, headers=headers)


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
        "metadata, ready and infer endpoints (model repository, statistics, trace, logging "
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
    Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    # Last: it matches every other path under /v2.
    Route("/v2/{path:path}", unknown, methods=_ANY_METHOD),
]
