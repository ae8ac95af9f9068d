"""KServe v2 REST on the API server: health, metadata, readiness, JSON and binary inference.

One API server with the demo chat replica and the tensor test app is shared by the module;
the codec functions and the routes that need no replica are tested in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.api_server import ApiServerConfig, create_app
from anyserve.errors import AnyServeError, BadRequest
from anyserve.kserve import (
    decode_request,
    encode_response,
    raw_tensor,
    split_bytes,
    with_raw_outputs,
)
from anyserve.registry import Registry
from anyserve.tensors import list_output, make_response, text_output

from .conftest import ApiServer, Procs, free_port, start_api_server, start_replica

TENSOR_APP = "tests.apps.tensor_app:app"


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("kserve")
    procs = Procs(tmp)
    try:
        grpc_port = free_port()
        server = start_api_server(
            procs,
            extra=["--object-store", str(tmp / "objects"), "--grpc-port", str(grpc_port)],
        )
        server.grpc_address = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
        for app, rid in [("examples.mvp_demo.chat_app:app", "chat"), (TENSOR_APP, "tensors")]:
            start_replica(
                procs,
                app,
                api_server=server,
                object_store=tmp / "objects",
                replica_id=rid,
                wait=False,
            )
        server.wait_registered(2, timeout=30)
        yield server
    finally:
        procs.stop_all()


def get(api: ApiServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(api.url + path, timeout=30, **kwargs)


def infer(api: ApiServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(api.url + path, json=body, timeout=30, **kwargs)


def binary_infer(
    api: ApiServer, path: str, header: dict[str, Any], *blobs: bytes, **kwargs: Any
) -> httpx.Response:
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), **kwargs.pop("headers", {})}
    return httpx.post(
        api.url + path, content=head + b"".join(blobs), headers=headers, timeout=30, **kwargs
    )


def split_reply(reply: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary reply's JSON header and each binary output's bytes by name."""
    length = int(reply.headers["Inference-Header-Content-Length"])
    header = json.loads(reply.content[:length])
    blobs, pos = {}, length
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = reply.content[pos : pos + size]
            pos += size
    assert pos == len(reply.content)
    return header, blobs


TEXT = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}


# ---------------------------------------------------------------------- health and metadata


def test_live_ready_and_server_metadata(api: ApiServer) -> None:
    live = get(api, "/v2/health/live")
    assert (live.status_code, live.content) == (200, b"")
    ready = get(api, "/v2/health/ready")
    assert (ready.status_code, ready.content) == (200, b"")
    meta = get(api, "/v2").json()
    assert meta["name"] == "anyserve"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_not_ready_without_replicas() -> None:
    app = create_app(ApiServerConfig(), Registry())

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return [
                await client.get("/v2/health/live"),
                await client.get("/v2/health/ready"),
                await client.get("/v2/models/chat/ready"),
            ]

    live, ready, model = asyncio.run(go())
    assert live.status_code == 200
    assert ready.status_code == 400
    assert "no replica is registered" in ready.json()["error"]
    assert model.status_code == 404
    assert "no replicas are registered" in model.json()["error"]


