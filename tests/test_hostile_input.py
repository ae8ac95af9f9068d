"""Hostile input: property tests of the JSON ⇄ protobuf conversion and of every HTTP route.

The conversion is tested in-process. The routes are tested against one live API server
and one replica shared by the whole module: malformed, oversized, deeply nested and
mistyped bodies, and random headers. Every answer must be a 2xx or 4xx (or the status
the request itself asked for, such as 504 for a tiny X-Request-Timeout), carry a JSON
error body when it is an error, and show no traceback; no process may crash.

Each route gets ``ANYSERVE_FUZZ_EXAMPLES`` examples (500 by default, which keeps the file
under a minute on two cores); raise it for a longer run by hand, e.g.
``ANYSERVE_FUZZ_EXAMPLES=20000 pytest tests/test_hostile_input.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.errors import BadRequest
from anyserve.tensors import (
    dumps,
    loads,
    request_from_json,
    request_to_json,
    response_from_json,
    response_to_json,
)

from .conftest import ApiServer, Procs, start_api_server, start_replica

EXAMPLES = int(os.environ.get("ANYSERVE_FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
#: The fuzzed server's body limit: small, so that oversized bodies are cheap to send.
LIMIT = 64 * 1024

# ---------------------------------------------------------------------- strategies


def encode(value: Any) -> bytes:
    """JSON text of ``value`` (the standard library's: it writes integers of any size)."""
    return json.dumps(value).encode()


# Text protobuf can carry (no lone surrogates), short.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
names = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)
datatypes = st.sampled_from(
    ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
     "FP16", "FP32", "FP64", "BYTES", "STRING", "", "int32", "FP128"]
)  # fmt: skip
content_fields = st.sampled_from(
    ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
     "fp32_contents", "fp64_contents", "bytes_contents", "b64", "data", "nope"]
)  # fmt: skip


@st.composite
def near_tensors(draw: st.DrawFn) -> Any:
    """Tensors that are nearly right: the keys exist, their values are anything."""
    tensor: dict[str, Any] = {}
    scalar_lists = st.lists(json_scalars, max_size=5)
    for key, values in [
        ("name", st.one_of(texts, json_values)),
        ("datatype", st.one_of(datatypes, json_values)),
        ("shape", st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_values)),
        ("contents", st.dictionaries(content_fields, scalar_lists | json_values, max_size=2)),
        ("data", st.one_of(scalar_lists, json_values)),
        ("parameters", st.dictionaries(texts, json_scalars, max_size=3)),
    ]:
        if draw(st.booleans()):
            tensor[key] = draw(values)
    return tensor


@st.composite
def near_requests(draw: st.DrawFn) -> Any:
    """Request bodies that are nearly right, so that parsing gets past the first check."""
    body: dict[str, Any] = {"inputs": draw(st.lists(near_tensors(), max_size=3))}
    output_keys = st.sampled_from(["name", "parameters", "x"])
    for key, values in [
        ("id", json_values),
        ("model_name", json_values),
        ("parameters", st.dictionaries(texts, json_values, max_size=3) | json_values),
        ("outputs", st.lists(st.dictionaries(output_keys, json_values), max_size=2) | json_values),
        ("raw_input_contents", st.lists(texts | json_scalars, max_size=2) | json_values),
    ]:
        if draw(st.booleans()):
            body[key] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(texts)] = draw(json_values)  # an unknown key
    return body


