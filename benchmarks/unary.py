"""Unary echo through ``/infer/json``, ``/infer`` (protobuf) and straight gRPC ``ModelInfer``.

The three routes are measured side by side: at each concurrency, one phase per route,
one after the other, so drift on a shared machine touches all three alike.
"""

from __future__ import annotations

import math
import time
from typing import Any

import grpc
import grpc.aio

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from benchmarks.http import Connection, HttpError, build_request
from benchmarks.load import OpenWorker, Phase, Worker, run_phase
from benchmarks.servers import ApiServer, Replica
from benchmarks.settings import Settings

JSON_BODY = (
    b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
    b'"contents": {"bytes_contents": ["hi"]}}]}'
)
EXPECT = b"Echo: hi"
ROUTES = ("grpc", "json", "proto")


def echo_request(model_name: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model_name)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"hi")
    return request


def http_request(port: int, route: str) -> bytes:
    """The prepared request bytes for ``route`` (``json`` or ``proto``) on the API server."""
    if route == "json":
        path, body, kind = "/infer/json", JSON_BODY, "application/json"
    else:
        path, body, kind = "/infer", echo_request().SerializeToString(), "application/x-protobuf"
    headers = {"Content-Type": kind, "X-Capability-Type": "echo"}
    return build_request("POST", "127.0.0.1", port, path, body, headers)


class HttpWorker:
    """Sends one prepared request again and again on a keep-alive connection."""

    def __init__(self, port: int, request: bytes, expect: bytes) -> None:
        self.port = port
        self.request = request
        self.expect = expect
        self.conn: Connection | None = None

    async def call(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        if self.conn is None:
            self.conn = await Connection.open("127.0.0.1", self.port)
        try:
            status, body = await self.conn.request(self.request)
        except BaseException:
            await self.close()
            raise
        if status != 200 or self.expect not in body:
            raise HttpError(f"status {status}: {body[:200]!r}")
        return 1, time.perf_counter() - t0

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()


class GrpcWorker:
    """``ModelInfer`` (or ``ServerLive``) on a channel shared by the phase's workers."""

    def __init__(self, stub: pbg.GRPCInferenceServiceStub, live: bool = False) -> None:
        self.stub = stub
        self.live = live
        self.request = echo_request("echo")

    async def call(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        if self.live:
            await self.stub.ServerLive(pb.ServerLiveRequest(), timeout=30)
        else:
            reply = await self.stub.ModelInfer(self.request, timeout=30)
            if reply.outputs[0].contents.bytes_contents[0] != EXPECT:
                raise ValueError(f"unexpected reply {reply}")
        return 1, time.perf_counter() - t0

    async def close(self) -> None:
        pass


async def http_phase(
    port: int,
    request: bytes,
    expect: bytes,
    concurrency: int,
    duration: float,
    settings: Settings,
    cpu_pids: dict[str, int],
) -> Phase:
    async def open_worker() -> Worker:
        return HttpWorker(port, request, expect)

    return await _phase(open_worker, concurrency, duration, settings, cpu_pids)


async def grpc_phase(
    endpoint: str,
    concurrency: int,
    duration: float,
    settings: Settings,
    cpu_pids: dict[str, int],
    live: bool = False,
) -> Phase:
    """One channel for all workers, as the API server keeps one per replica."""
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        stub = pbg.GRPCInferenceServiceStub(channel)

        async def open_worker() -> Worker:
            return GrpcWorker(stub, live)

        return await _phase(open_worker, concurrency, duration, settings, cpu_pids)
    finally:
        await channel.close()


async def _phase(
    open_worker: OpenWorker,
    concurrency: int,
    duration: float,
    settings: Settings,
    cpu_pids: dict[str, int],
) -> Phase:
    return await run_phase(
        open_worker,
        concurrency,
        duration,
        warmup=settings.warmup,
        max_requests=settings.max_requests,
        cpu_pids=cpu_pids,
    )


async def measure(api: ApiServer, replica: Replica, settings: Settings) -> dict[str, Any]:
    """``{"grpc"|"json"|"proto": {"1": figures, "16": ..., "64": ...}}``.

    Each figure merges ``settings.rounds`` short phases, the routes taking turns, so that
    a burst of load from elsewhere on the machine falls on all three routes alike.
    """
    out: dict[str, dict[str, Any]] = {route: {} for route in ROUTES}
    duration = settings.duration / settings.rounds
    replica_pid = {"replica": replica.child.pid}
    both = {"api": api.child.pid, **replica_pid}
    for concurrency in settings.concurrencies:
        rounds: dict[str, list[Phase]] = {route: [] for route in ROUTES}
        for _ in range(settings.rounds):
            for route in ROUTES:
                if route == "grpc":
                    phase = await grpc_phase(
                        replica.endpoint, concurrency, duration, settings, replica_pid
                    )
                else:
                    request = http_request(api.port, route)
                    phase = await http_phase(
                        api.port, request, EXPECT, concurrency, duration, settings, both
                    )
                rounds[route].append(phase)
        for route in ROUTES:
            phase = Phase.merge(rounds[route])
            out[route][str(concurrency)] = phase.unary()
            settings.progress(f"unary {route:5} c={concurrency:<3} {phase.rps:8.0f} req/s")
    return out


def ratios(unary: dict[str, Any], cores: int) -> dict[str, Any]:
    """Per concurrency: json/direct and proto/direct req/s, p50 ms added over direct, and
    the same req/s ratio predicted from CPU per request alone (see :func:`cpu_capacity`)."""
    out: dict[str, Any] = {}
    for concurrency, direct in unary["grpc"].items():
        row: dict[str, float] = {}
        for route in ("json", "proto"):
            figures = unary[route][concurrency]
            row[f"{route}_over_direct_rps"] = round(figures["rps"] / direct["rps"], 3)
            row[f"{route}_added_p50_ms"] = round(figures["p50_ms"] - direct["p50_ms"], 3)
            mine = cpu_capacity(figures.get("cpu_ms", {}), ("api", "replica"), cores)
            theirs = cpu_capacity(direct.get("cpu_ms", {}), ("replica",), cores)
            row[f"{route}_over_direct_cpu_model"] = round(mine / theirs, 3)
        out[concurrency] = row
    return out


def cpu_capacity(cpu_ms: dict[str, float], processes: tuple[str, ...], cores: int) -> float:
    """Requests/s the server processes could do if CPU were the only limit.

    Each process runs one event loop, so it gets at most one core; together they get at
    most ``cores``. On a machine shared with other work, measured req/s falls below this,
    and falls more for a route with two hops than for one: the model says what the same
    code would do on an idle machine, which a noisy measurement cannot.
    """
    costs = [cpu_ms.get(name, math.nan) for name in processes]
    if any(not (c > 0) for c in costs):
        return math.nan
    limits = [1000 / c for c in costs]
    limits.append(cores * 1000 / sum(costs))
    return min(limits)