def _asgi(app: Any, *requests: tuple[str, str]) -> list[httpx.Response]:
    """Send ``(method, path)`` requests (JSON ``{"inputs": []}`` bodies) to an ASGI app."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return [
                await client.request(method, path, json={"inputs": [TEXT]})
                for method, path in requests
            ]

    return asyncio.run(go())


def test_v2_errors_keep_their_headers() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from anyserve.errors import Unauthorized
    from anyserve.kserve import _v2
    from anyserve.registry import TooManyRegistrations

    async def limited(request: Any) -> Any:
        raise TooManyRegistrations("slow down", retry_after=2.5)

    async def refused(request: Any) -> Any:
        raise Unauthorized("who are you?")

    app = Starlette(routes=[Route("/429", _v2(limited)), Route("/401", _v2(refused))])
    too_many, unauthorized = _asgi(app, ("GET", "/429"), ("GET", "/401"))
    assert (too_many.status_code, too_many.json()) == (429, {"error": "slow down"})
    assert too_many.headers["Retry-After"] == "3"
    assert (unauthorized.status_code, unauthorized.json()) == (401, {"error": "who are you?"})
    assert unauthorized.headers["WWW-Authenticate"] == 'Bearer realm="anyserve"'


def test_v2_infer_beyond_the_limit_and_the_queue_is_503_with_retry_after() -> None:
    from .reliability import registration, take

    registry = Registry(max_queue=0)
    registry.register(registration("busy", max_in_flight=1))
    take(registry, {"type": "chat"})  # its only slot is taken
    (shed,) = _asgi(create_app(ApiServerConfig(), registry), ("POST", "/v2/models/chat/infer"))
    assert shed.status_code == 503
    assert shed.headers["Retry-After"] == "1"
    assert "requests are already waiting" in shed.json()["error"]


def test_model_metadata_lists_the_registered_versions(api: ApiServer) -> None:
    assert get(api, "/v2/models/chat").json() == {
        "name": "chat",
        "versions": ["demo", "with-embedding"],
        "platform": "anyserve",
        "inputs": [],
        "outputs": [],
    }
    assert get(api, "/v2/models/echo").json()["versions"] == ["v1", "v2"]
    one = get(api, "/v2/models/echo/versions/v2").json()
    assert (one["name"], one["versions"]) == ("echo", ["v2"])
    assert get(api, "/v2/models/raw").json()["versions"] == []


def test_model_metadata_of_an_unknown_model_is_404_naming_what_exists(api: ApiServer) -> None:
    reply = get(api, "/v2/models/nope")
    assert reply.status_code == 404
    assert "type=nope" in reply.json()["error"]
    assert "type=chat model=demo" in reply.json()["error"]
    assert get(api, "/v2/models/chat/versions/v9").status_code == 404


def test_model_ready(api: ApiServer) -> None:
    assert get(api, "/v2/models/chat/ready").status_code == 200
    assert get(api, "/v2/models/chat/versions/demo/ready").status_code == 200
    assert get(api, "/v2/models/talk/ready").status_code == 200  # a streaming capability
    missing = get(api, "/v2/models/chat/versions/nope/ready")
    assert missing.status_code == 404
    assert "type=chat model=nope" in missing.json()["error"]


def test_capability_headers_add_keys(api: ApiServer) -> None:
    assert get(api, "/v2/models/chat/ready", headers={"X-Capability-Model": "demo"}).is_success
    narrowed = get(api, "/v2/models/chat", headers={"X-Capability-Model": "with-embedding"})
    assert narrowed.json()["versions"] == ["with-embedding"]
    assert get(api, "/v2/models/chat/ready", headers={"X-Capability-Gpus": "8"}).status_code == 404
    # The path's version wins over a header naming another one.
    reply = infer(
        api,
        "/v2/models/chat/versions/demo/infer",
        {"inputs": [TEXT]},
        headers={"X-Capability-Model": "with-embedding"},
    )
    assert reply.json()["outputs"][0]["data"] == ["[Chat Response] You said: Hello"]


# ---------------------------------------------------------------------- JSON inference


def test_infer_json(api: ApiServer) -> None:
    reply = infer(api, "/v2/models/chat/versions/demo/infer", {"id": "r-1", "inputs": [TEXT]})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["X-AnyServe-Replica"] == "chat"
    assert reply.json() == {
        "model_name": "chat",
        "model_version": "demo",
        "id": "r-1",
        "outputs": [
            {
                "name": "text_output",
                "datatype": "BYTES",
                "shape": [1],
                "data": ["[Chat Response] You said: Hello"],
            }
        ],
    }


def test_infer_without_version_names_the_version_that_answered(api: ApiServer) -> None:
    body = infer(api, "/v2/models/echo/infer", {"inputs": [TEXT]}).json()
    assert body["model_version"] in ("v1", "v2")


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("BOOL", [True, False, True, True]),
        ("INT8", [-128, 0, 5, 127]),
        ("UINT8", [0, 1, 200, 255]),
        ("INT32", [-(2**31), 0, 7, 2**31 - 1]),
        ("INT64", [-(2**63), 0, 7, 2**63 - 1]),
        ("UINT64", [0, 1, 2, 2**64 - 1]),
        ("FP32", [0.5, -1.25, 3.0, 1e-3]),
        ("FP64", [0.1, -1e300, 2.5, 3.0]),
        ("BYTES", ["a", "", "ünïcode", "d"]),
    ],
)
def test_json_tensors_round_trip(api: ApiServer, datatype: str, data: list[Any]) -> None:
    tensor = {"name": "x", "shape": [2, 2], "datatype": datatype, "data": data}
    reply = infer(api, "/v2/models/echo/versions/v1/infer", {"inputs": [tensor]})
    assert reply.status_code == 200, reply.text
    (out,) = reply.json()["outputs"]
    assert out == {"name": "x_out", "datatype": datatype, "shape": [2, 2], "data": data}


def test_nested_data_and_parameters(api: ApiServer) -> None:
    body = {
        "parameters": {"temperature": 0.5, "tag": "t"},
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}],
    }
    reply = infer(api, "/v2/models/echo/versions/v1/infer", body).json()
    assert reply["parameters"] == {"tag": "t", "temperature": 0.5}
    assert reply["outputs"][0]["data"] == [1, 2, 3, 4]


def test_requested_outputs_are_filtered(api: ApiServer) -> None:
    inputs = [
        {"name": "a", "shape": [1], "datatype": "INT32", "data": [1]},
        {"name": "b", "shape": [1], "datatype": "INT32", "data": [2]},
    ]
    reply = infer(
        api, "/v2/models/echo/versions/v1/infer", {"inputs": inputs, "outputs": [{"name": "b_out"}]}
    ).json()
    assert [o["name"] for o in reply["outputs"]] == ["b_out"]
    missing = infer(
        api, "/v2/models/echo/versions/v1/infer", {"inputs": inputs, "outputs": [{"name": "c"}]}
    )
    assert missing.status_code == 400
    assert "a_out, b_out" in missing.json()["error"]


def test_raw_outputs_become_json_data(api: ApiServer) -> None:
    reply = infer(api, "/v2/models/raw/infer", {"inputs": []}).json()
    assert reply["outputs"] == [
        {"name": "floats", "datatype": "FP32", "shape": [2, 2], "data": [1.5, -2.0, 0.25, 8.0]},
        {"name": "words", "datatype": "BYTES", "shape": [2], "data": ["hi", "you"]},
    ]


def test_gzip_body(api: ApiServer) -> None:
    body = gzip.compress(json.dumps({"inputs": [TEXT]}).encode())
    reply = httpx.post(
        api.url + "/v2/models/chat/versions/demo/infer",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert reply.json()["outputs"][0]["data"] == ["[Chat Response] You said: Hello"]


# ---------------------------------------------------------------------- binary inference


def test_binary_in_binary_out(api: ApiServer) -> None:
    header = {
        "inputs": [
            {
                "name": "text",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 9},
            }
        ]
    }
    reply = binary_infer(
        api, "/v2/models/chat/versions/demo/infer", header, length_prefixed(b"Hello")
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/octet-stream"
    head, blobs = split_reply(reply)
    (out,) = head["outputs"]
    assert "data" not in out
    assert split_bytes(blobs["text_output"]) == [b"[Chat Response] You said: Hello"]


def test_binary_numeric_and_mixed_inputs(api: ApiServer) -> None:
    floats = struct.pack("<3f", 1.0, 2.5, -4.0)
    header = {
        "inputs": [
            {"name": "f", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}},
            {"name": "i", "shape": [2], "datatype": "INT64", "data": [5, -6]},
        ],
        # The FP32 output in binary, the INT64 one as JSON.
        "outputs": [
            {"name": "f_out", "parameters": {"binary_data": True}},
            {"name": "i_out", "parameters": {"binary_data": False}},
        ],
    }
    reply = binary_infer(api, "/v2/models/echo/versions/v1/infer", header, floats)
    assert reply.status_code == 200, reply.text
    head, blobs = split_reply(reply)
    assert blobs == {"f_out": floats}
    assert head["outputs"][1] == {
        "name": "i_out",
        "datatype": "INT64",
        "shape": [2],
        "data": [5, -6],
    }


def test_binary_data_output_false_answers_json(api: ApiServer) -> None:
    header = {
        "parameters": {"binary_data_output": False},
        "inputs": [
            {
                "name": "text",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 9},
            }
        ],
    }
    reply = binary_infer(
        api, "/v2/models/chat/versions/demo/infer", header, length_prefixed(b"Hello")
    )
    assert "Inference-Header-Content-Length" not in reply.headers
    assert reply.json()["outputs"][0]["data"] == ["[Chat Response] You said: Hello"]


def test_binary_data_output_on_a_json_request(api: ApiServer) -> None:
    body = {"parameters": {"binary_data_output": True}, "inputs": [TEXT]}
    reply = infer(api, "/v2/models/chat/versions/demo/infer", body)
    _, blobs = split_reply(reply)
    assert split_bytes(blobs["text_output"]) == [b"[Chat Response] You said: Hello"]


def test_transport_parameters_do_not_reach_the_handler(api: ApiServer) -> None:
    header = {
        "parameters": {"binary_data_output": False, "kept": 1},
        "inputs": [
            {"name": "x", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}
        ],
    }
    reply = binary_infer(api, "/v2/models/echo/versions/v1/infer", header, struct.pack("<i", 9))
    assert reply.json()["parameters"] == {"kept": 1}
    assert reply.json()["outputs"][0]["data"] == [9]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("header", "blob", "length", "message"),
    [
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [2],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\0" * 4,
            None,
            "runs past the end",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\0" * 8,
            None,
            "4 binary bytes that no input",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [3],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\0" * 8,
            None,
            "holds 3 element(s) but its binary data has 2",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": 3},
                    }
                ]
            },
            b"\0" * 3,
            None,
            "not a whole number of INT32",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 6},
                    }
                ]
            },
            struct.pack("<I", 9) + b"ab",
            None,
            "runs past the data",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\0" * 4,
            "99999",
            "Inference-Header-Content-Length",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": -1},
                    }
                ]
            },
            b"",
            None,
            "binary_data_size",
        ),
        (
            {
                "inputs": [
                    {"name": "h", "shape": [1], "datatype": "FP16", "data": [1e10]},
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "INT32",
                        "parameters": {"binary_data_size": 4},
                    },
                ]
            },
            b"\0" * 4,
            None,
            "do not fit FP16",
        ),
    ],
)
def test_malformed_binary_requests_are_400(
    api: ApiServer, header: dict[str, Any], blob: bytes, length: str | None, message: str
) -> None:
    head = json.dumps(header).encode()
    reply = httpx.post(
        api.url + "/v2/models/echo/versions/v1/infer",
        content=head + blob,
        headers={"Inference-Header-Content-Length": length or str(len(head))},
    )
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


def test_binary_size_without_the_header_is_400(api: ApiServer) -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}
    reply = infer(api, "/v2/models/echo/versions/v1/infer", {"inputs": [tensor]})
    assert reply.status_code == 400
    assert "Inference-Header-Content-Length" in reply.json()["error"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "body is empty"),
        (b"{", "invalid JSON"),
        (b"[]", "JSON object"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1]}]}', "shape"),
        (b'{"inputs": [{"name": "x", "datatype": "INT8", "data": [300]}]}', "out of range"),
        (b'{"input": []}', "unknown field"),
        (b'{"inputs": [], "outputs": 0.5}', "outputs: expected an array"),
        (b'{"inputs": [], "outputs": "ab"}', "outputs: expected an array"),
        (b'{"inputs": {}}', "inputs: expected an array"),
        (b'{"inputs": [], "parameters": []}', "parameters: expected an object"),
    ],
)
def test_malformed_json_requests_are_400(api: ApiServer, content: bytes, message: str) -> None:
    reply = httpx.post(api.url + "/v2/models/echo/versions/v1/infer", content=content)
    assert reply.status_code == 400
    assert message in reply.json()["error"]


def test_status_codes_of_failures(api: ApiServer) -> None:
    unknown = infer(api, "/v2/models/nope/infer", {"inputs": [TEXT]})
    assert unknown.status_code == 404
    assert "registered:" in unknown.json()["error"]
    boom = infer(api, "/v2/models/boom/infer", {"inputs": [TEXT]})
    assert boom.status_code == 500
    assert boom.json() == {"error": "ValueError: the model exploded"}
    stream_only = infer(api, "/v2/models/talk/infer", {"inputs": [TEXT]})
    assert stream_only.status_code == 404
    timeout = infer(
        api, "/v2/models/chat/infer", {"inputs": [TEXT]}, headers={"X-Request-Timeout": "x"}
    )
    assert timeout.status_code == 400
    assert "X-Request-Timeout" in timeout.json()["error"]


def test_unknown_v2_paths_and_methods_answer_in_the_v2_shape(api: ApiServer) -> None:
    config = get(api, "/v2/models/chat/trace/setting")
    assert config.status_code == 404
    assert "model repository" in config.json()["error"]
    wrong = httpx.delete(api.url + "/v2/models/chat/ready")
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "GET, HEAD"
    assert "DELETE is not allowed" in wrong.json()["error"]


def test_request_id_is_echoed(api: ApiServer) -> None:
    reply = infer(
        api, "/v2/models/chat/infer", {"inputs": [TEXT]}, headers={"X-Request-ID": "v2-req"}
    )
    assert reply.headers["X-Request-ID"] == "v2-req"


# ---------------------------------------------------------------------- the codec


def test_split_bytes() -> None:
    assert split_bytes(length_prefixed(b"a", b"", b"xyz")) == [b"a", b"", b"xyz"]
    assert split_bytes(b"") == []
    with pytest.raises(BadRequest, match="inside a 4-byte length"):
        split_bytes(b"\1\0")


def test_raw_tensor_layouts() -> None:
    assert raw_tensor(text_output("t", ["ab", "c"])) == length_prefixed(b"ab", b"c")
    assert raw_tensor(list_output("f", [1.0, 2.0], "FP32")) == struct.pack("<2f", 1.0, 2.0)
    assert raw_tensor(list_output("h", [1.5], "FP16")) == struct.pack("<e", 1.5)
    assert raw_tensor(list_output("b", [True, False], "BOOL")) == b"\1\0"
    assert raw_tensor(list_output("u", [2**64 - 1], "UINT64")) == b"\xff" * 8


def test_with_raw_outputs() -> None:
    response = make_response(None, text_output=["x", "yz"], n=[1, 2])
    raw = with_raw_outputs(response)
    assert list(raw.raw_output_contents) == [length_prefixed(b"x", b"yz"), struct.pack("<2q", 1, 2)]
    assert not any(t.HasField("contents") for t in raw.outputs)
    assert [t.name for t in raw.outputs] == ["text_output", "n"]
    assert with_raw_outputs(raw) is raw
    assert response.outputs[0].contents.bytes_contents == [b"x", b"yz"]  # the original is untouched


def test_decode_request_puts_every_input_raw_when_one_is_binary() -> None:
    header = {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "INT32", "data": [7]},
            {"name": "b", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}},
        ]
    }
    head = json.dumps(header).encode()
    request, wanted = decode_request(head + struct.pack("<i", 8), len(head))
    assert list(request.raw_input_contents) == [struct.pack("<i", 7), struct.pack("<i", 8)]
    assert not any(t.HasField("contents") for t in request.inputs)
    assert not request.inputs[1].parameters
    assert wanted == {"*": True}


def test_decode_request_json_only() -> None:
    request, wanted = decode_request(json.dumps({"inputs": [TEXT]}).encode(), None)
    assert request.inputs[0].contents.bytes_contents == [b"Hello"]
    assert not request.raw_input_contents
    assert wanted is None


def test_encode_response_json_and_binary() -> None:
    response = make_response(None, text_output="hi", v=[1.5])
    body, length = encode_response(response, None, "m", "1", "id-1")
    assert length is None
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "id-1",
        "outputs": [
            {"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
            {"name": "v", "datatype": "FP32", "shape": [1], "data": [1.5]},
        ],
    }
    body, length = encode_response(response, {"v": True}, "m", "", "")
    assert length is not None
    assert json.loads(body[:length])["outputs"] == [
        {"name": "v", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}
    ]
    assert body[length:] == struct.pack("<f", 1.5)


def test_non_utf8_bytes_in_json_replies_are_base64_items() -> None:
    response = pb.ModelInferResponse()
    response.outputs.append(text_output("t", [b"\xff\xfe"]))
    body, _ = encode_response(response, None, "m", "", "")
    assert json.loads(body)["outputs"][0]["data"] == [{"b64": "//4="}]


# ---------------------------------------------------------------------- the gRPC ingress


@pytest.fixture
def stub(api: ApiServer) -> Iterator[pbg.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(api.grpc_address) as channel:  # type: ignore[attr-defined]
        yield pbg.GRPCInferenceServiceStub(channel)


def text_request(model: str, version: str = "", text: str = "Hello") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.append(pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES"))
    request.inputs[0].shape.append(1)
    request.inputs[0].contents.bytes_contents.append(text.encode())
    return request


def test_grpc_health_and_metadata(stub: pbg.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, "binary_tensor_data" in meta.extensions) == ("anyserve", True)
    assert stub.ModelReady(pb.ModelReadyRequest(name="chat", version="demo")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="talk")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="chat", version="nope")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest()).ready
    model = stub.ModelMetadata(pb.ModelMetadataRequest(name="echo"))
    assert (list(model.versions), model.platform) == (["v1", "v2"], "anyserve")
    with pytest.raises(grpc.RpcError) as missing:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "type=chat model=demo" in (missing.value.details() or "")


def test_grpc_model_infer_routes_by_name_version_and_metadata(
    stub: pbg.GRPCInferenceServiceStub,
) -> None:
    reply, call = stub.ModelInfer.with_call(text_request("chat", "demo"))
    assert list(reply.outputs[0].contents.bytes_contents) == [b"[Chat Response] You said: Hello"]
    assert (reply.model_name, reply.model_version) == ("chat", "demo")
    assert ("x-anyserve-replica", "chat") in call.initial_metadata()
    # x-capability-* metadata adds keys, as X-Capability-* headers do over HTTP.
    via_metadata = stub.ModelInfer(
        text_request("chat"), metadata=(("x-capability-model", "demo"), ("x-request-id", "g-1"))
    )
    assert via_metadata.model_version == "demo"
    with pytest.raises(grpc.RpcError) as wrong:
        stub.ModelInfer(text_request("chat"), metadata=(("x-capability-model", "nope"),))
    assert wrong.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_raw_inputs_get_raw_outputs(stub: pbg.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="echo", model_version="v1")
    tensor = request.inputs.add(name="x", datatype="INT32")
    tensor.shape.append(3)
    request.raw_input_contents.append(struct.pack("<3i", 1, -2, 3))
    reply = stub.ModelInfer(request)
    assert list(reply.raw_output_contents) == [struct.pack("<3i", 1, -2, 3)]
    assert not reply.outputs[0].HasField("contents")


def test_grpc_errors(stub: pbg.GRPCInferenceServiceStub) -> None:
    cases = [
        (text_request(""), grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
        (text_request("nope"), grpc.StatusCode.NOT_FOUND, "no replica serves type=nope"),
        (text_request("boom"), grpc.StatusCode.UNKNOWN, "the model exploded"),
        (text_request("talk"), grpc.StatusCode.NOT_FOUND, "streaming one matches"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == code
        assert message in (caught.value.details() or "")


def test_grpc_stream_infer(stub: pbg.GRPCInferenceServiceStub) -> None:
    messages = list(stub.ModelStreamInfer(text_request("talk")))
    words = [m.infer_response.outputs[0].contents.bytes_contents[0] for m in messages]
    assert words == [b"a", b"b"]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ModelStreamInfer(text_request("chat", "demo")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "a unary one matches" in (caught.value.details() or "")


# ---------------------------------------------------------------------- any body: 400, never 500

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


def _or_anything(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good``, a wrong scalar, or any JSON value: each about as likely."""
    return st.one_of(good, _scalars, _json_values)


