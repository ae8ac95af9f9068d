"""The load generator's own ceiling: the same clients against endpoints that do nothing.

- ``http_trivial``: ``GET /`` on ``benchmarks.trivial`` (a fixed 200): the HTTP client's limit;
- ``api_health``: ``GET /health`` on the API server: its HTTP stack without routing or gRPC;
- ``grpc_live``: ``ServerLive`` on the replica: the gRPC client (and grpc.aio server) limit
  without a handler.

When a measured route comes close to the ceiling of its client, the generator, not
AnyServe, was the limit; ``client_bound`` in the results says so.
"""

from __future__ import annotations

from typing import Any

from benchmarks.http import build_request
from benchmarks.servers import ApiServer, Replica
from benchmarks.settings import Settings
from benchmarks.unary import grpc_phase, http_phase

#: A route at this share of its client's ceiling (or a client this busy) was client-bound.
BOUND_SHARE = 0.8


async def measure(
    api: ApiServer, replica: Replica, trivial_port: int, settings: Settings
) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {"http_trivial": {}, "api_health": {}, "grpc_live": {}}
    duration = settings.ceiling_duration
    for c in settings.concurrencies:
        trivial = build_request("GET", "127.0.0.1", trivial_port, "/")
        phase = await http_phase(trivial_port, trivial, b"ok", c, duration, settings, {})
        out["http_trivial"][str(c)] = phase.unary()
        health = build_request("GET", "127.0.0.1", api.port, "/health")
        pids = {"api": api.child.pid}
        phase = await http_phase(api.port, health, b"healthy", c, duration, settings, pids)
        out["api_health"][str(c)] = phase.unary()
        pids = {"replica": replica.child.pid}
        phase = await grpc_phase(replica.endpoint, c, duration, settings, pids, live=True)
        out["grpc_live"][str(c)] = phase.unary()
        settings.progress(
            f"ceiling c={c:<3} trivial {out['http_trivial'][str(c)]['rps']:8.0f}  "
            f"/health {out['api_health'][str(c)]['rps']:8.0f}  "
            f"ServerLive {phase.rps:8.0f} req/s"
        )
    return out


def mark_client_bound(unary: dict[str, Any], ceiling: dict[str, Any]) -> None:
    """Add ``ceiling_share`` and ``client_bound`` to every unary phase, in place."""
    for route, phases in unary.items():
        limit = ceiling["grpc_live" if route == "grpc" else "http_trivial"]
        for concurrency, figures in phases.items():
            top = limit.get(concurrency, {}).get("rps")
            share = figures["rps"] / top if top else 0.0
            busy = figures.get("busy", {}).get("client", 0.0)
            figures["ceiling_share"] = round(share, 3)
            figures["client_bound"] = share >= BOUND_SHARE or busy >= 0.9