# Values each datatype can carry exactly, for the round trip.
_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_VALUES: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "BOOL": ("bool_contents", st.booleans()),
    "INT8": ("int_contents", st.integers(-(2**7), 2**7 - 1)),
    "INT16": ("int_contents", st.integers(-(2**15), 2**15 - 1)),
    "INT32": ("int_contents", st.integers(-(2**31), 2**31 - 1)),
    "INT64": ("int64_contents", st.integers(-(2**63), 2**63 - 1)),
    "UINT8": ("uint_contents", st.integers(0, 2**8 - 1)),
    "UINT16": ("uint_contents", st.integers(0, 2**16 - 1)),
    "UINT32": ("uint_contents", st.integers(0, 2**32 - 1)),
    "UINT64": ("uint64_contents", st.integers(0, 2**64 - 1)),
    "FP16": ("fp32_contents", st.floats(width=16, allow_nan=False, allow_infinity=False)),
    "FP32": ("fp32_contents", _FLOAT32),
    "FP64": ("fp64_contents", st.floats(allow_nan=False, allow_infinity=False)),
    "BYTES": ("bytes_contents", st.binary(max_size=12) | texts.map(str.encode)),
}
# JSON numbers cannot say whether a parameter was int64 or uint64: only int64 is generated.
_PARAMS = st.dictionaries(
    texts,
    st.one_of(
        st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
        st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: pb.InferParameter(string_param=v), texts),
        st.builds(
            lambda v: pb.InferParameter(double_param=v),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
    ),
    max_size=3,
)


@st.composite
def tensors(draw: st.DrawFn, message: Any) -> None:
    datatype = draw(st.sampled_from(sorted(_VALUES)))
    field, values = _VALUES[datatype]
    items = draw(st.lists(values, max_size=6))
    tensor = message.add(name=draw(names), datatype=datatype)
    tensor.shape.append(len(items))
    if items:  # (no values: no contents message, as the JSON side reads it)
        getattr(tensor.contents, field).extend(items)
    for key, param in draw(_PARAMS).items():
        tensor.parameters[key].CopyFrom(param)


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(texts), model_version=draw(texts), id=draw(texts)
    )
    for key, param in draw(_PARAMS).items():
        request.parameters[key].CopyFrom(param)
    for _ in range(draw(st.integers(0, 3))):
        draw(tensors(request.inputs))
    for name in draw(st.lists(names, max_size=2)):
        request.outputs.add(name=name)
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=2)))
    return request


@st.composite
def responses(draw: st.DrawFn) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=draw(texts), id=draw(texts))
    for _ in range(draw(st.integers(0, 3))):
        draw(tensors(response.outputs))
    response.raw_output_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=2)))
    return response


# ---------------------------------------------------------------------- the conversion


@FUZZ
@given(st.one_of(json_values, near_requests()))
def test_request_from_json_raises_nothing_but_bad_request(body: Any) -> None:
    try:
        request_from_json(body)
    except BadRequest as exc:
        assert exc.message
        assert "Traceback" not in exc.message


@FUZZ
@given(st.binary(max_size=200) | json_values.map(encode))
def test_loads_raises_nothing_but_bad_request(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        loads(data)


@FUZZ
@given(requests())
def test_requests_round_trip(request: pb.ModelInferRequest) -> None:
    body = loads(dumps(request_to_json(request)))
    assert request_from_json(body) == request


@FUZZ
@given(responses())
def test_responses_round_trip(response: pb.ModelInferResponse) -> None:
    body = loads(dumps(response_to_json(response)))
    assert response_from_json(body) == response


@FUZZ
@given(near_requests())
def test_what_parses_is_a_fixed_point(body: Any) -> None:
    """Whatever request_from_json accepts, its JSON form reads back the same."""
    try:
        request = request_from_json(body)
    except BadRequest:
        return
    again = request_to_json(request)
    assert request_to_json(request_from_json(loads(dumps(again)))) == again


# ---------------------------------------------------------------------- the live server


class Target:
    def __init__(self, api: ApiServer, procs: Procs) -> None:
        self.api = api
        self.procs = procs
        self.client = httpx.Client(base_url=api.url, timeout=30)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("hostile")
    procs = Procs(tmp)
    try:
        api = start_api_server(
            procs,
            lease_ttl=30.0,
            extra=[
                "--max-body-size", str(LIMIT),
                "--object-store", str(tmp / "objects"),
                "--max-object-size", str(LIMIT),
                # Every example should reach the route, not the rate limiter.
                "--register-rate", "1000000", "--register-burst", "1000000",
                "--log-level", "warning",
            ],
        )  # fmt: skip
        start_replica(procs, "tests.apps.rel_echo:app", api_server=api, replica_id="echo-target")
        target = Target(api, procs)
        yield target
        target.client.close()
    finally:
        procs.stop_all()


_TOKEN_CHARS = string.ascii_letters + string.digits + "-_"
_VALUE_CHARS = (
    string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "").replace("\x0c", "")
)
# Headers the server reads, fuzzed with random values; and random ones.
_KNOWN_HEADERS = [
    "x-capability-type", "x-capability-model", "x-capability-stream", "x-request-id",
    "x-request-timeout", "x-delegated-from", "x-delegation-depth", "content-type",
    "content-encoding", "inference-header-content-length", "authorization",
]  # fmt: skip
_RESERVED = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect"}
# Header values: printable ASCII, or any text sent as its UTF-8 bytes.
header_values = st.one_of(
    st.text(_VALUE_CHARS, max_size=24).map(str.strip),
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=12).map(
        lambda text: text.strip().encode()
    ),
)
headers_strategy = st.dictionaries(
    st.one_of(
        st.sampled_from(_KNOWN_HEADERS),
        st.text(_TOKEN_CHARS, min_size=1, max_size=16).map(str.lower),
    ).filter(lambda name: name not in _RESERVED),
    header_values,
    max_size=4,
)
capability_headers = st.fixed_dictionaries(
    {"x-capability-type": st.sampled_from(["echo", "echo", "echo", "missing"]) | header_values}
)