_params = _or_anything(
    st.dictionaries(
        st.sampled_from(["binary_data_size", "binary_data", "binary_data_output", "x"]),
        _scalars | st.integers(0, 8),
    )
)
_tensors = _or_anything(
    st.fixed_dictionaries(
        {},
        optional={
            "name": _or_anything(st.text(max_size=3)),
            "shape": _or_anything(st.lists(st.integers(-1, 4), max_size=3)),
            "datatype": _or_anything(st.sampled_from(["BYTES", "INT32", "FP16", "BOOL", "BF16"])),
            "data": _json_values,
            "parameters": _params,
            "contents": _json_values,
        },
    )
)
_bodies = st.fixed_dictionaries(
    {},
    optional={
        "inputs": _or_anything(st.lists(_tensors, max_size=3)),
        "outputs": _or_anything(
            st.lists(
                _or_anything(
                    st.fixed_dictionaries(
                        {"name": st.text(max_size=3)}, optional={"parameters": _params}
                    )
                ),
                max_size=2,
            )
        ),
        "parameters": _params,
        "id": _or_anything(st.text(max_size=3)),
    },
)


@settings(max_examples=500, deadline=None, database=None)
@given(body=_bodies | _scalars, blob=st.binary(max_size=24), binary=st.booleans())
def test_decode_request_refuses_any_malformed_body_with_400(
    body: Any, blob: bytes, binary: bool
) -> None:
    head = json.dumps(body).encode()
    with contextlib.suppress(BadRequest):
        decode_request(head + blob if binary else head, len(head) if binary else None)


