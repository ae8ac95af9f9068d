"""Streaming: ``/infer/stream`` (SSE) against gRPC ``ModelStreamInfer`` straight to the replica.

Each stream is the demo's ``type=chat`` handler: 11 tokens with no delay between them
(``ANYSERVE_DEMO_TOKEN_DELAY=0``). Figures: time to the first event, and events per second
over all streams open at once (each worker opens its next stream when one ends).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.aio

from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from benchmarks.http import Connection, HttpError, build_request
from benchmarks.load import Phase, Worker, run_phase
from benchmarks.servers import ApiServer, Replica
from benchmarks.settings import Settings
from benchmarks.unary import JSON_BODY, echo_request

TOKENS = 11
ROUTES = ("grpc", "sse")


class SseWorker:
    """Opens one ``/infer/stream`` after another on a keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "X-Capability-Type": "chat",
        }
        self.request = build_request("POST", "127.0.0.1", port, "/infer/stream", JSON_BODY, headers)
        self.conn: Connection | None = None

    async def call(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        if self.conn is None:
            self.conn = await Connection.open("127.0.0.1", self.port)
        events, first, pending = 0, 0.0, b""
        try:
            async for chunk in self.conn.stream(self.request):
                pending += chunk
                complete = pending.count(b"\n\n")
                if not complete:
                    continue
                if not events:
                    first = time.perf_counter() - t0
                if b'"error"' in pending:
                    raise HttpError(f"error event: {pending[:300]!r}")
                events += complete
                pending = pending[pending.rfind(b"\n\n") + 2 :]
        except BaseException:
            await self.close()
            raise
        if events != TOKENS:
            raise HttpError(f"{events} events, expected {TOKENS}")
        return events, first

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()


class GrpcStreamWorker:
    """``ModelStreamInfer`` with ``model_name="chat"`` on the phase's shared channel."""

    def __init__(self, stub: pbg.GRPCInferenceServiceStub) -> None:
        self.stub = stub
        self.request = echo_request("chat")

    async def call(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        events, first = 0, 0.0
        async for message in self.stub.ModelStreamInfer(self.request, timeout=30):
            if not events:
                first = time.perf_counter() - t0
            if message.error_message:
                raise ValueError(f"error message: {message.error_message}")
            events += 1
        if events != TOKENS:
            raise ValueError(f"{events} messages, expected {TOKENS}")
        return events, first

    async def close(self) -> None:
        pass


async def stream_phase(
    route: str,
    streams: int,
    api: ApiServer,
    replica: Replica,
    settings: Settings,
    duration: float,
) -> Phase:
    """One phase of ``streams`` concurrent streams through ``route`` (``sse`` or ``grpc``)."""
    pids = {"api": api.child.pid, "replica": replica.child.pid}
    common: dict[str, Any] = {
        "warmup": settings.warmup,
        # A stream is 11 events: cap by streams so quick mode stays as small as unary.
        "max_requests": settings.max_requests // 4 if settings.max_requests else None,
    }
    if route == "sse":

        async def open_sse() -> Worker:
            return SseWorker(api.port)

        return await run_phase(open_sse, streams, duration, cpu_pids=pids, **common)
    channel = grpc.aio.insecure_channel(replica.endpoint)
    try:
        stub = pbg.GRPCInferenceServiceStub(channel)

        async def open_grpc() -> Worker:
            return GrpcStreamWorker(stub)

        del pids["api"]
        return await run_phase(open_grpc, streams, duration, cpu_pids=pids, **common)
    finally:
        await channel.close()


async def measure(api: ApiServer, replica: Replica, settings: Settings) -> dict[str, Any]:
    """``{"grpc"|"sse": {"1": figures, "16": figures}}``."""
    out: dict[str, dict[str, Any]] = {route: {} for route in ROUTES}
    duration = settings.duration / settings.rounds
    for streams in settings.stream_counts:
        rounds: dict[str, list[Phase]] = {route: [] for route in ROUTES}
        for _ in range(settings.rounds):
            for route in ROUTES:
                phase = await stream_phase(route, streams, api, replica, settings, duration)
                rounds[route].append(phase)
        for route in ROUTES:
            phase = Phase.merge(rounds[route])
            out[route][str(streams)] = phase.streaming()
            settings.progress(
                f"stream {route:4} x{streams:<3} {phase.events_per_s:8.0f} events/s, "
                f"first event p50 {phase.first_ms(0.5):.2f} ms"
            )
    return out
