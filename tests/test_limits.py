"""Limits: body sizes (413), request head and body read timeouts, deadlines, idle streams.

One API server (with small limits, so that the tests are quick) and one replica serve the
module; the slow-client tests speak raw HTTP over sockets.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb

from .conftest import ApiServer, Procs, start_api_server, start_replica, wait_until
from .reliability import REL_APP, call, events, output, release, text_body

LIMIT = 1024 * 1024
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0


class Setup:
    def __init__(self, api: ApiServer, tmp: Path) -> None:
        self.api = api
        self.tmp = tmp


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("limits")
    procs = Procs(tmp)
    try:
        api = start_api_server(
            procs,
            extra=[
                "--max-body-size", str(LIMIT),
                "--header-timeout", str(HEADER_TIMEOUT),
                "--body-timeout", str(BODY_TIMEOUT),
                "--stream-idle-timeout", "1",
                "--request-timeout", "1",
                "--object-store", str(tmp / "objects"),
            ],
        )  # fmt: skip
        start_replica(procs, REL_APP, api_server=api, env={"ANYSERVE_TEST_DIR": str(tmp)})
        yield Setup(api, tmp)
    finally:
        procs.stop_all()


def raw(api: ApiServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length: its head and its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    response_head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in response_head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return response_head, body


def head(path: str, length: int | None = None, chunked: bool = False, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---------------------------------------------------------------------- body size


@pytest.mark.parametrize(
    ("path", "key"),
    [("/infer/json", "detail"), ("/infer", "detail"), ("/v2/models/size/infer", "error")],
)
def test_a_declared_oversize_body_is_refused_before_it_is_sent(
    setup: Setup, path: str, key: str
) -> None:
    with raw(setup.api) as sock:
        sock.sendall(head(path, LIMIT + 1, X_Capability_Type="size"))
        began = time.monotonic()
        status, body = read_response(sock)  # answered without a byte of the body
    assert time.monotonic() - began < 1.0
    assert status.startswith(b"HTTP/1.1 413 Request Entity Too Large")
    expected = f"the request body is {LIMIT + 1} bytes; the limit is {LIMIT} bytes"
    assert json.loads(body) == {key: expected}


def test_a_chunked_oversize_body_is_counted(setup: Setup) -> None:
    with raw(setup.api) as sock:
        sock.sendall(head("/infer/json", chunked=True, X_Capability_Type="size"))
        chunk = b"x" * 65536
        for _ in range(2 * LIMIT // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        status, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 413 ")
        assert b"over the limit of 1048576 bytes" in body
        # The connection stays usable: the rest of the body was read and dropped.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")


def test_bodies_within_the_limit_pass(setup: Setup) -> None:
    text = "y" * (LIMIT - 1000)
    reply = call(setup.api, "size", text)
    assert reply.status_code == 200
    assert output(reply.json(), "size") == str(len(text))
    message = pb.ModelInferRequest()
    message.inputs.add(name="text", datatype="BYTES").contents.bytes_contents.append(b"z" * 1000)
    reply = httpx.post(
        setup.api.url + "/infer",
        content=message.SerializeToString(),
        headers={"X-Capability-Type": "size", "Content-Type": "application/x-protobuf"},
    )
    assert reply.status_code == 200


def test_registration_bodies_have_a_smaller_limit_and_uploads_their_own(setup: Setup) -> None:
    big = b'{"replica_id": "x", "pad": "' + b"p" * (LIMIT + 10) + b'"}'
    reply = httpx.post(setup.api.url + "/register", content=big)
    assert reply.status_code == 413
    assert "1048576 bytes" in reply.json()["detail"]
    # Object uploads are limited by --max-object-size instead.
    reply = httpx.post(setup.api.url + "/objects?key=big", content=b"o" * (2 * LIMIT))
    assert reply.status_code == 201, reply.text


# ---------------------------------------------------------------------- slow clients


def test_a_slow_request_head_is_disconnected(setup: Setup) -> None:
    with raw(setup.api) as slow, raw(setup.api) as silent, httpx.Client() as client:
        slow.sendall(b"GET /hea")
        began = time.monotonic()
        # Normal traffic meanwhile, on one kept-alive connection, for longer than the limit.
        answered = 0
        while time.monotonic() - began < HEADER_TIMEOUT + 1.5:
            assert client.get(setup.api.url + "/health").status_code == 200
            answered += 1
        reply = read_all(slow)
        closed = time.monotonic() - began
        assert read_all(silent).startswith(b"HTTP/1.1 408 ")  # a connection that sent nothing
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b"the request head did not arrive within 1s" in reply
    assert closed < HEADER_TIMEOUT + 2.0
    assert answered > 10
    assert "closed a connection from 127.0.0.1" in setup.api.proc.output()


def test_a_stalled_body_is_disconnected(setup: Setup) -> None:
    with raw(setup.api) as sock:
        sock.sendall(head("/infer/json", 100, X_Capability_Type="size") + b'{"inputs":')
        began = time.monotonic()
        reply = read_all(sock)
    assert time.monotonic() - began < BODY_TIMEOUT + 2.0
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"the request body stalled" in reply
    # The API server shrugs it off.
    assert httpx.get(setup.api.url + "/health").status_code == 200


# ---------------------------------------------------------------------- deadlines


def test_unary_requests_have_a_default_deadline(setup: Setup) -> None:
    began = time.monotonic()
    reply = call(setup.api, "hold", "d1")
    assert reply.status_code == 504
    assert 0.9 < time.monotonic() - began < 1.8
    assert "within 1s" in reply.json()["detail"]
    release(setup.tmp, "d1")


def test_an_idle_stream_is_ended_with_an_error_event(setup: Setup) -> None:
    began = time.monotonic()
    with httpx.stream(
        "POST",
        setup.api.url + "/infer/stream",
        json=text_body("idle"),
        headers={"X-Capability-Type": "stall"},
        timeout=30,
    ) as reply:
        received = list(events(reply.iter_lines()))
    # No total deadline for a stream (only for unary requests): it ends for being idle.
    assert 1.0 < time.monotonic() - began < 3.0
    assert output(received[0], "text_output") == "first"
    assert received[-1]["status"] == 504
    assert "sent nothing for 1s" in received[-1]["error"]
    # ... and the handler is told: its next send raises.
    ended = setup.tmp / "ended-idle"
    wait_until(ended.exists, what="the handler to stop")
    assert ended.read_text() == "StreamCancelled"


def test_a_busy_stream_is_not_idle(setup: Setup) -> None:
    with httpx.stream(
        "POST",
        setup.api.url + "/infer/stream",
        json=text_body("busy"),
        headers={"X-Capability-Type": "tick"},
        timeout=30,
    ) as reply:
        began = time.monotonic()
        count = 0
        for event in events(reply.iter_lines()):
            assert "error" not in event
            count += 1
            if time.monotonic() - began > 2.5:
                break
    assert count > 50
