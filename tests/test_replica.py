"""A real replica process over a real gRPC channel with the generated stubs."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import grpc
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.tensors import input_text

from .conftest import PY, Procs, free_port, start_replica, wait_until


def text_request(model: str, text: str = "", version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    tensor = req.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(text.encode())
    return req


def output_text(resp: pb.ModelInferResponse, name: str = "text_output") -> str:
    for out in resp.outputs:
        if out.name == name:
            return out.contents.bytes_contents[0].decode()
    raise AssertionError(f"no output {name} in {resp}")


@pytest.fixture
def stub_for(procs: Procs) -> Iterator[object]:
    channels: list[grpc.Channel] = []

    def make(app: str, **kwargs: object) -> pbg.GRPCInferenceServiceStub:
        replica = start_replica(procs, app, **kwargs)  # type: ignore[arg-type]
        channel = grpc.insecure_channel(replica.endpoint)
        channels.append(channel)
        return pbg.GRPCInferenceServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


def test_chat_replica_serves_kserve_v2(stub_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stub = stub_for("examples.mvp_demo.chat_app:app", object_store=tmp_path / "objects")
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="chat", version="demo")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="embed")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="chat"))
    assert set(meta.versions) == {"demo", "with-embedding"}
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "anyserve"

    resp = stub.ModelInfer(text_request("chat", "Hello World", "demo"))
    assert output_text(resp) == "[Chat Response] You said: Hello World"
    assert resp.id == "req-1"


def test_matched_capability_metadata_picks_the_handler(stub_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stub = stub_for("examples.mvp_demo.chat_app:app", object_store=tmp_path / "objects")
    resp = stub.ModelInfer(
        text_request("", "x"),
        metadata=[
            ("anyserve-capability", '{"type": "chat", "model": "demo"}'),
            ("x-request-id", "rid-42"),
        ],
    )
    assert output_text(resp) == "[Chat Response] You said: x"
    # Routed by capability, the request named no model: the reply names the capability.
    assert (resp.model_name, resp.model_version) == ("chat", "demo")


def test_stream_app_yields_eleven_tokens(stub_for) -> None:  # type: ignore[no-untyped-def]
    stub = stub_for("examples.mvp_demo.stream_app:app", env={"ANYSERVE_DEMO_TOKEN_DELAY": "0"})
    messages = list(stub.ModelStreamInfer(text_request("chat", "Hello")))
    assert len(messages) == 11
    texts = [output_text(m.infer_response) for m in messages]
    assert "".join(texts) == "Hello world! This is streaming."
    reasons = [output_text(m.infer_response, "finish_reason") for m in messages]
    assert reasons == [""] * 10 + ["stop"]
    # The unary echo capability of the same app is not reachable as a stream, and vice versa.
    assert output_text(stub.ModelInfer(text_request("echo", "hi"))) == "Echo: hi"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ModelStreamInfer(text_request("echo", "hi")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_handler_shapes_and_errors(stub_for) -> None:  # type: ignore[no-untyped-def]
    stub = stub_for("tests.apps.sdk_app:app", replica_id="sdk-1")
    assert output_text(stub.ModelInfer(text_request("one", "x"))) == "one:x"
    resp = stub.ModelInfer(text_request("async"), metadata=[("x-request-id", "abc")])
    assert output_text(resp) == "async:sdk-1:abc"
    resp = stub.ModelInfer(text_request("dict-return"))
    assert output_text(resp) == "from a dict"

    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(text_request("boom"))
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert "the model exploded" in err.value.details()
    assert "Traceback" not in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(text_request("bad-input"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(text_request("wrong-return"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "expected a ModelInferResponse" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(text_request("nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "type=nope" in err.value.details()


def test_stream_handler_shapes(stub_for) -> None:  # type: ignore[no-untyped-def]
    stub = stub_for("tests.apps.sdk_app:app")
    gen = [output_text(m.infer_response) for m in stub.ModelStreamInfer(text_request("gen"))]
    assert gen == ["a", "b", "c"]
    agen = [output_text(m.infer_response) for m in stub.ModelStreamInfer(text_request("agen"))]
    assert agen == ["x", "y"]
    broken = list(stub.ModelStreamInfer(text_request("stream-boom")))
    assert output_text(broken[0].infer_response) == "first"
    assert "broke mid-stream" in broken[-1].error_message


def test_handler_traceback_goes_to_the_log_only(procs: Procs) -> None:
    replica = start_replica(procs, "tests.apps.sdk_app:app")
    with grpc.insecure_channel(replica.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(text_request("boom"), metadata=[("x-request-id", "trace-me")])
    wait_until(lambda: "Traceback" in replica.proc.output(), timeout=5, what="traceback in log")
    assert "trace-me" in replica.proc.output()


def test_second_replica_on_the_same_port_fails_clearly(procs: Procs) -> None:
    first = start_replica(procs, "examples.mvp_demo.stream_app:app")
    second = procs.start(
        [
            PY,
            "-m",
            "anyserve",
            "replica",
            "examples.mvp_demo.stream_app:app",
            "--port",
            str(first.port),
        ],
        name="second",
    )
    code = second.popen.wait(timeout=20)
    assert code == 1
    assert f"127.0.0.1:{first.port}" in second.output()
    assert "already in use" in second.output()
    assert "Traceback" not in second.output()
    assert first.proc.alive()


def test_bare_form_and_sigterm_exit_cleanly(procs: Procs) -> None:
    port = free_port()
    proc = procs.start(
        [PY, "-m", "anyserve", "examples.mvp_demo.stream_app:app", "--port", str(port)],
        name="bare",
    )
    wait_until(lambda: "serving on" in proc.output(), timeout=15, what="bare-form replica")
    proc.send_signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=15) == 0


def test_bad_app_reference_is_a_one_line_error(procs: Procs) -> None:
    proc = procs.start(
        [PY, "-m", "anyserve", "replica", "no_such_module:app", "--port", "0"], name="bad"
    )
    assert proc.popen.wait(timeout=20) == 1
    assert "cannot import module 'no_such_module'" in proc.output()
    assert "Traceback" not in proc.output()


def test_request_helpers_read_what_clients_send() -> None:
    assert input_text(text_request("chat", "héllo")) == "héllo"


def test_capability_metadata_compares_json_values_as_text(stub_for) -> None:  # type: ignore[no-untyped-def]
    stub = stub_for("tests.apps.sdk_app:app")
    for raw in (
        '{"type": "flag", "fast": true, "gpus": 2}',
        '{"type":"flag","fast":"true","gpus":"2"}',
    ):
        resp = stub.ModelInfer(text_request(""), metadata=[("anyserve-capability", raw)])
        assert output_text(resp) == "flagged"


def test_random_bytes_are_invalid_argument_and_the_replica_keeps_serving(procs: Procs) -> None:
    replica = start_replica(procs, "examples.mvp_demo.stream_app:app")
    with grpc.insecure_channel(replica.endpoint) as channel:
        for method in ("ModelInfer", "ServerReady"):
            raw = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff\xff garbage \x00\x01", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed request" in err.value.details()
        raw_stream = channel.unary_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as err:
            list(raw_stream(b"\x0a\xff\xff\xff\xff\x0f", timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = pbg.GRPCInferenceServiceStub(channel)
        assert (
            output_text(stub.ModelInfer(text_request("echo", "still here"))) == "Echo: still here"
        )


class _OddApiServer:
    """A stand-in API server at the HTTP edge: it answers 200 with ``body`` to everything
    and records ``(method, path, json body or None)`` of each request."""

    def __init__(self, body: bytes) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, object]] = []
        lock = threading.Lock()
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    parsed: object = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                with lock:
                    seen.append((self.command, self.path, parsed))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_DELETE = do_GET = answer

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads the record, not stderr

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def paths(self, method: str = "POST") -> list[str]:
        return [p for m, p, _ in list(self.requests) if m == method]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"heartbeat_interval": "soon"}', b'{"heartbeat_interval": -1}'],
)
def test_a_200_the_replica_cannot_read_keeps_it_heartbeating_and_unregistering(
    procs: Procs, body: bytes
) -> None:
    """A 200 is a lease whatever its body says: the replica warns once, heartbeats on, and
    at SIGTERM unregisters with the instance secret it was given in its environment."""
    api = _OddApiServer(body)
    try:
        instance = "a1" * 16
        replica = start_replica(
            procs,
            "examples.mvp_demo.chat_app:app",
            extra=["--api-server", api.url],
            env={"ANYSERVE_INSTANCE": instance},
        )
        wait_until(
            lambda: api.paths()[:1] == ["/register"] and api.paths().count("/heartbeat") >= 2,
            timeout=15,
            what="heartbeats after an unreadable 200",
        )
        assert replica.proc.alive()
        replica.proc.send_signal(signal.SIGTERM)
        assert replica.proc.popen.wait(timeout=15) == 0
        deletes = [(p, b) for m, p, b in api.requests if m == "DELETE"]
        assert deletes == [
            ("/unregister", {"replica_id": replica.replica_id, "instance": instance})
        ]
        out = replica.proc.output()
        assert out.count("heartbeating on") == 1, out
        assert "Traceback" not in out
        assert instance not in out
    finally:
        api.close()
