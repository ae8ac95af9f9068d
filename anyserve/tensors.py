"""JSON ⇄ protobuf conversion for KServe v2 tensors, and the handler helpers built on it.

Three users share this module: the API server (``/infer/json`` and ``/infer/stream``, where
it sits on every request, so it is written for speed), the client side (CLI, ``context.call``)
and handler authors (``input_text``, ``text_output``, ``make_response`` ...).

The JSON shape is the seed's: a tensor carries ``contents`` keyed by the protobuf field names
(``bytes_contents``, ``int_contents``, ``fp32_contents`` ...). An input may instead carry the
KServe v2 REST ``data`` list, placed into the field that matches its ``datatype``. Text in
``bytes_contents`` is UTF-8; bytes that are not valid UTF-8 travel as ``{"b64": "..."}``.

Parsing never lets a ``TypeError``, ``ValueError`` or protobuf error escape: every malformed
body becomes a :class:`~anyserve.errors.BadRequest` whose message names the field, e.g.
``inputs[0].contents.int_contents[2]: expected an integer, got a string``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any, overload

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.errors import BadElement, BadRequest, PayloadTooLarge

# A raw BYTES element's length prefix (Triton's layout).
_LENGTH = struct.Struct("<I")

_orjson: Any
try:  # orjson (a dependency) is several times faster than json; json is the fallback.
    import orjson as _orjson
except ImportError:  # pragma: no cover - the json fallback is tested directly
    _orjson = None

__all__ = [
    "DATATYPE_FIELD",
    "dumps",
    "input_list",
    "input_names",
    "input_text",
    "input_texts",
    "list_output",
    "loads",
    "make_response",
    "request_from_json",
    "request_to_json",
    "response_from_json",
    "response_to_json",
    "stream_chunk",
    "stream_event_to_json",
    "text_output",
]

#: KServe v2 datatype → the ``InferTensorContents`` field that carries it.
DATATYPE_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# The datatype a tensor gets when the JSON names only its contents field (the seed's SSE
# example omits datatype and shape).
_FIELD_DATATYPE: dict[str, str] = {
    "bool_contents": "BOOL",
    "int_contents": "INT32",
    "int64_contents": "INT64",
    "uint_contents": "UINT32",
    "uint64_contents": "UINT64",
    "fp32_contents": "FP32",
    "fp64_contents": "FP64",
    "bytes_contents": "BYTES",
}

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)

# Integer fields: (low, high, name used in messages).
_INT_FIELDS: dict[str, tuple[int, int, str]] = {
    "int_contents": (*_INT32, "int32"),
    "int64_contents": (*_INT64, "int64"),
    "uint_contents": (*_UINT32, "uint32"),
    "uint64_contents": (*_UINT64, "uint64"),
}

# Datatypes narrower than their contents field: INT8 values travel in int_contents (int32),
# so the field alone would accept 300 for an INT8 tensor.
_NARROW: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
}

#: Little-endian struct codes of the fixed-size datatypes in raw tensor contents (BYTES is
#: length-prefixed, handled apart); shared with the KServe v2 binary extension.
RAW_STRUCT_CODE: dict[str, str] = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}

# Finite doubles at or above this round to inf as float32 (half an ulp above FLT_MAX).
_FLT_OVERFLOW = 2.0**128 - 2.0**103
_FLT_MIN_NORMAL = 2.0**-126

_INT_TYPES = frozenset({int})
_FLOAT_TYPES = frozenset({int, float})
_BOOL_TYPES = frozenset({bool})
_STR_TYPES = frozenset({str})

_REQUEST_KEYS = frozenset(
    {"model_name", "model_version", "id", "parameters", "inputs", "outputs", "raw_input_contents"}
)
_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "parameters", "contents", "data"})
_REQUESTED_OUTPUT_KEYS = frozenset({"name", "parameters"})
_PARAM_KINDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


# -- JSON bodies ------------------------------------------------------------------------


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; orjson refuses them too.
    raise ValueError(f"{name} is not valid JSON")


def _json_loads(data: bytes | bytearray | memoryview | str) -> Any:
    return json.loads(
        bytes(data) if isinstance(data, memoryview) else data, parse_constant=_no_constant
    )


if _orjson is not None:
    _dumps: Callable[[Any], bytes] = _orjson.dumps
    _loads: Callable[[Any], Any] = _orjson.loads
else:  # pragma: no cover - the json functions are tested directly
    _dumps, _loads = _json_dumps, _json_loads


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` to compact UTF-8 JSON (orjson when installed, else json)."""
    return _dumps(obj)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse a JSON body; malformed input raises ``BadRequest("invalid JSON: ...")``."""
    try:
        return _loads(data)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise BadRequest(f"invalid JSON: {exc}") from None


#: A JSON body may hold at most one array element per this many bytes (beyond
#: ``JSON_FREE_ELEMENTS``). Parsing makes each element a Python object (a float 32 bytes
#: with its list slot, a short string 58) before it becomes a protobuf field, so a body of
#: two-byte numbers would grow the API server by 16 times its size; at one element per 16
#: bytes the parse stays within a few times the body (docs/reliability.md, "Memory").
JSON_BYTES_PER_ELEMENT = 16
#: Elements any JSON body may hold whatever its size: enough for a large JSON tensor (an
#: image of 1024x1024x3 values), and even as one- or two-byte elements within the documented
#: multiple of the body (at most ~250 MiB of Python objects).
JSON_FREE_ELEMENTS = 4 * 1024 * 1024


# A JSON string, escapes included; an unterminated one runs to the end instead of failing,
# so the pattern never backtracks.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)


def check_json_elements(body: bytes | bytearray, end: int | None = None) -> None:
    """Refuse (413) a JSON body with more array elements than its size allows, unparsed.

    Commas are counted, not elements: one C-speed scan, never fewer than the elements.
    Only when there are too many are they counted again outside strings, so that a CSV
    sent as text is no reason to refuse. With ``end``, only ``body[:end]`` is JSON (the
    v2 binary extension's header).
    """
    size = len(body) if end is None else end
    allowed = max(JSON_FREE_ELEMENTS, size // JSON_BYTES_PER_ELEMENT)
    if size <= allowed:
        return
    elements = body.count(b",", 0, size)
    if elements > allowed:
        # Rare, and one linear pass; the copy is at most the body.
        json_text = body if end is None else memoryview(body)[:end]
        elements = _JSON_STRING.sub(b"", json_text).count(b",")
    if elements > allowed:
        raise PayloadTooLarge(
            f"the JSON body holds about {elements} values in {size} bytes; at most one per "
            f"{JSON_BYTES_PER_ELEMENT} bytes ({allowed}) is parsed, as each takes a Python "
            "object. Send large tensors in binary: raw_input_contents in a protobuf body "
            "(POST /infer) or the v2 binary tensor extension"
        )


def loads_request(body: bytes | bytearray) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` from a JSON body (:func:`request_from_json`), its element
    count checked before parsing (:func:`check_json_elements`)."""
    check_json_elements(body)
    return request_from_json(loads(body))


# -- errors -----------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


def _expect_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{where}: expected a string, got {_kind(value)}")
    return value


def _assign(msg: Any, attr: str, value: Any, where: str) -> None:
    # protobuf refuses str that is not valid UTF-8 (lone surrogates, which json.loads lets
    # through from "\ud800" escapes) with a ValueError.
    try:
        setattr(msg, attr, value)
    except ValueError:
        raise BadRequest(f"{where}: text is not encodable as UTF-8") from None


def _expect_list(value: Any, where: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise BadRequest(f"{where}: expected an array, got {_kind(value)}")
    return value


def _b64decode(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, got {_kind(text)}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- value setters: JSON list → repeated field (one per contents field) -----------------
#
# Each setter checks the element types with set(map(type, ...)) and the range with
# min()/max(), all C loops, then hands the whole list to protobuf's extend. Only when a
# check fails does it walk the list in Python to name the offending element.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _first_out_of_range(values: Sequence[Any], low: int, high: int) -> int | None:
    if values and (min(values) < low or max(values) > high):
        return next(i for i, v in enumerate(values) if not low <= v <= high)
    return None


def _int_setter(field: str) -> Callable[[Any, Sequence[Any]], None]:
    low, high, name = _INT_FIELDS[field]

    def put(contents: Any, values: Sequence[Any]) -> None:
        if not set(map(type, values)) <= _INT_TYPES:
            for i, v in enumerate(values):
                if not _is_int(v):
                    raise BadElement(i, f"expected an integer, got {_kind(v)}")
            values = [int(v) for v in values]  # int subclasses (IntEnum) pass as plain ints
        bad = _first_out_of_range(values, low, high)
        if bad is not None:
            raise BadElement(bad, f"{values[bad]} is out of range for {name} ({low}..{high})")
        getattr(contents, field).extend(values)

    return put


def _float_setter(
    field: str, limit: float | int, name: str
) -> Callable[[Any, Sequence[Any]], None]:
    def put(contents: Any, values: Sequence[Any]) -> None:
        if not set(map(type, values)) <= _FLOAT_TYPES:
            for i, v in enumerate(values):
                if not _is_number(v):
                    raise BadElement(i, f"expected a number, got {_kind(v)}")
            values = [float(v) if isinstance(v, float) else int(v) for v in values]
        # NaN and ±inf are accepted (representable); a finite value past the type's range
        # would silently become inf, and a huge integer would make protobuf raise.
        if values:
            top = max(map(abs, values))
            if top != top or top >= limit:  # NaN makes max() unreliable: look at each
                for i, v in enumerate(values):
                    if abs(v) >= limit and not (isinstance(v, float) and math.isinf(v)):
                        raise BadElement(i, f"{v!r} is out of range for {name}")
        getattr(contents, field).extend(values)

    return put


def _put_bools(contents: Any, values: Sequence[Any]) -> None:
    if not set(map(type, values)) <= _BOOL_TYPES:
        i = next(i for i, v in enumerate(values) if not isinstance(v, bool))
        raise BadElement(i, f"expected a boolean, got {_kind(values[i])}")
    contents.bool_contents.extend(values)


def _encode_item(item: Any) -> bytes:
    """One bytes_contents item: text is UTF-8, ``{"b64": ...}`` is binary."""
    if isinstance(item, str):
        try:
            return item.encode()
        except UnicodeEncodeError as exc:  # lone surrogates from a lenient JSON parser
            raise ValueError(f"text is not encodable as UTF-8: {exc.reason}") from None
    if isinstance(item, dict):
        if len(item) == 1 and "b64" in item:
            return _b64decode(item["b64"])
        raise ValueError('expected a string or {"b64": "..."}, got an object with other keys')
    if isinstance(item, (bytes, bytearray, memoryview)):  # Python callers, not JSON
        return bytes(item)
    raise ValueError(f'expected a string or {{"b64": "..."}}, got {_kind(item)}')


def _put_bytes(contents: Any, values: Sequence[Any]) -> None:
    if set(map(type, values)) <= _STR_TYPES:
        try:
            # Encoded one at a time into the field: a list of them all would hold a second
            # Python object per element (docs/reliability.md, "Memory").
            contents.bytes_contents.extend(map(str.encode, values))
            return
        except UnicodeEncodeError:
            del contents.bytes_contents[:]  # the slow path below names the element
    encoded: list[bytes] = []
    for i, item in enumerate(values):
        try:
            encoded.append(_encode_item(item))
        except ValueError as exc:
            raise BadElement(i, str(exc)) from None
    contents.bytes_contents.extend(encoded)


_SETTERS: dict[str, Callable[[Any, Sequence[Any]], None]] = {
    "bool_contents": _put_bools,
    "int_contents": _int_setter("int_contents"),
    "int64_contents": _int_setter("int64_contents"),
    "uint_contents": _int_setter("uint_contents"),
    "uint64_contents": _int_setter("uint64_contents"),
    "fp32_contents": _float_setter("fp32_contents", _FLT_OVERFLOW, "FP32"),
    # An int limit: only integers too large for a double (protobuf: OverflowError) exceed it.
    "fp64_contents": _float_setter("fp64_contents", 2**1024, "FP64"),
    "bytes_contents": _put_bytes,
}


def _check_narrow(datatype: str, values: Sequence[Any]) -> None:
    low, high = _NARROW[datatype]
    i = _first_out_of_range(values, low, high)
    if i is not None:
        raise BadElement(i, f"{values[i]} is out of range for {datatype} ({low}..{high})")


# -- parameters -------------------------------------------------------------------------


def _fill_params(target: Any, obj: Any, where: str) -> None:
    """JSON ``{"key": value}`` into a ``map<string, InferParameter>``."""
    if not isinstance(obj, dict):
        raise BadRequest(f"{where}: expected an object, got {_kind(obj)}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise BadRequest(f"{where}: keys must be strings, got {_kind(key)}")
        try:
            param = target[key]
        except ValueError:  # a key that is not valid UTF-8
            raise BadRequest(f"{where}: key {key!r} is not encodable as UTF-8") from None
        _set_param(param, value, f"{where}.{key}")


def _set_param(param: Any, value: Any, where: str) -> None:
    # Plain JSON values pick the kind from their type. The typed form {"uint64_param": 5} is
    # accepted too, for the one case the plain form cannot express (a small uint64).
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            param.int64_param = value
        elif 0 <= value <= _UINT64[1]:
            param.uint64_param = value
        else:
            raise BadRequest(f"{where}: {value} is out of range for int64 and uint64")
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        _assign(param, "string_param", value, where)
    elif value is None:
        pass  # an InferParameter with nothing set; response_to_json writes it back as null
    elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _PARAM_KINDS:
        ((kind, inner),) = value.items()
        _set_typed_param(param, kind, inner, f"{where}.{kind}")
    else:
        raise BadRequest(f"{where}: expected a string, number, boolean or null, got {_kind(value)}")


def _set_typed_param(param: Any, kind: str, value: Any, where: str) -> None:
    ok: bool
    if kind == "bool_param":
        ok = isinstance(value, bool)
    elif kind == "string_param":
        ok = isinstance(value, str)
    elif kind == "double_param":
        ok = _is_number(value)
    else:
        low, high = _INT64 if kind == "int64_param" else _UINT64
        ok = _is_int(value) and low <= value <= high
    if not ok:
        raise BadRequest(f"{where}: {value!r} is not a valid {kind.replace('_param', '')}")
    _assign(param, kind, value, where)


def _params_to_json(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # protobuf maps have no order; sorting keeps the JSON stable from one reply to the next.
    for key, param in sorted(params.items()):
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind is not None else None
    return out


# -- tensors: JSON → protobuf -----------------------------------------------------------


def _flatten(data: Any, where: str) -> tuple[list[Any], list[int]]:
    """A KServe ``data`` list, flat or nested row-major, as a flat list and its shape."""
    if not isinstance(data, (list, tuple)):
        raise BadRequest(f"{where}: expected an array, got {_kind(data)}")
    shape = [len(data)]
    level: list[Any] = list(data)
    while level and isinstance(level[0], (list, tuple)):
        width = len(level[0])
        flat: list[Any] = []
        for i, row in enumerate(level):
            if not isinstance(row, (list, tuple)) or len(row) != width:
                raise BadRequest(
                    f"{where}{_index_in(shape, i)}: nested arrays must all have length {width}"
                    f", got {_kind(row) if not isinstance(row, (list, tuple)) else len(row)}"
                )
            flat.extend(row)
        shape.append(width)
        level = flat
    for i, v in enumerate(level):
        if isinstance(v, (list, tuple)):
            raise BadRequest(f"{where}{_index_in(shape, i)}: expected a value, got an array")
    return level, shape


def _index_in(shape: list[int], flat: int) -> str:
    """Flat index → ``[i][j]...`` in a row-major array of ``shape``."""
    parts = []
    for dim in reversed(shape[1:]):
        flat, rest = divmod(flat, dim or 1)
        parts.append(rest)
    parts.append(flat)
    return "".join(f"[{p}]" for p in reversed(parts))


def _parse_shape(value: Any, where: str) -> list[int]:
    values = _expect_list(value, where)
    if set(map(type, values)) <= _INT_TYPES and (
        not values or (min(values) >= 0 and max(values) <= _INT64[1])
    ):
        return list(values)
    for i, v in enumerate(values):
        if not _is_int(v) or not 0 <= v <= _INT64[1]:
            raise BadRequest(f"{where}[{i}]: expected a non-negative integer, got {v!r}")
    return [int(v) for v in values]


def _fill_tensor(tensor: Any, obj: Any, where: str, strict_shape: bool) -> None:
    """One input (request) or output (response) tensor from its JSON object."""
    if not isinstance(obj, dict):
        raise BadRequest(f"{where}: expected an object, got {_kind(obj)}")
    if not obj.keys() <= _TENSOR_KEYS:
        unknown = ", ".join(sorted(map(str, obj.keys() - _TENSOR_KEYS)))
        raise BadRequest(
            f"{where}: unknown field(s) {unknown}; expected name, datatype, shape, "
            "parameters, contents or data"
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.name: required, a non-empty string (got {_kind(name)})")
    _assign(tensor, "name", name, f"{where}.name")

    datatype = obj.get("datatype")
    if datatype is not None:
        datatype = _expect_str(datatype, f"{where}.datatype")
    contents = obj.get("contents")
    data = obj.get("data")
    count = 0
    nested_shape: list[int] | None = None
    filled: str | None = None  # the contents field that got values

    if contents is not None and data is not None:
        raise BadRequest(f"{where}: give either contents or data, not both")
    if contents is not None:
        if not isinstance(contents, dict):
            raise BadRequest(f"{where}.contents: expected an object, got {_kind(contents)}")
        c = tensor.contents
        for field, values in contents.items():
            put = _SETTERS.get(field)
            path = f"{where}.contents.{field}"
            if put is None:
                raise BadRequest(
                    f"{where}.contents: unknown field {field!r}; expected one of "
                    + ", ".join(_SETTERS)
                )
            if values is None:
                continue
            values = _expect_list(values, path)
            if not values:
                continue
            if filled is not None:
                raise BadRequest(
                    f"{where}.contents: more than one field has values ({filled}, {field}); "
                    "a tensor has one"
                )
            try:
                put(c, values)
                if datatype in _NARROW and field in _INT_FIELDS:
                    _check_narrow(datatype, values)
            except BadElement as bad:
                raise BadRequest(f"{path}[{bad.index}]: {bad.message}") from None
            filled = field
            count = len(values)
    elif data is not None:
        path = f"{where}.data"
        values, nested_shape = _flatten(data, path)
        if datatype is None:
            datatype = _guess_datatype(values, path)
        field_name = DATATYPE_FIELD.get(datatype)
        if field_name is None:
            raise BadRequest(
                f"{where}.datatype: {datatype!r} cannot carry data; expected one of "
                + ", ".join(DATATYPE_FIELD)
            )
        try:
            _SETTERS[field_name](tensor.contents, values)
            if datatype in _NARROW:
                _check_narrow(datatype, values)
        except BadElement as bad:
            at = _index_in(nested_shape, bad.index or 0)
            raise BadRequest(f"{path}{at}: {bad.message}") from None
        filled = field_name
        count = len(values)

    if datatype is None:
        if filled is None:
            raise BadRequest(f"{where}.datatype: required when the tensor has no contents")
        datatype = _FIELD_DATATYPE[filled]
    _assign(tensor, "datatype", datatype, f"{where}.datatype")

    shape_value = obj.get("shape")
    if shape_value is None:
        shape = nested_shape or [count]
    else:
        shape = _parse_shape(shape_value, f"{where}.shape")
        if strict_shape and filled is not None and math.prod(shape) != count:
            raise BadRequest(
                f"{where}.shape: {shape} holds {math.prod(shape)} element(s) but "
                f"{'data' if data is not None else 'contents.' + filled} has {count}"
            )
    tensor.shape.extend(shape)

    params = obj.get("parameters")
    if params is not None:
        _fill_params(tensor.parameters, params, f"{where}.parameters")


def _guess_datatype(values: Sequence[Any], where: str) -> str:
    """The datatype of a bare JSON list: the choice ``make_response`` makes too."""
    types = set(map(type, values))
    if not types or types <= _STR_TYPES | {dict, bytes}:
        return "BYTES"
    if types <= _BOOL_TYPES:
        return "BOOL"
    if types <= _INT_TYPES:
        return "INT64"
    if types <= _FLOAT_TYPES:
        return "FP32"
    raise BadRequest(
        f"{where}: cannot tell the datatype of mixed values; give a datatype "
        "(BOOL, INT64, FP32, BYTES, ...)"
    )


def _fill_raw(target: Any, value: Any, where: str) -> None:
    items = _expect_list(value, where)
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_b64decode(item))
        except ValueError as exc:
            raise BadRequest(f"{where}[{i}]: {exc}") from None
    target.extend(out)


def _fill_header(msg: Any, body: dict[str, Any]) -> None:
    for key in ("model_name", "model_version", "id"):
        value = body.get(key)
        if value is not None:
            _assign(msg, key, _expect_str(value, key), key)
    params = body.get("parameters")
    if params is not None:
        _fill_params(msg.parameters, params, "parameters")


def _expect_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"request body: expected a JSON object, got {_kind(body)}")
    return body


def request_from_json(body: Any) -> pb.ModelInferRequest:
    """Build a ``ModelInferRequest`` from the seed's JSON body (or a KServe v2 REST one).

    Raises :class:`BadRequest`, naming the field, for anything malformed. Unknown top-level
    keys are rejected too, so a typo such as ``"input"`` is reported instead of ignored.
    """
    body = _expect_body(body)
    if not body.keys() <= _REQUEST_KEYS:
        unknown = ", ".join(sorted(map(str, body.keys() - _REQUEST_KEYS)))
        raise BadRequest(
            f"request body: unknown field(s) {unknown}; expected "
            + ", ".join(sorted(_REQUEST_KEYS))
        )
    request = pb.ModelInferRequest()
    _fill_header(request, body)
    inputs = body.get("inputs")
    if inputs is None:
        raise BadRequest('inputs: required, e.g. [{"name": "text", "datatype": "BYTES", ...}]')
    for i, obj in enumerate(_expect_list(inputs, "inputs")):
        _fill_tensor(request.inputs.add(), obj, f"inputs[{i}]", True)
    outputs = body.get("outputs")
    if outputs is not None:
        for i, obj in enumerate(_expect_list(outputs, "outputs")):
            where = f"outputs[{i}]"
            if not isinstance(obj, dict):
                raise BadRequest(f"{where}: expected an object, got {_kind(obj)}")
            if not obj.keys() <= _REQUESTED_OUTPUT_KEYS:
                unknown = ", ".join(sorted(map(str, obj.keys() - _REQUESTED_OUTPUT_KEYS)))
                raise BadRequest(f"{where}: unknown field(s) {unknown}; expected name, parameters")
            name = obj.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"{where}.name: required, a non-empty string (got {_kind(name)})")
            requested = request.outputs.add()
            _assign(requested, "name", name, f"{where}.name")
            params = obj.get("parameters")
            if params is not None:
                _fill_params(requested.parameters, params, f"{where}.parameters")
    raw = body.get("raw_input_contents")
    if raw is not None:
        _fill_raw(request.raw_input_contents, raw, "raw_input_contents")
    return request


def response_from_json(body: Any) -> pb.ModelInferResponse:
    """Build a ``ModelInferResponse`` from its JSON form (the inverse of ``response_to_json``).

    Lenient where a server's reply may be terse: ``datatype`` and ``shape`` may be missing (the
    seed's SSE example omits them) and unknown top-level keys are ignored.
    """
    body = _expect_body(body)
    response = pb.ModelInferResponse()
    _fill_header(response, body)
    outputs = body.get("outputs")
    if outputs is not None:
        for i, obj in enumerate(_expect_list(outputs, "outputs")):
            _fill_tensor(response.outputs.add(), obj, f"outputs[{i}]", False)
    raw = body.get("raw_output_contents")
    if raw is not None:
        _fill_raw(response.raw_output_contents, raw, "raw_output_contents")
    return response


# -- tensors: protobuf → JSON -----------------------------------------------------------


def _bytes_to_json(values: Iterable[bytes]) -> list[Any]:
    items = list(values)
    try:
        return list(map(bytes.decode, items))
    except UnicodeDecodeError:
        pass  # some item is binary: decode one by one
    out: list[Any] = []
    for b in items:
        try:
            out.append(b.decode())
        except UnicodeDecodeError:
            out.append({"b64": _b64encode(b)})
    return out


_G6 = "{:.6g}".format
_FORMATS = [f"{{:.{p}g}}".format for p in range(10)]


def _fp32_to_json(values: Iterable[float]) -> list[float]:
    """float32 values as the doubles whose repr is the shortest decimal naming that float32.

    protobuf hands float32 values over as doubles, whose repr is long (0.1 prints as
    0.10000000149011612). Any decimal of at most 6 significant digits survives a trip through
    float32 (FLT_DIG), so when the 6-digit rounding reads back to the same float32 it is the
    shortest; that covers typical values in one vectorized pass. The rest (values needing 7-9
    digits, subnormals, which have fewer digits of precision) are refined per precision.
    """
    vals = list(values)
    if not vals:
        return vals
    target = array("f", vals)
    out = list(map(float, map(_G6, vals)))
    got = array("f", out)
    todo: list[int] = [] if got == target else [i for i in range(len(vals)) if got[i] != target[i]]
    if todo:
        _refine(vals, out, target, todo, 7)
    if min(map(abs, vals)) < _FLT_MIN_NORMAL:
        subnormal = [i for i, v in enumerate(vals) if 0.0 < abs(v) < _FLT_MIN_NORMAL]
        if subnormal:
            _refine(vals, out, target, subnormal, 1)
    return out


def _refine(
    vals: list[float], out: list[float], target: array[float], todo: list[int], start: int
) -> None:
    """Try precisions ``start``..9 on the values at ``todo``; 9 digits always suffice."""
    for p in range(start, 10):
        fmt = _FORMATS[p]
        texts = [fmt(vals[i]) for i in todo]
        cand = list(map(float, texts))
        got = array("f", cand)
        left = []
        for i, text, c, g in zip(todo, texts, cand, got, strict=True):
            if g == target[i]:
                out[i] = c
            elif (other := _far_neighbour(vals[i], text, c, p)) is not None:
                out[i] = other
            else:
                left.append(i)
        todo = left
        if not todo:
            return
    for i in todo:  # only NaN gets here; it prints as NaN (json) or null (orjson)
        out[i] = vals[i]


def _far_neighbour(value: float, text: str, nearest: float, p: int) -> float | None:
    """At a power of two the float32 rounding interval is lopsided (the gap below is half
    the gap above), so the nearest p-digit decimal can miss while its neighbour on the far
    side reads back. Check that one neighbour exactly; other values never need it."""
    if value == 0 or value != value or math.isinf(value) or abs(math.frexp(value)[0]) != 0.5:
        return None
    digits = Decimal(text)  # "%g" drops trailing zeros, so the step comes from p
    step = Decimal(1).scaleb(digits.adjusted() - p + 1)
    cand = float(digits + step if nearest < value else digits - step)
    try:
        if struct.unpack("<f", struct.pack("<f", cand))[0] == value:
            return cand
    except OverflowError:
        pass
    return None


def _identity(values: Iterable[Any]) -> list[Any]:
    return list(values)


# Dispatch table of content fields for output: (field, getter-converter).
_TO_JSON: tuple[tuple[str, Callable[[Iterable[Any]], list[Any]]], ...] = (
    ("bool_contents", _identity),
    ("int_contents", _identity),
    ("int64_contents", _identity),
    ("uint_contents", _identity),
    ("uint64_contents", _identity),
    ("fp32_contents", _fp32_to_json),
    ("fp64_contents", _identity),
    ("bytes_contents", _bytes_to_json),
)


_CONVERT = dict(_TO_JSON)


def _tensor_to_json(tensor: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
    }
    if tensor.parameters:
        out["parameters"] = _params_to_json(tensor.parameters)
    # ListFields: only the fields that are set, in field-number order (that of _TO_JSON),
    # in one call; asking for each of the eight made a container per field, a quarter of
    # the time of converting a small reply (every SSE event is one).
    out["contents"] = {f.name: _CONVERT[f.name](v) for f, v in tensor.contents.ListFields()}
    return out


def response_to_json(response: pb.ModelInferResponse) -> dict[str, Any]:
    """A ``ModelInferResponse`` in the seed's JSON shape.

    ``model_name`` and ``outputs`` are always present; ``model_version``, ``id`` and
    ``parameters`` only when set. Each output lists only its non-empty contents fields.
    """
    out: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        out["model_version"] = response.model_version
    if response.id:
        out["id"] = response.id
    if response.parameters:
        out["parameters"] = _params_to_json(response.parameters)
    out["outputs"] = [_tensor_to_json(t) for t in response.outputs]
    if response.raw_output_contents:
        out["raw_output_contents"] = [_b64encode(b) for b in response.raw_output_contents]
    return out


def request_to_json(request: pb.ModelInferRequest) -> dict[str, Any]:
    """A ``ModelInferRequest`` as the JSON body ``request_from_json`` reads back."""
    out: dict[str, Any] = {}
    if request.model_name:
        out["model_name"] = request.model_name
    if request.model_version:
        out["model_version"] = request.model_version
    if request.id:
        out["id"] = request.id
    if request.parameters:
        out["parameters"] = _params_to_json(request.parameters)
    out["inputs"] = [_tensor_to_json(t) for t in request.inputs]
    if request.outputs:
        outputs = []
        for t in request.outputs:
            item: dict[str, Any] = {"name": t.name}
            if t.parameters:
                item["parameters"] = _params_to_json(t.parameters)
            outputs.append(item)
        out["outputs"] = outputs
    if request.raw_input_contents:
        out["raw_input_contents"] = [_b64encode(b) for b in request.raw_input_contents]
    return out


def stream_event_to_json(message: pb.ModelStreamInferResponse) -> dict[str, Any]:
    """One streamed message as an SSE event body: the response, or ``{"error": message}``."""
    if message.error_message:
        return {"error": message.error_message}
    return response_to_json(message.infer_response)


# -- handler helpers: reading inputs ----------------------------------------------------


def input_names(request: pb.ModelInferRequest) -> list[str]:
    """The names of the request's inputs, in order."""
    return [t.name for t in request.inputs]


def _find(request: Any, name: str) -> tuple[int, Any] | None:
    for i, tensor in enumerate(request.inputs):
        if tensor.name == name:
            return i, tensor
    return None


def _require(request: Any, name: str) -> tuple[int, Any]:
    found = _find(request, name)
    if found is None:
        have = ", ".join(repr(n) for n in input_names(request)) or "none"
        raise BadRequest(f"missing input {name!r} (inputs: {have})")
    return found


def split_bytes(raw: bytes, where: str = "tensor") -> list[bytes]:
    """The elements of a raw BYTES tensor (Triton's layout: each a 4-byte little-endian
    length, then its data); :class:`BadRequest` naming ``where`` when it does not add up."""
    out = []
    pos, end = 0, len(raw)
    unpack = _LENGTH.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise BadRequest(f"{where}: BYTES data ends inside a 4-byte length prefix")
        (size,) = unpack(raw, pos)
        pos += 4
        if pos + size > end:
            raise BadRequest(
                f"{where}: a BYTES element of {size} bytes runs past the data (truncated)"
            )
        out.append(raw[pos : pos + size])
        pos += size
    return out


def join_bytes(items: Sequence[bytes]) -> bytes:
    """The raw BYTES layout of ``items``: :func:`split_bytes` reads it back."""
    pack = _LENGTH.pack
    return b"".join(part for item in items for part in (pack(len(item)), item))


def _raw_values(request: Any, index: int, tensor: Any) -> list[Any] | None:
    """Values of input ``index`` from raw_input_contents, or None if it has none there."""
    raw_list = request.raw_input_contents
    if index >= len(raw_list):
        return None
    raw = raw_list[index]
    if tensor.datatype == "BYTES":
        return split_bytes(raw, f"input {tensor.name!r}")
    code = RAW_STRUCT_CODE.get(tensor.datatype)
    if code is None:
        raise BadRequest(
            f"input {tensor.name!r}: cannot decode raw contents of {tensor.datatype!r}"
        )
    size = struct.calcsize(code)
    if len(raw) % size:
        raise BadRequest(
            f"input {tensor.name!r}: {len(raw)} raw bytes is not a whole number of "
            f"{tensor.datatype} values ({size} bytes each)"
        )
    return list(struct.unpack(f"<{len(raw) // size}{code}", raw))


def _contents_values(tensor: Any) -> tuple[str | None, list[Any]]:
    if tensor.HasField("contents"):
        c = tensor.contents
        field = DATATYPE_FIELD.get(tensor.datatype)
        if field is not None and getattr(c, field):
            return field, list(getattr(c, field))
        for field, _ in _TO_JSON:  # a datatype that disagrees with its field: take what is set
            values = getattr(c, field)
            if values:
                return field, list(values)
    return None, []


def input_list(request: pb.ModelInferRequest, name: str) -> list[Any]:
    """The values of input ``name`` as a flat list (bytes for BYTES, numbers, bools).

    Reads whichever contents field is set, or decodes ``raw_input_contents`` (little-endian,
    BYTES length-prefixed) by the input's datatype. A missing input raises ``BadRequest``.
    """
    index, tensor = _require(request, name)
    field, values = _contents_values(tensor)
    if field is None:
        raw = _raw_values(request, index, tensor)
        if raw is not None:
            return raw
    return values


def input_texts(request: pb.ModelInferRequest, name: str) -> list[str]:
    """The elements of BYTES input ``name`` decoded as UTF-8 (a missing input raises)."""
    index, tensor = _require(request, name)
    return _texts(request, index, tensor)


def _texts(request: Any, index: int, tensor: Any) -> list[str]:
    field, values = _contents_values(tensor)
    if field is None:
        raw = _raw_values(request, index, tensor) if tensor.datatype == "BYTES" else None
        values = raw or []
    elif field != "bytes_contents":
        raise BadRequest(f"input {tensor.name!r} is {tensor.datatype or field}, not BYTES text")
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError as exc:
        raise BadRequest(f"input {tensor.name!r} is not valid UTF-8 text: {exc.reason}") from None


# Overloads let a type checker see that a str default gives a str (no None check needed).
@overload
def input_text(
    request: pb.ModelInferRequest, name: str = ..., default: None = None
) -> str | None: ...
@overload
def input_text(request: pb.ModelInferRequest, name: str, default: str) -> str: ...
@overload
def input_text(request: pb.ModelInferRequest, *, default: str) -> str: ...


def input_text(
    request: pb.ModelInferRequest, name: str = "text", default: str | None = None
) -> str | None:
    """The first element of BYTES input ``name`` as UTF-8 text, or ``default`` if the input
    is absent or empty."""
    found = _find(request, name)
    if found is None:
        return default
    texts = _texts(request, *found)
    return texts[0] if texts else default


# -- handler helpers: building outputs --------------------------------------------------


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    raise TypeError(f"text output items must be str or bytes, got {type(item).__name__}")


def text_output(
    name: str, text: str | bytes | Sequence[str | bytes]
) -> pb.ModelInferResponse.InferOutputTensor:
    """A BYTES output tensor of shape ``[n]`` holding ``text`` (one item or a list)."""
    items = [text] if isinstance(text, (str, bytes, bytearray, memoryview)) else list(text)
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES")
    tensor.shape.append(len(items))
    tensor.contents.bytes_contents.extend([_as_bytes(item) for item in items])
    return tensor


def list_output(
    name: str,
    values: Sequence[Any],
    datatype: str = "FP32",
    shape: Sequence[int] | None = None,
) -> pb.ModelInferResponse.InferOutputTensor:
    """An output tensor of ``datatype`` (default FP32) holding ``values``, shape ``[len]``
    unless given. Raises ``ValueError`` for an unknown datatype or values that do not fit."""
    field = DATATYPE_FIELD.get(datatype)
    if field is None:
        raise ValueError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_FIELD)}"
        )
    values = list(values)
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype)
    try:
        _SETTERS[field](tensor.contents, values)
        if datatype in _NARROW:
            _check_narrow(datatype, values)
    except BadElement as bad:
        raise ValueError(f"output {name!r}[{bad.index}]: {bad.message}") from None
    tensor.shape.extend([len(values)] if shape is None else shape)
    return tensor


