"""The API server's front door against slow and hostile clients.

A client that stops reading is cut off after ``--write-timeout`` and its replica slot is
released; request heads over ``--max-header-size`` or with too many fields are answered
431 without the server holding them; the request log escapes control characters.
One API server (write timeout 1 s) and one replica with two slots serve the module; the
hostile clients speak raw HTTP over sockets.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ApiServer, Procs, start_api_server, start_replica, wait_until
from .reliability import events, output, text_body

FLOOD_APP = "tests.apps.flood_app:app"
WRITE_TIMEOUT = 1.0
#: The slot must be free within the write timeout, the sweep's 1 s period, and slack for a
#: machine busy with other tests.
RELEASED_WITHIN = WRITE_TIMEOUT + 1.0 + 4.0
SLOTS = 2
HEAD_LIMIT = 64 * 1024  # the default --max-header-size


class Setup:
    def __init__(self, api: ApiServer, replica_id: str) -> None:
        self.api = api
        self.replica_id = replica_id

    def in_flight(self) -> int:
        replicas = self.api.registry()
        return int(next(r["in_flight"] for r in replicas if r["replica_id"] == self.replica_id))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("front")
    procs = Procs(tmp)
    try:
        api = start_api_server(procs, extra=["--write-timeout", str(WRITE_TIMEOUT)])
        replica = start_replica(
            procs, FLOOD_APP, api_server=api, extra=["--max-in-flight", str(SLOTS)]
        )
        yield Setup(api, replica.replica_id)
    finally:
        procs.stop_all()


def non_reader(api: ApiServer, buffer: int = 4096) -> socket.socket:
    """A connection with a small receive buffer, so that the server's writes pause soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", api.port))
    return sock


def post(path: str, kind: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Capability-Type: %s\r\n%sContent-Length: %d\r\n\r\n%s"
        % (path.encode(), kind.encode(), extra, len(body), body)
    )


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes or resets the connection."""
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def log_has(api: ApiServer, text: str) -> bool:
    return text in api.proc.output()


# --------------------------------------------------------------------------- write timeout


def test_streams_that_nobody_reads_release_their_slots(setup: Setup) -> None:
    api = setup.api
    body = json.dumps(text_body(str(2000))).encode()
    sockets = [non_reader(api) for _ in range(SLOTS)]
    try:
        for sock in sockets:
            sock.sendall(post("/infer/stream", "flood", body))
        # Both hold a slot while the server's writes to them are paused...
        wait_until(lambda: setup.in_flight() == SLOTS, timeout=10, what="both slots taken")
        began = time.monotonic()
        # ...and lose it once they have taken nothing for the write timeout.
        wait_until(lambda: setup.in_flight() == 0, timeout=RELEASED_WITHIN, what="slots free")
        assert time.monotonic() - began >= WRITE_TIMEOUT - 0.5
        assert log_has(api, "took none of the reply for over 1s (--write-timeout)")
        # The connections were cut: the server sent far less than the 2000 chunks.
        for sock in sockets:
            assert len(read_until_closed(sock)) < 2000 * 64 * 1024
    finally:
        for sock in sockets:
            sock.close()
    # A client that reads is served in full by the freed replica.
    with httpx.stream(
        "POST",
        api.url + "/infer/stream",
        json=text_body("3"),
        headers={"X-Capability-Type": "flood"},
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        got = list(events(reply.iter_lines()))
    assert len(got) == 3
    assert output(got[-1], "finish_reason") == "stop"


def test_a_unary_reply_nobody_reads_is_cut_off(setup: Setup) -> None:
    api = setup.api
    size = 32 * 1024 * 1024
    before = api.proc.output().count("(--write-timeout)")
    with non_reader(api) as sock:
        sock.sendall(post("/infer/json", "big", json.dumps(text_body(str(size))).encode()))
        wait_until(
            lambda: api.proc.output().count("(--write-timeout)") > before,
            timeout=RELEASED_WITHIN + 5,  # (the 32 MiB reply is built first)
            what="the connection cut off",
        )
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200")
    assert len(received) < size
    assert setup.in_flight() == 0


def test_a_slow_but_reading_client_is_not_cut_off(setup: Setup) -> None:
    # Pauses shorter than the write timeout are what a working client makes.
    with non_reader(setup.api) as sock:
        sock.sendall(post("/infer/stream", "flood", json.dumps(text_body("40")).encode()))
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            data += chunk
            time.sleep(0.01)  # ~6 MiB/s: the server's writes pause, but never for long
    assert data.count(b"data: ") == 40
    assert b'"stop"' in data


def test_a_large_reply_to_a_slow_reader_is_not_cut_off(setup: Setup) -> None:
    # One 24 MiB write keeps the server's writes paused for as long as the client takes to
    # read it (seconds, past the write timeout, once the kernel's socket buffers of a few
    # MiB are full); it reads all along, so it is served.
    size = 24 * 1024 * 1024
    # (A receive buffer below the loopback's 64 KiB segments would make TCP itself stall.)
    with non_reader(setup.api, 256 * 1024) as sock:
        sock.sendall(post("/infer/json", "big", json.dumps(text_body(str(size))).encode()))
        data = b""
        while b"}]}" not in data[-64:]:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection after {len(data)} bytes"
            data += chunk
            time.sleep(0.01)  # at most ~6 MiB/s
    assert data.startswith(b"HTTP/1.1 200")
    assert len(data) > size


# --------------------------------------------------------------------------- request head


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def send_head(api: ApiServer, head: bytes) -> bytes:
    """Send ``head`` on a new connection; the reply the server sends before it closes."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        # The server may stop reading once it has refused the head.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        return read_until_closed(sock)