Headers = dict[str, "str | bytes"]


def _nested(depth: int, brackets: str) -> bytes:
    return (brackets[0] * depth + brackets[1] * depth).encode()


bodies = st.one_of(
    near_requests().map(encode),
    json_values.map(encode),
    st.binary(max_size=300),
    st.builds(_nested, st.integers(1, 200_000), st.sampled_from(["[]", "{}"])),
    st.builds(lambda n: b'{"inputs": "' + b"x" * n + b'"}', st.integers(LIMIT - 20, LIMIT + 20)),
    requests().map(lambda r: r.SerializeToString()),
)


def check(reply: httpx.Response, sent: Headers) -> None:
    """The properties every answer must have."""
    allowed = set(range(200, 300)) | set(range(400, 500))
    lowered = {k.lower(): v for k, v in sent.items()}
    if "x-request-timeout" in lowered:
        allowed.add(504)  # the deadline the client asked for ran out
    if "x-delegation-depth" in lowered:
        allowed.add(508)  # the client said the request had been delegated too often
    text = reply.text
    assert reply.status_code in allowed, (reply.status_code, text[:500])
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    if reply.status_code >= 400:
        try:
            body = json.loads(text)
        except ValueError:
            raise AssertionError(
                f"{reply.status_code} without a JSON body: {text[:300]!r}"
            ) from None
        assert isinstance(body, dict) and ({"detail", "error"} & body.keys()), text[:300]


def _send(
    target: Target,
    method: str,
    path: str,
    headers: Headers,
    content: bytes | None = None,
) -> None:
    try:
        reply = target.client.request(method, path, headers=headers, content=content)
    except httpx.LocalProtocolError:
        return  # a header httpx itself will not send
    check(reply, headers)


@FUZZ
@given(headers=headers_strategy, caps=capability_headers, body=bodies)
def test_infer_json(target: Target, headers: Headers, caps: Headers, body: bytes) -> None:
    _send(target, "POST", "/infer/json", {**caps, **headers}, body)


@FUZZ
@given(headers=headers_strategy, caps=capability_headers, body=bodies)
def test_infer_protobuf(target: Target, headers: Headers, caps: Headers, body: bytes) -> None:
    _send(
        target,
        "POST",
        "/infer",
        {"content-type": "application/x-protobuf", **caps, **headers},
        body,
    )


@FUZZ
@given(
    headers=headers_strategy,
    caps=capability_headers,
    body=bodies,
    protobuf=st.booleans(),
)
def test_infer_stream(
    target: Target, headers: Headers, caps: Headers, body: bytes, protobuf: bool
) -> None:
    kind = {"content-type": "application/x-protobuf"} if protobuf else {}
    _send(target, "POST", "/infer/stream", {**kind, **caps, **headers}, body)


