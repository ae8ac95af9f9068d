"""A slow client slows a stream handler, async or sync: replica memory stays bounded.

The replica serves this module's ``app`` (``tests.test_stream_backpressure:app``): handlers
that produce 1 MiB chunks as fast as they can. A client opens the stream and reads
nothing for a while; the replica's RSS must not grow by more than :data:`GROWTH_LIMIT`
(unbounded, it would grow by ``CHUNKS`` MiB within a second), and then every chunk
arrives, in order.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg

from .conftest import Procs, start_api_server, start_replica, wait_until

app = AnyServe(name="flood")

CHUNK = 1024 * 1024
#: Unbounded, a producer buffers all of these (in MiB) while the client reads nothing.
CHUNKS = 600
GROWTH_LIMIT = 200 * 1024 * 1024
#: How long the client reads nothing, watching the replica's memory.
STALL = 3.0


def chunk(i: int) -> ModelInferResponse:
    response = ModelInferResponse(id=str(i))
    tensor = response.outputs.add(name="blob", datatype="BYTES", shape=[1])
    # A fresh buffer per chunk, as a real producer's output would be.
    tensor.contents.bytes_contents.append(i.to_bytes(4, "big") * (CHUNK // 4))
    return response


@app.capability(type="flood-async", stream=True)
async def flood_async(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    # Never awaits anything: an async producer that could never yield to a bounded buffer.
    for i in range(CHUNKS):
        stream.send(chunk(i))


@app.capability(type="flood-await", stream=True)
async def flood_await(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for i in range(CHUNKS):
        await stream.send(chunk(i))


@app.capability(type="flood-agen", stream=True)
async def flood_agen(
    request: ModelInferRequest, context: Context
) -> AsyncIterator[ModelInferResponse]:
    for i in range(CHUNKS):
        yield chunk(i)


@app.capability(type="flood-sync", stream=True)
def flood_sync(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for i in range(CHUNKS):
        stream.send(chunk(i))


def record(what: str) -> None:
    """Say how a handler ended, in ``$ANYSERVE_TEST_DIR/ended`` (it runs in the replica)."""
    (Path(os.environ["ANYSERVE_TEST_DIR"]) / "ended").write_text(what)


@app.capability(type="wait", stream=True)
async def send_then_wait(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    stream.send(chunk(0))
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        record("cancelled while awaiting")
        raise
    record("slept through")


@app.capability(type="blocked", stream=True)
async def blocked(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    try:
        for i in range(CHUNKS):
            stream.send(chunk(i))
    except Exception as exc:
        record(f"{type(exc).__name__} after a blocked send")
        raise
    record("sent everything")


@app.capability(type="echo-id")
async def echo_id(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    return ModelInferResponse(id=f"echo:{request.id}")


@app.capability(type="ask", stream=True)
async def ask(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    # Runs on its own loop; acall still reaches the API server through the replica's client.
    for i in range(3):
        asked = ModelInferRequest(id=str(i))
        await stream.send(await context.acall({"type": "echo-id"}, asked, timeout=10))


def rss(pid: int) -> int:
    process = psutil.Process(pid)
    return int(process.memory_info().rss) + sum(
        int(child.memory_info().rss) for child in process.children(recursive=True)
    )


@pytest.fixture
def stub_and_pid(
    procs: Procs, tmp_path: Path
) -> Iterator[tuple[pbg.GRPCInferenceServiceStub, int]]:
    replica = start_replica(
        procs,
        "tests.test_stream_backpressure:app",
        object_store=None,
        env={"ANYSERVE_TEST_DIR": str(tmp_path)},
    )
    limit = 8 * CHUNK
    options = [("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(replica.endpoint, options=options) as channel:
        yield pbg.GRPCInferenceServiceStub(channel), replica.proc.pid


@pytest.mark.parametrize("capability", ["flood-async", "flood-await", "flood-agen", "flood-sync"])
def test_unread_stream_holds_the_producer_to_a_bounded_buffer(
    stub_and_pid: tuple[pbg.GRPCInferenceServiceStub, int], capability: str
) -> None:
    stub, pid = stub_and_pid
    before = rss(pid)
    replies = stub.ModelStreamInfer(pb.ModelInferRequest(model_name=capability), timeout=60)
    peak = before
    deadline = time.monotonic() + STALL
    while time.monotonic() < deadline:
        peak = max(peak, rss(pid))
        assert peak - before < GROWTH_LIMIT, (
            f"replica grew by {(peak - before) >> 20} MiB while the client read nothing"
        )
        time.sleep(0.05)
    messages = list(replies)
    assert not [m.error_message for m in messages if m.error_message]
    assert [int(m.infer_response.id) for m in messages] == list(range(CHUNKS))


@pytest.mark.parametrize(
    ("capability", "ending"),
    [
        ("wait", "cancelled while awaiting"),
        ("blocked", "StreamCancelled after a blocked send"),
    ],
)
def test_client_leaving_stops_an_async_handler(
    stub_and_pid: tuple[pbg.GRPCInferenceServiceStub, int],
    tmp_path: Path,
    capability: str,
    ending: str,
) -> None:
    stub, _ = stub_and_pid
    replies = stub.ModelStreamInfer(pb.ModelInferRequest(model_name=capability), timeout=60)
    assert next(replies).infer_response.id == "0"
    replies.cancel()
    ended = tmp_path / "ended"
    text = wait_until(
        lambda: ended.exists() and ended.read_text(), timeout=10, what="the handler to end"
    )
    assert text == ending


def test_an_async_stream_handler_may_call_other_capabilities(procs: Procs) -> None:
    api = start_api_server(procs)
    replica = start_replica(
        procs, "tests.test_stream_backpressure:app", api_server=api, object_store=None
    )
    with grpc.insecure_channel(replica.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(pb.ModelInferRequest(model_name="ask"), timeout=30))
    assert [m.error_message for m in replies if m.error_message] == []
    assert [m.infer_response.id for m in replies] == ["echo:0", "echo:1", "echo:2"]