def _output_for(name: str, value: Any) -> Any:
    """The output tensor ``make_response`` builds for a keyword argument."""
    if isinstance(value, pb.ModelInferResponse.InferOutputTensor):
        tensor = pb.ModelInferResponse.InferOutputTensor()
        tensor.CopyFrom(value)
        tensor.name = name
        return tensor
    if isinstance(value, (str, bytes)):
        return text_output(name, value)
    if isinstance(value, (bytearray, memoryview)):
        return text_output(name, bytes(value))
    if isinstance(value, bool):
        return list_output(name, [value], "BOOL")
    if isinstance(value, int):
        return list_output(name, [value], "INT64")
    if isinstance(value, float):
        return list_output(name, [value], "FP32")
    if isinstance(value, (list, tuple)):
        types = set(map(type, value))
        if types and types <= {str, bytes, bytearray}:
            return text_output(name, value)
        if types and types <= _BOOL_TYPES:
            return list_output(name, value, "BOOL")
        if types <= _INT_TYPES:
            return list_output(name, value, "INT64" if types else "FP32")
        if types <= _FLOAT_TYPES:
            return list_output(name, value, "FP32")
    raise TypeError(
        f"output {name!r}: cannot build a tensor from {type(value).__name__}; use text, bytes, "
        "numbers, a list of those, or an output tensor"
    )


