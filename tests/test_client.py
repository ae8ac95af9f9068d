"""Unit tests of anyserve.client: argument parsing, address resolution, replies and errors.

The HTTP side runs against ``httpx.MockTransport``; the end-to-end tests against real
servers are in ``test_client_cli.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from anyserve.client import (
    Client,
    build_body,
    capability_headers,
    load_body,
    object_key,
    parse_candidates,
    parse_capability,
    parse_input,
    resolve_api_server,
    resolve_token,
    sse_data,
)
from anyserve.errors import (
    BadRequest,
    ConfigError,
    DeadlineExceeded,
    HandlerError,
    NoMatchingCapability,
    NotFound,
    NotReachable,
    UpstreamError,
)

# --------------------------------------------------------------------------- parsing


def test_capability_parsing_and_headers() -> None:
    caps = parse_capability(["type=chat", "gpus=2", "max_tokens= 5 "])
    assert caps == {"type": "chat", "gpus": "2", "max_tokens": "5"}
    assert capability_headers(caps) == {
        "X-Capability-Type": "chat",
        "X-Capability-Gpus": "2",
        "X-Capability-Max-Tokens": "5",
    }
    assert capability_headers({"model-name": "x"}) == {"X-Capability-Model-Name": "x"}


@pytest.mark.parametrize("bad", ["type", "=chat", "type=", "ty pe=chat", "a/b=c", "-x=1"])
def test_malformed_capability(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_capability([bad])


def test_text_input() -> None:
    assert parse_input("data=x=y") == {
        "name": "data",
        "datatype": "BYTES",
        "shape": [1],
        "contents": {"bytes_contents": ["x=y"]},
    }


def test_typed_inputs() -> None:
    assert parse_input("x:FP32=1,2.5,3") == {
        "name": "x",
        "datatype": "FP32",
        "shape": [3],
        "contents": {"fp32_contents": [1.0, 2.5, 3.0]},
    }
    m = parse_input("m:int64[2,2]=1,2,3,-4")
    assert m["datatype"] == "INT64" and m["shape"] == [2, 2]
    assert m["contents"] == {"int64_contents": [1, 2, 3, -4]}
    assert parse_input("b:BOOL=true,0")["contents"] == {"bool_contents": [True, False]}
    assert parse_input("t:BYTES=a,b")["contents"] == {"bytes_contents": ["a", "b"]}
    assert parse_input("u:UINT8=0x10")["contents"] == {"uint_contents": [16]}
    assert parse_input("e:FP64=")["shape"] == [0]


@pytest.mark.parametrize(
    "bad",
    [
        "novalue",
        "x:FP99=1",
        "x:FP32=a",
        "x:INT32=1.5",
        "x:UINT8=-1",
        "x:BOOL=maybe",
        "m:INT32[2,2]=1,2,3",
        "x:FP32[=1",
        "=1",
        "a b=1",
    ],
)
def test_malformed_inputs(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_input(bad)


def test_build_body_appends_inputs_to_a_given_body() -> None:
    body = build_body(
        text="Hello",
        inputs=[parse_input("x:FP32=1")],
        objects={"obj_ref": "k1"},
        body={"model_name": "chat", "inputs": [{"name": "given"}]},
    )
    assert body["model_name"] == "chat"
    assert [i["name"] for i in body["inputs"]] == ["given", "text", "x", "obj_ref"]
    assert body["inputs"][3]["contents"] == {"bytes_contents": ["k1"]}
    assert build_body() == {"inputs": []}
    with pytest.raises(BadRequest, match="text"):
        build_body(text="a", inputs=[parse_input("text=b")])


def test_load_body(tmp_path: Path) -> None:
    assert load_body('{"inputs": []}') == {"inputs": []}
    f = tmp_path / "req.json"
    f.write_text('{"inputs": [{"name": "text"}]}')
    assert load_body(f"@{f}")["inputs"][0]["name"] == "text"
    with pytest.raises(BadRequest, match="not valid JSON"):
        load_body("{nope")
    with pytest.raises(BadRequest, match="JSON object"):
        load_body("[1]")
    with pytest.raises(BadRequest, match="cannot read"):
        load_body(f"@{tmp_path / 'missing.json'}")


def test_object_key_accepts_keys_paths_and_refs() -> None:
    assert object_key("obj_1") == "obj_1"
    assert object_key("/tmp/anyserve-objects/obj_1") == "obj_1"
    assert object_key('{"key": "obj_2", "path": "/x/obj_2"}') == "obj_2"


def test_candidates_header() -> None:
    assert parse_candidates("a=0, b=1,c=x,") == (("a", 0), ("b", 1), ("c", None))
    assert parse_candidates("") == ()


def test_sse_parsing() -> None:
    lines = [
        ": keep-alive",
        'data: {"a": 1}',
        "",
        "event: x",
        "data: line1",
        "data:line2",
        "",
        "",
        "data: tail",
    ]
    assert list(sse_data(lines)) == ['{"a": 1}', "line1\nline2", "tail"]


# --------------------------------------------------------------------------- where the server is


def test_resolution_order(tmp_path: Path) -> None:
    (tmp_path / "anyserve.toml").write_text('[api_server]\nhost = "0.0.0.0"\nport = 9123\n')
    env = {"ANYSERVE_API_SERVER": "http://10.0.0.1:7000/"}
    assert resolve_api_server("localhost:81", env=env, cwd=tmp_path) == "http://localhost:81"
    assert resolve_api_server(None, env=env, cwd=tmp_path) == "http://10.0.0.1:7000"
    assert resolve_api_server(None, env={}, cwd=tmp_path) == "http://127.0.0.1:9123"
    assert resolve_api_server(None, env={}, cwd=tmp_path / "..") == "http://127.0.0.1:8080"


def test_toml_defaults_and_ipv6(tmp_path: Path) -> None:
    toml = tmp_path / "anyserve.toml"
    toml.write_text('[api_server]\nhost = "::"\n')
    assert resolve_api_server(None, env={}, cwd=tmp_path) == "http://[::1]:8080"
    toml.write_text('[objects]\npath = "/tmp/x"\n')
    assert resolve_api_server(None, env={}, cwd=tmp_path) == "http://127.0.0.1:8080"
    toml.write_text('[api_server]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match="port"):
        resolve_api_server(None, env={}, cwd=tmp_path)
    toml.write_text("[api_server\n")
    with pytest.raises(ConfigError, match=r"anyserve\.toml"):
        resolve_api_server(None, env={}, cwd=tmp_path)


def test_bad_address() -> None:
    with pytest.raises(BadRequest, match="http"):
        resolve_api_server("ftp://x", env={})


def test_token_resolution(tmp_path: Path) -> None:
    (tmp_path / "anyserve.toml").write_text('[api_server]\ntoken = "from-file"\n')
    assert resolve_token(env={"ANYSERVE_TOKEN": "t"}, cwd=tmp_path) == "t"
    assert resolve_token(env={}, cwd=tmp_path) == "from-file"
    assert resolve_token(env={}, cwd=tmp_path / "..") is None


def test_resolve_token_reads_the_token_up_created(tmp_path: Path) -> None:
    assert resolve_token(env={}, cwd=tmp_path) is None
    (tmp_path / ".anyserve").mkdir()
    (tmp_path / ".anyserve" / "token").write_text("made-by-up\n")
    assert resolve_token(env={}, cwd=tmp_path) == "made-by-up"
    (tmp_path / "anyserve.toml").write_text('[api_server]\ntoken = "configured"\n')
    assert resolve_token(env={}, cwd=tmp_path) == "configured"
    assert resolve_token(env={"ANYSERVE_TOKEN": "env"}, cwd=tmp_path) == "env"


# --------------------------------------------------------------------------- replies and errors


def mock(handler: Any, token: str | None = None) -> Client:
    return Client("http://api.test:1", token=token, transport=httpx.MockTransport(handler))


def test_infer_json_sends_headers_and_reads_routing_headers() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["headers"] = request.headers
        seen["body"] = json.loads(request.content)
        return httpx.Response(
            200,
            json={"outputs": []},
            headers={
                "X-AnyServe-Replica": "r1",
                "X-AnyServe-Candidates": "r1=0,r2=3",
                "X-Request-ID": "abc",
            },
        )

    with mock(handler, token="sekrit") as client:
        result = client.infer_json({"inputs": []}, {"type": "chat"}, timeout=2.5)
    assert seen["headers"]["x-capability-type"] == "chat"
    assert seen["headers"]["x-request-timeout"] == "2.5"
    assert seen["headers"]["authorization"] == "Bearer sekrit"
    assert seen["body"] == {"inputs": []}
    assert result.meta.replica == "r1"
    assert result.meta.candidates == (("r1", 0), ("r2", 3))
    assert result.meta.request_id == "abc"


def test_error_replies_become_anyserve_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/infer/json":
            return httpx.Response(404, json={"detail": "no replica serves type=nope"})
        if request.url.path == "/registry":
            return httpx.Response(500, text="boom")
        if request.url.path == "/objects":
            return httpx.Response(502, text="<html>\n <body>Bad\n Gateway</body>\n</html>\n")
        return httpx.Response(400, json={"error": "v2 style"})

    with mock(handler) as client:
        with pytest.raises(NotFound, match="no replica serves type=nope"):
            client.infer_json({}, {"type": "nope"})
        with pytest.raises(HandlerError, match="boom"):
            client.registry()
        with pytest.raises(BadRequest, match="v2 style"):
            client.health()
        with pytest.raises(UpstreamError) as info:
            client.objects()
        assert str(info.value) == "<html> <body>Bad Gateway</body> </html>"


def test_connection_failure_is_not_reachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with mock(handler) as client, pytest.raises(NotReachable) as info:
        client.registry()
    assert str(info.value) == "API server not reachable at http://api.test:1"


def test_read_timeout_is_deadline_exceeded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with mock(handler) as client, pytest.raises(DeadlineExceeded):
        client.infer_json({}, {"type": "chat"})


def test_stream_events_and_error_event() -> None:
    events = [
        {"outputs": [{"name": "text_output", "contents": {"bytes_contents": ["Hi"]}}]},
        {"error": "replica went away"},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/infer/stream"
        return httpx.Response(
            200,
            text=body,
            headers={"X-AnyServe-Replica": "s1", "Content-Type": "text/event-stream"},
        )

    got = []
    with mock(handler) as client:
        stream = client.stream({"inputs": []}, {"type": "chat"})
        with pytest.raises(HandlerError, match="replica went away"):
            for event in stream:
                got.append(event)
    assert got == events[:1]
    assert stream.meta.replica == "s1"


def test_unregister_and_objects_routes() -> None:
    calls: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, str(request.url), request.read()))
        if request.url.path == "/unregister":
            ok = json.loads(request.content)["replica_id"] == "known"
            return httpx.Response(200, json={"success": ok})
        if request.method == "POST":
            return httpx.Response(200, json={"key": "k", "size": 6})
        if request.method == "GET" and request.url.path == "/objects":
            return httpx.Response(200, json={"objects": [{"key": "k"}]})
        if request.method == "GET":
            return httpx.Response(200, content=b"abcdef")
        return httpx.Response(200, json={"success": True})

    with mock(handler) as client:
        client.unregister("known")
        with pytest.raises(NotFound):
            client.unregister("unknown")
        assert client.objects() == [{"key": "k"}]
        ref = client.put_object(iter([b"abc", b"def"]), key="k", content_type="json", size=6)
        assert ref["key"] == "k"
        with client.get_object("a b") as download:
            assert b"".join(download.chunks(2)) == b"abcdef"
        client.delete_object("k")
    post = next(c for c in calls if c[0] == "POST")
    assert "key=k" in post[1] and "type=json" in post[1] and post[2] == b"abcdef"
    assert any(c[1].endswith("/objects/a%20b") for c in calls)


def test_no_matching_capability_class_is_a_not_found() -> None:
    # The CLI only relies on the status; a subclass the server might pick still exits 1.
    assert issubclass(NoMatchingCapability, NotFound)


# --------------------------------------------------------------------------- CLI rendering


def test_reply_lines() -> None:
    from anyserve.cli.output import reply_lines

    def out(name: str, contents: dict[str, Any], shape: list[int] | None = None) -> Any:
        return {"name": name, "shape": shape or [1], "contents": contents}

    one = {"outputs": [out("text_output", {"bytes_contents": ["a", "b"]})]}
    assert reply_lines(one) == ["a", "b"]
    several = {
        "outputs": [
            out("status", {"bytes_contents": ["completed"]}),
            out("m", {"int64_contents": [1, 2, 3, 4]}, [2, 2]),
            out("blob", {"bytes_contents": [{"b64": "/w=="}]}),
            out("empty", {}),
        ]
    }
    assert reply_lines(several) == [
        "status: completed",
        "m: [1, 2, 3, 4] (shape 2x2)",
        "blob: <binary, 1 item(s); use --json>",
        "empty: []",
    ]
    assert reply_lines({"outputs": [out("v", {"fp32_contents": [0.1]})]}) == ["v: [0.1]"]


def test_stream_printing(capsys: pytest.CaptureFixture[str]) -> None:
    from anyserve.cli.output import print_stream

    def event(token: str, finish: str = "") -> dict[str, Any]:
        return {
            "outputs": [
                {"name": "text_output", "contents": {"bytes_contents": [token]}},
                {"name": "finish_reason", "contents": {"bytes_contents": [finish]}},
            ]
        }

    print_stream([event("Hello"), event(" world", "stop")], raw=False)
    assert capsys.readouterr().out == "Hello world\n"
    print_stream([event("a")], raw=True)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [event("a")]