def assert_431(reply: bytes) -> None:
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), reply[:200]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head
    assert "the connection is closed" in json.loads(body)["detail"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_huge_header_is_431_and_is_not_held(setup: Setup) -> None:
    api = setup.api
    line = b"X-Huge: " + b"a" * (8 * 1024 * 1024) + b"\r\n"
    send_head(api, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    before = rss_kib(api.proc.pid)
    replies: list[bytes] = []
    sender = threading.Thread(
        target=lambda: replies.append(send_head(api, b"GET /health HTTP/1.1\r\n" + line + b"\r\n"))
    )
    sender.start()
    try:
        # Other clients are answered promptly while the huge head arrives.
        while sender.is_alive():
            began = time.monotonic()
            assert httpx.get(api.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - began < 1.0
    finally:
        sender.join(timeout=30)
    assert_431(replies[0])
    assert b"over 65536 bytes" in replies[0]
    assert rss_kib(api.proc.pid) - before < 4 * 1024
    assert log_has(api, "the request head is over 65536 bytes")


def test_too_many_header_fields_are_431(setup: Setup) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Field-%d: %d\r\n" % (i, i) for i in range(200)
    )
    reply = send_head(setup.api, head + b"\r\n")
    assert_431(reply)
    assert b"over 100 header fields" in reply


def test_a_head_just_under_the_limit_with_a_body_in_the_same_write(setup: Setup) -> None:
    # The body arrives in the same packets as the head: only the head counts.
    text = "t" * (512 * 1024)
    padding = b"X-Pad: " + b"p" * (HEAD_LIMIT - 1024) + b"\r\n"
    body = json.dumps(text_body(text)).encode()
    with socket.create_connection(("127.0.0.1", setup.api.port), timeout=10) as sock:
        sock.sendall(
            post("/infer/json", "count", body, padding) + post("/infer/json", "count", body)
        )
        data = b""
        while data.count(b'"length"') < 2:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data[:300]!r}"
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"HTTP/1.1 200") == 2
    assert data.count(b"[%d]" % len(text)) == 2


def test_ordinary_heads_and_pipelined_requests_are_served(setup: Setup) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Field: v\r\n" * 90 + b"\r\n"
    with socket.create_connection(("127.0.0.1", setup.api.port), timeout=10) as sock:
        sock.sendall(head * 3)
        data = b""
        while data.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
    assert b"431" not in data


# --------------------------------------------------------------------------- request log


def test_the_request_log_escapes_control_characters(setup: Setup) -> None:
    api = setup.api
    body = json.dumps(text_body("x")).encode()
    reply = send_head(
        api, post("/infer/json%0aFORGED%1b[2J", "count", body, b"Connection: close\r\n")
    )
    assert reply.startswith(b"HTTP/1.1 ")
    # The parser refuses C0 controls in a header value (400); bytes 0x80-0x9f pass, and
    # are C1 controls once decoded (0x9b is a terminal's CSI).
    reply = send_head(api, post("/infer/json", "red\x1b[31m", body, b"Connection: close\r\n"))
    assert reply.startswith(b"HTTP/1.1 400 ")
    caps = post("/infer/json", "red", body, b"X-Capability-Model: m\x9b31mtext\r\n")
    send_head(api, caps.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    wait_until(lambda: log_has(api, "model=m\\x9b31mtext"), timeout=5, what="the capability")
    wait_until(lambda: log_has(api, "/infer/json\\x0aFORGED\\x1b[2J"), timeout=5, what="path")
    log = api.proc.output()
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert "\x1b" not in log
    assert "\x9b" not in log


def test_a_request_log_line_is_bounded(setup: Setup) -> None:
    api = setup.api
    headers = b"".join(b"X-Capability-K%d: %s\r\n" % (i, b"v" * 500) for i in range(90))
    reply = send_head(
        api,
        post(
            "/infer/json",
            "count",
            b"{}",
            headers + b"X-Request-ID: bounded-line-1\r\nConnection: close\r\n",
        ),
    )
    assert reply.startswith(b"HTTP/1.1 4") or reply.startswith(b"HTTP/1.1 5")
    wait_until(lambda: log_has(api, "request bounded-line-1 "), timeout=5, what="the log line")
    line = next(x for x in api.proc.output().splitlines() if "request bounded-line-1 " in x)
    assert len(line) < 1000
    assert "more)" in line


def test_a_stream_the_server_ends_releases_its_slot_at_once(procs: Procs) -> None:
    # The idle timeout ends a stream whose relay is stuck writing to a client that does
    # not read (the write timeout, 60 s here, is far off): the slot is free at once.
    api = start_api_server(procs, extra=["--write-timeout", "60", "--stream-idle-timeout", "1"])
    replica = start_replica(procs, FLOOD_APP, api_server=api, extra=["--max-in-flight", "1"])
    setup = Setup(api, replica.replica_id)
    with non_reader(api) as sock:
        sock.sendall(post("/infer/stream", "flood", json.dumps(text_body("2000")).encode()))
        wait_until(lambda: setup.in_flight() == 1, timeout=10, what="the slot taken")
        wait_until(lambda: setup.in_flight() == 0, timeout=6, what="the slot released")
        assert log_has(api, "no message for 1s")
        # The client is still connected, and another is served by the freed slot.
        reply = httpx.post(
            api.url + "/infer/stream",
            json=text_body("2"),
            headers={"X-Capability-Type": "flood"},
            timeout=30,
        )
        assert reply.status_code == 200
        assert reply.text.count("data: ") == 2
