"""The KServe v2 (Open Inference Protocol) tensor and body codec, without HTTP.

The raw tensor codec (``raw_input_contents`` / ``raw_output_contents`` ⇄ typed contents),
the binary tensor extension's request and reply bodies, and body decompression. The REST
routes (:mod:`anyserve.kserve`), the gRPC ingress and the replica all use it; it imports
no web framework, so the replica does not load one.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.errors import (
    BadRequest,
    HandlerError,
    PayloadTooLarge,
)
from anyserve.tensors import (
    DATATYPE_FIELD,
    RAW_STRUCT_CODE,
    dumps,
    join_bytes,
    loads,
    request_from_json,
    response_to_json,
    split_bytes,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "EXTENSIONS",
    "HEADER_LENGTH",
    "decode_request",
    "decompressed",
    "encode_response",
    "json_header_length",
    "raw_tensor",
    "split_bytes",
    "with_raw_outputs",
]

#: The v2 protocol extensions this server implements (``GET /v2``).
EXTENSIONS = ["binary_tensor_data", "parameters"]
#: The binary tensor extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"
_BINARY = "application/octet-stream"

# The catch-all route takes every method, so that a wrong one on a v2 path is answered here.
_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
# Parameters that describe the HTTP encoding, not the request: not passed to the handler.
_TRANSPORT_PARAMS = ("binary_data_size", "binary_data", "binary_data_output")


# --------------------------------------------------------------------------- raw tensor codec


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
        return join_bytes(values)
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


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
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


def json_header_length(value: str | None, size: int) -> int | None:
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
