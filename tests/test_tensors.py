"""JSON ⇄ protobuf conversion and the handler helpers, on real protobuf messages."""

from __future__ import annotations

import json
import math
import random
import struct
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import pytest

from anyserve import tensors
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.errors import BadRequest
from anyserve.tensors import (
    DATATYPE_FIELD,
    dumps,
    input_list,
    input_names,
    input_text,
    input_texts,
    list_output,
    loads,
    make_response,
    request_from_json,
    request_to_json,
    response_from_json,
    response_to_json,
    stream_chunk,
    stream_event_to_json,
    text_output,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1


def f32(x: float) -> float:
    """``x`` rounded to float32, as protobuf hands float32 values back."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def through_json(obj: Any) -> Any:
    """What the other side of the wire sees."""
    return loads(dumps(obj))


# -- the seed's bodies ------------------------------------------------------------------

SEED_BODIES: dict[str, dict[str, Any]] = {
    "chat": {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["Hello World"]},
            }
        ]
    },
    "embed": {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["Sample text"]},
            }
        ]
    },
    "heavy": {
        "inputs": [
            {
                "name": "data",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["Heavy task"]},
            }
        ]
    },
    "stream": {
        "model_name": "chat",
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["Hello"]},
            }
        ],
    },
}


@pytest.mark.parametrize("name", sorted(SEED_BODIES))
def test_seed_bodies_parse(name: str) -> None:
    body = SEED_BODIES[name]
    request = request_from_json(loads(json.dumps(body)))
    expected = body["inputs"][0]
    assert request.model_name == body.get("model_name", "")
    assert input_names(request) == [expected["name"]]
    assert input_text(request, expected["name"]) == expected["contents"]["bytes_contents"][0]
    tensor = request.inputs[0]
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [1])
    # And back to the very same JSON.
    assert request_to_json(request) == body


def test_seed_sse_events_parse() -> None:
    # The SSE lines of the seed README omit datatype and shape.
    line = (
        '{"model_name": "chat", "outputs": [{"name": "text_output", "contents": '
        '{"bytes_contents": ["!"]}}, {"name": "finish_reason", "contents": '
        '{"bytes_contents": ["stop"]}}]}'
    )
    response = response_from_json(loads(line))
    assert response.model_name == "chat"
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("text_output", "BYTES", [1]),
        ("finish_reason", "BYTES", [1]),
    ]
    event = response_to_json(response)
    assert [o["contents"] for o in event["outputs"]] == [
        {"bytes_contents": ["!"]},
        {"bytes_contents": ["stop"]},
    ]


def test_seed_stream_handler_message_equals_stream_chunk() -> None:
    request = request_from_json(SEED_BODIES["stream"])
    request.id = "req-1"
    tokens = ["Hello", " ", "world", "!"]
    for i, token in enumerate(tokens):
        is_last = i == len(tokens) - 1
        # Built exactly as the seed README's streaming handler does.
        seed = pb.ModelStreamInferResponse(
            infer_response=pb.ModelInferResponse(model_name="chat", id=request.id)
        )
        text_out = seed.infer_response.outputs.add()
        text_out.name = "text_output"
        text_out.datatype = "BYTES"
        text_out.shape.append(1)
        text_out.contents.bytes_contents.append(token.encode())
        finish = seed.infer_response.outputs.add()
        finish.name = "finish_reason"
        finish.datatype = "BYTES"
        finish.shape.append(1)
        finish.contents.bytes_contents.append(b"stop" if is_last else b"")

        assert stream_chunk(request, token, "stop" if is_last else "") == seed


# -- round trips ------------------------------------------------------------------------

EDGE_VALUES: dict[str, list[Any]] = {
    "bool_contents": [True, False, True],
    "int_contents": [INT32_MIN, -1, 0, 1, INT32_MAX],
    "int64_contents": [INT64_MIN, INT32_MIN - 1, 0, INT32_MAX + 1, INT64_MAX],
    "uint_contents": [0, 1, INT32_MAX + 1, UINT32_MAX],
    "uint64_contents": [0, UINT32_MAX + 1, INT64_MAX + 1, UINT64_MAX],
    "fp32_contents": [f32(0.1), f32(1e-45), f32(3.4028235e38), -0.0, 1.5, f32(-2.7182817)],
    "fp64_contents": [0.1, 5e-324, 1.7976931348623157e308, -0.0, math.pi],
    "bytes_contents": [b"text", "h\u00e9llo \u4e16\u754c".encode(), b"\xff\xfe\x00", b""],
}
FIELD_DATATYPE = {
    "bool_contents": "BOOL",
    "int_contents": "INT32",
    "int64_contents": "INT64",
    "uint_contents": "UINT32",
    "uint64_contents": "UINT64",
    "fp32_contents": "FP32",
    "fp64_contents": "FP64",
    "bytes_contents": "BYTES",
}
PARAMETERS: dict[str, Any] = {
    "flag": True,
    "count": -7,
    "big": INT64_MAX,
    "huge": UINT64_MAX,
    "ratio": 0.25,
    "whole": 2.0,
    "name": "caf\u00e9",
}


def _fill_params(target: Any) -> None:
    target["flag"].bool_param = True
    target["count"].int64_param = -7
    target["big"].int64_param = INT64_MAX
    target["huge"].uint64_param = UINT64_MAX
    target["ratio"].double_param = 0.25
    target["whole"].double_param = 2.0
    target["name"].string_param = "caf\u00e9"


def full_request() -> Any:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="req-9")
    _fill_params(request.parameters)
    for field, values in EDGE_VALUES.items():
        tensor = request.inputs.add(name=field, datatype=FIELD_DATATYPE[field])
        tensor.shape.append(len(values))
        getattr(tensor.contents, field).extend(values)
        _fill_params(tensor.parameters)
    request.inputs.add(name="raw", datatype="INT32", shape=[2])
    request.outputs.add(name="out").parameters["binary_data"].bool_param = False
    request.raw_input_contents.extend([b""] * len(EDGE_VALUES) + [struct.pack("<2i", 1, -1)])
    return request


def full_response() -> Any:
    response = pb.ModelInferResponse(model_name="m", model_version="2", id="req-9")
    _fill_params(response.parameters)
    for field, values in EDGE_VALUES.items():
        tensor = response.outputs.add(name=field, datatype=FIELD_DATATYPE[field])
        tensor.shape.extend([1, len(values)])
        getattr(tensor.contents, field).extend(values)
    response.raw_output_contents.append(b"\x00\x01\xff")
    return response


def test_request_round_trip_every_content_type_and_parameter() -> None:
    request = full_request()
    body = through_json(request_to_json(request))
    assert request_from_json(body) == request
    assert body["parameters"] == PARAMETERS
    assert body["inputs"][0]["parameters"] == PARAMETERS
    assert body["outputs"] == [{"name": "out", "parameters": {"binary_data": False}}]


def test_response_round_trip_every_content_type_and_parameter() -> None:
    response = full_response()
    body = through_json(response_to_json(response))
    assert response_from_json(body) == response
    assert body["parameters"] == PARAMETERS
    assert body["raw_output_contents"] == ["AAH/"]


def test_response_json_values() -> None:
    outputs = {o["name"]: o for o in through_json(response_to_json(full_response()))["outputs"]}
    assert outputs["bytes_contents"]["contents"] == {
        "bytes_contents": ["text", "h\u00e9llo \u4e16\u754c", {"b64": "//4A"}, ""]
    }
    assert outputs["uint64_contents"]["contents"]["uint64_contents"][-1] == UINT64_MAX
    assert outputs["int64_contents"]["contents"]["int64_contents"][0] == INT64_MIN
    assert outputs["fp32_contents"]["shape"] == [1, 6]
    # Only the field that has values is listed.
    assert list(outputs["bool_contents"]["contents"]) == ["bool_contents"]


def test_fp32_prints_shortest_decimal() -> None:
    response = pb.ModelInferResponse(model_name="m")
    tensor = response.outputs.add(name="x", datatype="FP32", shape=[6])
    tensor.contents.fp32_contents.extend([0.1, 1e-45, 3.4028235e38, -0.0, 0.5, 1 / 3])
    text = dumps(response_to_json(response)).decode()
    assert '"fp32_contents":[0.1,1e-45,3.4028235e+38,-0.0,0.5,0.33333334]' in text
    assert json.loads(text)["outputs"][0]["contents"]["fp32_contents"][3] == 0.0
    assert math.copysign(1, tensors._fp32_to_json([-0.0])[0]) == -1


def _shortest_oracle(x: float) -> tuple[int, float]:
    """Digits and value of the shortest decimal reading back to float32 ``x``, by brute
    force: at each precision, the decimals just below and above ``x`` are the only
    candidates that can fall inside its rounding interval."""
    exact = Decimal(x)
    for p in range(1, 10):
        step = Decimal(1).scaleb(exact.adjusted() - p + 1)
        found = [
            d
            for d in (exact.quantize(step, ROUND_FLOOR), exact.quantize(step, ROUND_CEILING))
            if abs(d) <= Decimal("3.4028235678e38") and f32(float(d)) == x
        ]
        if found:
            return p, float(min(found, key=lambda d: abs(d - exact)))
    raise AssertionError(f"no decimal for {x!r}")


def _digits(x: float) -> int:
    return len(Decimal(repr(x)).normalize().as_tuple().digits)


def test_fp32_shortest_matches_brute_force() -> None:
    rng = random.Random(1234)
    values = [f32(2.0**e) for e in range(-149, 128)]  # powers of two: lopsided intervals
    values += [f32(2.0**e) * 3 for e in range(-149, 126)]
    values += [float(struct.unpack("<f", struct.pack("<I", n))[0]) for n in range(1, 40)]
    bits = (rng.getrandbits(32) for _ in range(4000))
    values += [
        v for n in bits if math.isfinite(v := struct.unpack("<f", n.to_bytes(4, "little"))[0])
    ]
    values += [f32(rng.uniform(-1, 1)) for _ in range(1000)]
    for value, got in zip(values, tensors._fp32_to_json(values), strict=True):
        digits, expected = _shortest_oracle(abs(value)) if value else (1, value)
        assert f32(got) == value, (value, got)
        assert _digits(got) == digits, (value, got, expected)


def test_fp32_nan_and_inf_pass_through() -> None:
    out = tensors._fp32_to_json([math.inf, -math.inf, math.nan])
    assert out[:2] == [math.inf, -math.inf]
    assert math.isnan(out[2])


def test_bytes_items_as_text_or_base64() -> None:
    body = {
        "inputs": [
            {
                "name": "blob",
                "datatype": "BYTES",
                "contents": {"bytes_contents": ["caf\u00e9", {"b64": "3q2+7w=="}]},
            }
        ]
    }
    request = request_from_json(body)
    assert input_list(request, "blob") == ["caf\u00e9".encode(), b"\xde\xad\xbe\xef"]
    assert list(request.inputs[0].shape) == [2]
    assert request_to_json(request)["inputs"][0]["contents"]["bytes_contents"] == [
        "caf\u00e9",
        {"b64": "3q2+7w=="},
    ]


def test_lean_response_json() -> None:
    response = make_response(None, text_output("out", "hi"), model_name="chat")
    assert response_to_json(response) == {
        "model_name": "chat",
        "outputs": [
            {
                "name": "out",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["hi"]},
            }
        ],
    }


def test_stream_event_to_json() -> None:
    request = request_from_json(SEED_BODIES["stream"])
    event = stream_event_to_json(stream_chunk(request, "Hello"))
    assert event["model_name"] == "chat"
    assert [(o["name"], o["contents"]) for o in event["outputs"]] == [
        ("text_output", {"bytes_contents": ["Hello"]}),
        ("finish_reason", {"bytes_contents": [""]}),
    ]
    failed = pb.ModelStreamInferResponse(error_message="boom")
    assert stream_event_to_json(failed) == {"error": "boom"}


# -- KServe v2 REST "data" --------------------------------------------------------------

DATA_CASES = [
    ("BOOL", [True, False], "bool_contents"),
    ("INT8", [-128, 127], "int_contents"),
    ("INT16", [-32768, 32767], "int_contents"),
    ("INT32", [INT32_MIN, INT32_MAX], "int_contents"),
    ("INT64", [INT64_MIN, INT64_MAX], "int64_contents"),
    ("UINT8", [0, 255], "uint_contents"),
    ("UINT16", [0, 65535], "uint_contents"),
    ("UINT32", [0, UINT32_MAX], "uint_contents"),
    ("UINT64", [0, UINT64_MAX], "uint64_contents"),
    ("FP16", [0.5, -2], "fp32_contents"),
    ("FP32", [0.5, 1], "fp32_contents"),
    ("FP64", [0.1, -1e300], "fp64_contents"),
    ("BYTES", ["a", {"b64": "AA=="}], "bytes_contents"),
]


@pytest.mark.parametrize(("datatype", "data", "field"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_goes_to_the_datatype_field(datatype: str, data: list[Any], field: str) -> None:
    assert DATATYPE_FIELD[datatype] == field
    request = request_from_json({"inputs": [{"name": "x", "datatype": datatype, "data": data}]})
    tensor = request.inputs[0]
    assert list(tensor.shape) == [len(data)]
    assert len(getattr(tensor.contents, field)) == len(data)
    assert [type(v) for v in input_list(request, "x")]  # readable back


def test_nested_data_is_flattened_row_major() -> None:
    body = {"inputs": [{"name": "x", "datatype": "INT64", "data": [[1, 2, 3], [4, 5, 6]]}]}
    request = request_from_json(body)
    assert list(request.inputs[0].shape) == [2, 3]
    assert input_list(request, "x") == [1, 2, 3, 4, 5, 6]


def test_datatype_inferred_when_missing() -> None:
    body = {
        "inputs": [
            {"name": "a", "contents": {"int64_contents": [1]}},
            {"name": "b", "data": ["x"]},
            {"name": "c", "data": [1, 2.5]},
            {"name": "d", "data": [1, 2]},
        ]
    }
    request = request_from_json(body)
    assert [t.datatype for t in request.inputs] == ["INT64", "BYTES", "FP32", "INT64"]


# -- malformed bodies -------------------------------------------------------------------


def _one(tensor: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": [{"name": "x", **tensor}]}


def _ints(values: list[Any], field: str = "int_contents", datatype: str = "INT32") -> Any:
    return _one({"datatype": datatype, "contents": {field: values}})


MALFORMED: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "request body: expected a JSON object, got an array"),
    ("null body", None, "request body: expected a JSON object, got null"),
    ("no inputs", {"model_name": "m"}, "inputs: required"),
    ("inputs not a list", {"inputs": {"name": "x"}}, "inputs: expected an array, got an object"),
    ("input not an object", {"inputs": ["text"]}, "inputs[0]: expected an object, got a string"),
    ("unknown top-level key", {"inputs": [], "input": []}, "unknown field(s) input"),
    ("model_name type", {"inputs": [], "model_name": 3}, "model_name: expected a string"),
    ("id type", {"inputs": [], "id": 7}, "id: expected a string, got an integer"),
    ("missing name", {"inputs": [{"datatype": "BYTES"}]}, "inputs[0].name: required"),
    ("empty name", {"inputs": [{"name": ""}]}, "inputs[0].name: required"),
    ("unknown tensor key", _one({"datatype": "BYTES", "value": 1}), "unknown field(s) value"),
    ("datatype type", _one({"datatype": 5, "data": [1]}), "inputs[0].datatype: expected a string"),
    ("no datatype, no contents", _one({"shape": [1]}), "inputs[0].datatype: required"),
    ("contents not object", _one({"contents": [1]}), "inputs[0].contents: expected an object"),
    (
        "unknown contents field",
        _one({"contents": {"text_contents": ["a"]}}),
        "inputs[0].contents: unknown field 'text_contents'",
    ),
    (
        "contents field not list",
        _one({"contents": {"int_contents": 5}}),
        "inputs[0].contents.int_contents: expected an array, got an integer",
    ),
    (
        "two contents fields",
        _one({"contents": {"int_contents": [1], "fp32_contents": [1.0]}}),
        "more than one field has values",
    ),
    ("both contents and data", _one({"contents": {}, "data": [1]}), "either contents or data"),
    ("string in ints", _ints([1, 2, "3"]), "int_contents[2]: expected an integer, got a string"),
    ("float in ints", _ints([1.5]), "int_contents[0]: expected an integer, got a number"),
    ("bool in ints", _ints([1, True]), "int_contents[1]: expected an integer, got a boolean"),
    ("null in ints", _ints([None]), "int_contents[0]: expected an integer, got null"),
    ("nested in ints", _ints([[1]]), "int_contents[0]: expected an integer, got an array"),
    ("int32 above", _ints([0, INT32_MAX + 1]), "int_contents[1]: 2147483648 is out of range"),
    ("int32 below", _ints([INT32_MIN - 1]), "int_contents[0]: -2147483649 is out of range"),
    (
        "int64 above",
        _ints([INT64_MAX + 1], "int64_contents", "INT64"),
        "int64_contents[0]: 9223372036854775808 is out of range for int64",
    ),
    ("uint32 negative", _ints([-1], "uint_contents", "UINT32"), "uint_contents[0]: -1 is out"),
    (
        "uint64 above",
        _ints([UINT64_MAX + 1], "uint64_contents", "UINT64"),
        "uint64_contents[0]: 18446744073709551616 is out of range for uint64",
    ),
    (
        "INT8 range",
        _ints([1, 128], datatype="INT8"),
        "int_contents[1]: 128 is out of range for INT8",
    ),
    (
        "UINT8 range",
        _ints([256], "uint_contents", "UINT8"),
        "uint_contents[0]: 256 is out of range for UINT8",
    ),
    (
        "string in fp32",
        _one({"datatype": "FP32", "contents": {"fp32_contents": [1.0, "2"]}}),
        "fp32_contents[1]: expected a number, got a string",
    ),
    (
        "fp32 overflow",
        _one({"datatype": "FP32", "contents": {"fp32_contents": [1.0, 1e39]}}),
        "fp32_contents[1]: 1e+39 is out of range for FP32",
    ),
    (
        "fp64 overflow int",
        _one({"datatype": "FP64", "contents": {"fp64_contents": [10**400]}}),
        "fp64_contents[0]: ",
    ),
    (
        "int in bools",
        _one({"datatype": "BOOL", "contents": {"bool_contents": [True, 1]}}),
        "bool_contents[1]: expected a boolean, got an integer",
    ),
    (
        "number in bytes",
        _one({"datatype": "BYTES", "contents": {"bytes_contents": ["a", 1]}}),
        'bytes_contents[1]: expected a string or {"b64": "..."}, got an integer',
    ),
    (
        "bad base64",
        _one({"datatype": "BYTES", "contents": {"bytes_contents": [{"b64": "!!!"}]}}),
        "bytes_contents[0]: invalid base64",
    ),
    (
        "b64 not a string",
        _one({"datatype": "BYTES", "contents": {"bytes_contents": [{"b64": 5}]}}),
        "bytes_contents[0]: expected a base64 string, got an integer",
    ),
    (
        "object with other keys",
        _one({"datatype": "BYTES", "contents": {"bytes_contents": [{"text": "a"}]}}),
        "bytes_contents[0]: expected a string or",
    ),
    (
        "lone surrogate",
        _one({"datatype": "BYTES", "contents": {"bytes_contents": ["\ud800"]}}),
        "bytes_contents[0]: text is not encodable as UTF-8",
    ),
    ("surrogate name", {"inputs": [{"name": "\ud800"}]}, "inputs[0].name: text is not encodable"),
    ("surrogate model", {"inputs": [], "model_name": "\udfff"}, "model_name: text is not"),
    ("surrogate param", {"inputs": [], "parameters": {"k": "\ud800"}}, "parameters.k: text is"),
    ("surrogate key", {"inputs": [], "parameters": {"\ud800": 1}}, "parameters: key"),
    (
        "shape not list",
        _one({"datatype": "BYTES", "shape": 1}),
        "inputs[0].shape: expected an array",
    ),
    (
        "shape element",
        _one({"datatype": "BYTES", "shape": [1, "2"], "data": ["a", "b"]}),
        "inputs[0].shape[1]: expected a non-negative integer",
    ),
    ("negative shape", _one({"datatype": "BYTES", "shape": [-1]}), "inputs[0].shape[0]"),
    (
        "shape disagrees",
        _one({"datatype": "INT32", "shape": [3], "contents": {"int_contents": [1, 2]}}),
        "inputs[0].shape: [3] holds 3 element(s) but contents.int_contents has 2",
    ),
    ("data not list", _one({"datatype": "INT32", "data": 5}), "inputs[0].data: expected an array"),
    (
        "data wrong type",
        _one({"datatype": "INT64", "data": [[1, 2], [3, "x"]]}),
        "inputs[0].data[1][1]: expected an integer, got a string",
    ),
    (
        "ragged data",
        _one({"datatype": "INT64", "data": [[1, 2], [3]]}),
        "inputs[0].data[1]: nested",
    ),
    ("data in too deep", _one({"datatype": "INT64", "data": [1, [2]]}), "inputs[0].data[1]"),
    ("unknown datatype with data", _one({"datatype": "INT4", "data": [1]}), "'INT4' cannot carry"),
    ("mixed data, no datatype", _one({"data": [1, "a"]}), "cannot tell the datatype"),
    ("params not object", {"inputs": [], "parameters": [1]}, "parameters: expected an object"),
    ("param list", {"inputs": [], "parameters": {"k": [1]}}, "parameters.k: expected a string"),
    ("param object", {"inputs": [], "parameters": {"k": {"a": 1}}}, "parameters.k: expected"),
    (
        "param out of range",
        {"inputs": [], "parameters": {"k": UINT64_MAX + 1}},
        "parameters.k: 18446744073709551616 is out of range for int64 and uint64",
    ),
    (
        "typed param wrong",
        {"inputs": [], "parameters": {"k": {"uint64_param": -1}}},
        "parameters.k.uint64_param: -1 is not a valid uint64",
    ),
    (
        "tensor param",
        _one({"datatype": "BYTES", "parameters": {"k": [1]}}),
        "inputs[0].parameters.k: expected",
    ),
    ("outputs not list", {"inputs": [], "outputs": "a"}, "outputs: expected an array"),
    ("output no name", {"inputs": [], "outputs": [{}]}, "outputs[0].name: required"),
    ("output extra key", {"inputs": [], "outputs": [{"name": "a", "x": 1}]}, "outputs[0]: unknown"),
    ("raw not list", {"inputs": [], "raw_input_contents": "AA=="}, "raw_input_contents: expected"),
    (
        "raw bad base64",
        {"inputs": [], "raw_input_contents": ["A"]},
        "raw_input_contents[0]: invalid",
    ),
    (
        "raw not string",
        {"inputs": [], "raw_input_contents": [1]},
        "raw_input_contents[0]: expected",
    ),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_body_is_bad_request_naming_the_field(body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        request_from_json(body)
    assert message in str(info.value)
    assert info.value.status == 400


@pytest.mark.parametrize("data", [b"{", b"", b"\xff", "[1,]", b'{"a": NaN}', 5])
def test_loads_invalid_json(data: Any) -> None:
    with pytest.raises(BadRequest, match=r"^invalid JSON: "):
        loads(data)


def test_response_from_json_names_fields() -> None:
    with pytest.raises(BadRequest, match=r"outputs\[0\]\.contents\.fp32_contents\[0\]"):
        response_from_json({"outputs": [{"name": "y", "contents": {"fp32_contents": ["x"]}}]})
    with pytest.raises(BadRequest, match="request body: expected a JSON object"):
        response_from_json("nope")


def test_stdlib_json_fallback_matches_orjson() -> None:
    body = response_to_json(full_response())
    fallback = tensors._json_dumps(body)
    assert b'": ' not in fallback and b", " not in fallback  # compact separators
    assert "\u4e16".encode() in fallback  # UTF-8, not \\u escapes
    assert tensors._json_loads(fallback) == loads(dumps(body)) == body
    assert tensors._json_loads(memoryview(fallback)) == body
    with pytest.raises(ValueError, match="NaN is not valid JSON"):
        tensors._json_loads(b'{"a": NaN}')


# -- handler helpers --------------------------------------------------------------------


def test_input_text_default_and_errors() -> None:
    request = request_from_json(SEED_BODIES["chat"])
    assert input_text(request) == "Hello World"
    assert input_text(request, "missing") is None
    text: str = input_text(request, "missing", default="x")  # typed str, no None check
    assert text == "x"
    assert input_texts(request, "text") == ["Hello World"]
    with pytest.raises(BadRequest, match=r"missing input 'prompt' \(inputs: 'text'\)"):
        input_texts(request, "prompt")
    binary = request_from_json(
        _one({"datatype": "BYTES", "contents": {"bytes_contents": [{"b64": "/w=="}]}})
    )
    with pytest.raises(BadRequest, match="input 'x' is not valid UTF-8"):
        input_text(binary, "x")
    numbers = request_from_json(_ints([1]))
    with pytest.raises(BadRequest, match="input 'x' is INT32, not BYTES"):
        input_text(numbers, "x")


def test_input_text_from_raw_bytes() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="other", datatype="INT32", shape=[1])
    request.inputs.add(name="text", datatype="BYTES", shape=[2])
    words = ["h\u00e9llo".encode(), b"world"]
    request.raw_input_contents.append(struct.pack("<i", 7))
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(w)) + w for w in words))
    assert input_text(request) == "h\u00e9llo"
    assert input_texts(request, "text") == ["h\u00e9llo", "world"]
    assert input_list(request, "text") == words
    assert input_list(request, "other") == [7]
    request.raw_input_contents[1] = struct.pack("<I", 9) + b"abc"
    with pytest.raises(BadRequest, match="truncated"):
        input_texts(request, "text")


RAW_CASES = [
    ("BOOL", "?", [True, False]),
    ("INT8", "b", [-128, 127]),
    ("INT16", "h", [-32768, 32767]),
    ("INT32", "i", [INT32_MIN, INT32_MAX]),
    ("INT64", "q", [INT64_MIN, INT64_MAX]),
    ("UINT8", "B", [0, 255]),
    ("UINT16", "H", [0, 65535]),
    ("UINT32", "I", [0, UINT32_MAX]),
    ("UINT64", "Q", [0, UINT64_MAX]),
    ("FP16", "e", [0.5, -2.0]),
    ("FP32", "f", [0.5, -2.0]),
    ("FP64", "d", [0.1, -1e300]),
]


@pytest.mark.parametrize(("datatype", "code", "values"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_input_list_from_raw_little_endian(datatype: str, code: str, values: list[Any]) -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype=datatype, shape=[len(values)])
    request.raw_input_contents.append(struct.pack(f"<{len(values)}{code}", *values))
    assert input_list(request, "x") == values


def test_input_list_raw_size_mismatch() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT32", shape=[1])
    request.raw_input_contents.append(b"\x00\x00\x00")
    with pytest.raises(BadRequest, match="not a whole number of INT32 values"):
        input_list(request, "x")


@pytest.mark.parametrize("field", sorted(EDGE_VALUES))
def test_input_list_reads_every_contents_field(field: str) -> None:
    request = full_request()
    assert input_list(request, field) == EDGE_VALUES[field]


def test_text_and_list_outputs() -> None:
    one = text_output("answer", "caf\u00e9")
    assert (one.name, one.datatype, list(one.shape)) == ("answer", "BYTES", [1])
    assert list(one.contents.bytes_contents) == ["caf\u00e9".encode()]
    many = text_output("words", ["a", b"\xff"])
    assert list(many.shape) == [2]
    assert list(many.contents.bytes_contents) == [b"a", b"\xff"]

    embedding = list_output("embedding", [11, 1, 0.5])
    assert (embedding.datatype, list(embedding.shape)) == ("FP32", [3])
    assert list(embedding.contents.fp32_contents) == [11.0, 1.0, 0.5]
    grid = list_output("grid", [1, 2, 3, 4], "INT64", shape=[2, 2])
    assert list(grid.shape) == [2, 2]
    assert list(grid.contents.int64_contents) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown datatype 'FP8'"):
        list_output("x", [1], "FP8")
    with pytest.raises(ValueError, match=r"output 'x'\[0\]: 300 is out of range for INT8"):
        list_output("x", [300], "INT8")


def test_make_response_copies_request_and_builds_outputs() -> None:
    request = request_from_json({**SEED_BODIES["chat"], "model_name": "chat", "id": "r1"})
    request.model_version = "demo"
    response = make_response(
        request,
        list_output("first", [1.0]),
        text="[Chat Response] You said: Hello World",
        tokens=["a", "b"],
        floats=[1, 2.5],
        ints=[1, 2],
        flags=[True, False],
        count=3,
        score=0.5,
        raw=b"\xff",
    )
    assert (response.model_name, response.model_version, response.id) == ("chat", "demo", "r1")
    kinds = {t.name: (t.datatype, list(t.shape)) for t in response.outputs}
    assert kinds == {
        "first": ("FP32", [1]),
        "text": ("BYTES", [1]),
        "tokens": ("BYTES", [2]),
        "floats": ("FP32", [2]),
        "ints": ("INT64", [2]),
        "flags": ("BOOL", [2]),
        "count": ("INT64", [1]),
        "score": ("FP32", [1]),
        "raw": ("BYTES", [1]),
    }
    assert [t.name for t in response.outputs][:2] == ["first", "text"]
    body = response_to_json(response)
    assert body["outputs"][1]["contents"] == {
        "bytes_contents": ["[Chat Response] You said: Hello World"]
    }
    assert make_response(request, model_name="other").model_name == "other"
    assert make_response(text_output("t", "x")).outputs[0].name == "t"
    assert make_response().model_name == ""
    with pytest.raises(TypeError, match="output 'bad'"):
        make_response(request, bad={"a": 1})


def test_demo_embed_output_reads_back() -> None:
    # The demo's embed replica answers FP32 [len, len % 10, 0.5] for input "text".
    request = request_from_json(SEED_BODIES["embed"])
    text = input_text(request) or ""
    response = make_response(request, embedding=[float(len(text)), float(len(text) % 10), 0.5])
    body = through_json(response_to_json(response))
    assert body["outputs"][0]["contents"] == {"fp32_contents": [11.0, 1.0, 0.5]}
    assert response_from_json(body) == response