@FUZZ
@given(
    headers=headers_strategy,
    name=st.sampled_from(["echo", "missing"]) | names,
    version=st.none() | names,
    body=bodies,
)
def test_v2_infer(
    target: Target, headers: Headers, name: str, version: str | None, body: bytes
) -> None:
    path = f"/v2/models/{quote(name, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    _send(target, "POST", path + "/infer", headers, body)


# Registrations that are nearly right: a small pool of ids, so the registry stays small.
registration_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "replica_id": st.sampled_from(["fz-a", "fz-b", "fz-c"]) | json_values,
            "endpoint": st.sampled_from(["127.0.0.1:1", "[::1]:2", "localhost:3", "10.0.0.1:4"])
            | texts
            | json_values,
            "capabilities": st.lists(
                st.dictionaries(texts, json_scalars, max_size=3) | json_values, max_size=3
            )
            | json_values,
        },
        optional={
            "instance": texts | json_values,
            "max_in_flight": st.integers(-5, 10**6) | json_values,
        },
    ),
)


@FUZZ
@given(
    headers=headers_strategy,
    path=st.sampled_from(["/register", "/heartbeat", "/unregister"]),
    body=st.one_of(registration_bodies.map(encode), bodies),
)
def test_registration_routes(target: Target, headers: Headers, path: str, body: bytes) -> None:
    _send(target, "POST", path, headers, body)


@FUZZ
@given(
    headers=headers_strategy,
    key=texts,
    kind=st.sampled_from(["json", "bytes", "pickle", ""]),
    body=st.binary(max_size=200),
    action=st.sampled_from(["POST", "GET", "DELETE"]),
)
def test_object_routes(
    target: Target, headers: Headers, key: str, kind: str, body: bytes, action: str
) -> None:
    if action == "POST":
        _send(target, "POST", f"/objects?key={quote(key, safe='')}&type={kind}", headers, body)
    else:
        _send(target, action, f"/objects/{quote(key, safe='')}", headers)


@FUZZ
@given(
    headers=headers_strategy,
    path=st.sampled_from(
        [
            "/health",
            "/registry",
            "/stats",
            "/metrics",
            "/openapi.json",
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/echo",
            "/v2/models/echo/ready",
            "/objects",
            "/nowhere",
        ]
    ),
    method=st.sampled_from(["GET", "GET", "GET", "PUT", "PATCH", "DELETE", "OPTIONS"]),
)
def test_every_other_route(target: Target, headers: Headers, path: str, method: str) -> None:
    _send(target, method, path, headers)


raw_requests = st.builds(
    lambda method, path, version, headers: (
        b"%s %s %s\r\n%s\r\n\r\n" % (method, path, version, b"\r\n".join(headers))
    ),
    st.sampled_from([b"GET", b"POST", b"DELETE", b"BREW", b""]) | st.binary(max_size=8),
    st.sampled_from([b"/health", b"/registry", b"/infer/json", b"/v2", b"*", b""])
    | st.binary(max_size=40),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/9.9", b""])
    | st.binary(max_size=10),
    st.lists(st.binary(max_size=40), max_size=4),
)


@FUZZ
@given(raw_requests)
def test_malformed_http(target: Target, request: bytes) -> None:
    """Bytes that are barely HTTP, sent over a socket: still a JSON answer."""
    with socket.create_connection(("127.0.0.1", target.api.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        fields = head.split(b"\r\n")
        assert fields[0][:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), data[:200]
        status = int(fields[0][9:12])
        assert 200 <= status < 300 or 400 <= status < 500, data[:300]
        lengths = [int(f[15:]) for f in fields if f.lower().startswith(b"content-length:")]
        if status >= 400 and lengths:
            while len(body) < lengths[0] and (chunk := sock.recv(65536)):
                body += chunk
            reply = json.loads(body)
            assert {"detail", "error"} & reply.keys(), body[:300]


def test_nothing_crashed(target: Target) -> None:
    assert target.api.proc.alive()
    assert all(proc.alive() for proc in target.procs.started)
    assert target.client.get("/health").status_code == 200
    reply = target.client.post(
        "/infer/json",
        json={"inputs": []},
        headers={"x-capability-type": "echo"},
    )
    assert reply.status_code == 200
