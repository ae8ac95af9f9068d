"""What a large body makes the API server hold (docs/reliability.md, "Memory").

Each kind of 64 MiB body is sent to a fresh API server process (a fresh heap: memory freed
by an earlier request would hide the next one's growth) with a real echo replica behind it,
while a thread samples the server's RSS every 10 ms.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.defaults import MAX_BODY_SIZE
from anyserve.errors import PayloadTooLarge
from anyserve.tensors import JSON_BYTES_PER_ELEMENT, JSON_FREE_ELEMENTS, check_json_elements
from tests.conftest import Procs, start_api_server, start_replica, wait_until

MIB = 1024 * 1024
#: The documented bound (docs/reliability.md, "Memory"): peak RSS growth per body byte.
DOCUMENTED_MULTIPLE = 24
ECHO = "tests.apps.rel_echo:app"
JSON = "application/json"
PROTOBUF = "application/x-protobuf"


def _json_values(datatype: str, item: bytes, per: int) -> bytes:
    """A body of the full limit: one tensor of ``item`` values, one per ``per`` bytes."""
    head = b'{"inputs":[{"name":"x","datatype":"%s","data":[' % datatype.encode()
    tail = b"]}]}"
    assert len(item) + 1 == per
    count = (MAX_BODY_SIZE - len(head) - len(tail) + 1) // per
    return head + b",".join([item] * count) + tail


def json_one_string() -> bytes:
    head = b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["'
    tail = b'"]}]}'
    return head + b"a" * (MAX_BODY_SIZE - len(head) - len(tail)) + tail


def json_many_floats() -> bytes:
    # As many numbers as a JSON body may hold: one per JSON_BYTES_PER_ELEMENT bytes.
    item = b"0." + b"1" * (JSON_BYTES_PER_ELEMENT - 3)
    return _json_values("FP32", item, JSON_BYTES_PER_ELEMENT)


def json_many_strings() -> bytes:
    item = b'"' + b"a" * (JSON_BYTES_PER_ELEMENT - 3) + b'"'
    return _json_values("BYTES", item, JSON_BYTES_PER_ELEMENT)


def protobuf_raw() -> bytes:
    size = MAX_BODY_SIZE - 1024
    message = pb.ModelInferRequest()
    message.inputs.add(name="x", datatype="UINT8", shape=[size])
    message.raw_input_contents.append(bytes(size))
    return message.SerializeToString()


def protobuf_many_bytes() -> bytes:
    # One-byte elements: three bytes of wire each, the most elements a body can hold.
    count = (MAX_BODY_SIZE - 1024) // 3
    message = pb.ModelInferRequest()
    tensor = message.inputs.add(name="x", datatype="BYTES", shape=[count])
    tensor.contents.bytes_contents.extend([b"a"] * count)
    return message.SerializeToString()


def peak_growth(pid: int, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    """``send()``'s reply and the most the process's RSS grew above its level before it."""
    process = psutil.Process(pid)
    base = top = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal top
        while not done.is_set():
            top = max(top, process.memory_info().rss)
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reply = send()
    finally:
        done.set()
        sampler.join()
    return reply, max(top, process.memory_info().rss) - base


def _server_with_echo(procs: Procs) -> tuple[str, int]:
    # A long lease: a replica must not expire while a large body is parsed.
    server = start_api_server(procs, lease_ttl=60, heartbeat=1)
    start_replica(procs, ECHO, api_server=server)
    return server.url, server.proc.pid


@pytest.mark.parametrize(
    ("make", "path", "content_type"),
    [
        (json_one_string, "/infer/json", JSON),
        (json_many_floats, "/infer/json", JSON),
        (json_many_strings, "/infer/json", JSON),
        (protobuf_raw, "/infer", PROTOBUF),
        (protobuf_many_bytes, "/infer", PROTOBUF),
        # KServe v2 REST: the model name is the capability type.
        (json_many_floats, "/v2/models/echo/infer", JSON),
    ],
    ids=[
        "json-one-string",
        "json-many-floats",
        "json-many-strings",
        "pb-raw",
        "pb-many-bytes",
        "v2-json-many-floats",
    ],
)
def test_a_full_body_grows_the_server_by_at_most_the_documented_multiple(
    procs: Procs, make: Callable[[], bytes], path: str, content_type: str
) -> None:
    body = make()
    assert MAX_BODY_SIZE - 2048 <= len(body) <= MAX_BODY_SIZE
    url, pid = _server_with_echo(procs)
    headers = {"content-type": content_type, "x-capability-type": "echo"}
    with httpx.Client(timeout=120) as client:
        reply, growth = peak_growth(
            pid, lambda: client.post(url + path, content=body, headers=headers)
        )
    assert reply.status_code == 200, reply.text[:300]
    assert growth < DOCUMENTED_MULTIPLE * len(body), f"grew {growth / MIB:.0f} MiB"


def test_a_body_nobody_serves_is_refused_unread(procs: Procs) -> None:
    url, pid = _server_with_echo(procs)
    body = json_one_string()
    headers = {"content-type": JSON, "x-capability-type": "nobody"}
    started = time.monotonic()
    with httpx.Client(timeout=60) as client:
        reply, growth = peak_growth(
            pid, lambda: client.post(url + "/infer/json", content=body, headers=headers)
        )
        assert reply.status_code == 404
        assert "no replica serves type=nobody" in reply.json()["detail"]
        # Admission before parse: the 404 costs no copy of the body.
        assert growth < 16 * MIB, f"grew {growth / MIB:.0f} MiB"
        # The connection still serves the next request.
        assert client.get(url + "/health").status_code == 200
    assert time.monotonic() - started < 30


def test_json_with_more_values_than_its_size_allows_is_refused_unparsed(procs: Procs) -> None:
    url, pid = _server_with_echo(procs)
    body = _json_values("FP32", b"0.5", 4)  # 16M floats: 512 MiB of Python objects
    headers = {"content-type": JSON, "x-capability-type": "echo"}
    with httpx.Client(timeout=60) as client:
        reply, growth = peak_growth(
            pid, lambda: client.post(url + "/infer/json", content=body, headers=headers)
        )
    assert reply.status_code == 413
    assert "raw_input_contents" in reply.json()["detail"]
    # The body, and at most one copy of it to count its values outside strings.
    assert growth < 3 * len(body), f"grew {growth / MIB:.0f} MiB"


def test_stalled_uploads_do_not_starve_the_object_routes(procs: Procs, tmp_path: Path) -> None:
    # More stalled uploads than the shared worker-thread pool has threads (40): each has
    # sent one byte of its body and waits; the object routes must still answer.
    api = start_api_server(procs, extra=["--object-store", str(tmp_path / "objects")])
    assert httpx.get(api.url + "/objects", timeout=5).status_code == 200  # the store is open
    head = b"POST /objects HTTP/1.1\r\nHost: api\r\nContent-Length: 1000\r\n\r\nx"
    stalled: list[socket.socket] = []
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=5)
            stalled.append(sock)
            sock.sendall(head)
        # Let the server take up every upload before asking.
        wait_until(lambda: _uploads_in_flight(api.proc.pid) >= 50, timeout=10, what="uploads")
        started = time.monotonic()
        reply = httpx.get(api.url + "/objects", timeout=10)
        assert reply.status_code == 200
        assert time.monotonic() - started < 2.0
        stored = httpx.post(api.url + "/objects?key=k", content=b"data", timeout=10)
        assert stored.status_code == 201
        assert httpx.get(api.url + "/objects/k", timeout=10).content == b"data"
    finally:
        for sock in stalled:
            sock.close()


def _uploads_in_flight(pid: int) -> int:
    """The API server's established TCP connections from clients (one per stalled upload)."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.status == "ESTABLISHED")


def test_the_json_element_bound_counts_values_not_commas_in_text() -> None:
    # A CSV sent as one string: commas galore, but one element.
    text = b"1,2,3,4\\n" * 300_000
    check_json_elements(b'{"inputs":[{"name":"t","datatype":"BYTES","data":["' + text + b'"]}]}')
    # The v2 binary extension: only the JSON header counts, not the data after it.
    header = b'{"inputs":[]}'
    check_json_elements(header + b"," * (4 * MIB), len(header))
    dense = (
        b'{"inputs":[{"name":"t","data":[' + b",".join([b"1"] * (JSON_FREE_ELEMENTS + 9)) + b"]}]}"
    )
    with pytest.raises(PayloadTooLarge, match="at most one per 16 bytes"):
        check_json_elements(dense)
    # Up to JSON_FREE_ELEMENTS a body is never refused, however dense: a 1024x1024x3 image.
    image = b",".join([b"1"] * (1024 * 1024 * 3))
    check_json_elements(b'{"inputs":[{"name":"t","data":[' + image + b"]}]}")