def make_response(
    request: pb.ModelInferRequest | None = None,
    *outputs: pb.ModelInferResponse.InferOutputTensor,
    model_name: str | None = None,
    **text_outputs: Any,
) -> pb.ModelInferResponse:
    """A ``ModelInferResponse`` answering ``request``.

    Copies ``model_name``, ``model_version`` and ``id`` from the request (``model_name=``
    overrides), appends ``outputs``, then one output per keyword: text or bytes → BYTES,
    a list of text → BYTES, of numbers → FP32 if any is a float else INT64, of bools → BOOL::

        return make_response(request, text=f"You said: {input_text(request)}")
    """
    response = pb.ModelInferResponse()
    if isinstance(request, pb.ModelInferResponse.InferOutputTensor):
        outputs = (request, *outputs)  # make_response(tensor, ...) without a request
        request = None
    if request is not None:
        response.model_name = request.model_name
        response.model_version = request.model_version
        response.id = request.id
    if model_name is not None:
        response.model_name = model_name
    for tensor in outputs:
        response.outputs.append(tensor)
    for name, value in text_outputs.items():
        response.outputs.append(_output_for(name, value))
    return response


def stream_chunk(
    request: pb.ModelInferRequest | None,
    text: str,
    finish_reason: str = "",
    *,
    model_name: str | None = None,
) -> pb.ModelStreamInferResponse:
    """One streamed token in the seed's shape: outputs ``text_output`` and ``finish_reason``
    (each BYTES ``[1]``); pass ``finish_reason="stop"`` on the last chunk."""
    response = make_response(
        request, model_name=model_name, text_output=text, finish_reason=finish_reason
    )
    return pb.ModelStreamInferResponse(infer_response=response)