@settings(max_examples=200, deadline=None, database=None)
@given(
    datatype=st.sampled_from(["BYTES", "INT8", "UINT64", "FP16", "FP32", "BOOL", "BF16", ""]),
    values=st.lists(st.integers(-300, 300), max_size=4),
    raw=st.booleans(),
    wanted=st.sampled_from([None, {"*": True}, {"t": True}, {"t": False}]),
)
def test_encode_response_of_any_tensor_is_a_reply_or_a_handler_error(
    datatype: str, values: list[int], raw: bool, wanted: dict[str, bool] | None
) -> None:
    response = pb.ModelInferResponse()
    tensor = response.outputs.add(name="t", datatype=datatype)
    tensor.shape.append(len(values))
    if raw:
        response.raw_output_contents.append(bytes(v % 256 for v in values))
    else:
        tensor.contents.int64_contents.extend(values)
    try:
        encode_response(response, wanted, "m", "", "")
    except AnyServeError as exc:
        assert exc.status == 500, exc.message


def test_the_decompressed_body_limit_follows_max_body_size() -> None:
    # 80 KiB of spaces: over a 1 KiB server's limit (plus the message slack) once inflated,
    # well within the default one, where the empty JSON is then the complaint.
    body = gzip.compress(b" " * 80 * 1024)
    # The body is read only once a replica is admitted; this one is never called, as the
    # body is refused first.
    replica = {"replica_id": "r", "endpoint": "127.0.0.1:1", "capabilities": [{"type": "chat"}]}

    async def post(config: ApiServerConfig) -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            assert (await client.post("/register", json=replica)).status_code == 200
            return await client.post(
                "/v2/models/chat/infer",
                content=body,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )

    small = asyncio.run(post(ApiServerConfig(max_body_size=1024)))
    assert small.status_code == 413
    assert f"over {1024 + 64 * 1024} bytes" in small.json()["error"]
    default = asyncio.run(post(ApiServerConfig()))
    assert default.status_code == 400, default.text
