"""``GET /metrics``: the registry and request counters in the Prometheus text format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from anyserve.capability import format_query
from anyserve.server.gateway import Gateway
from anyserve.server.replies import gateway_of


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the same counters in the Prometheus text format."""
    gateway = gateway_of(request)
    return Response(
        _prometheus(gateway),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


# name, type, help, and the /registry field it reports per replica
_PER_REPLICA = (
    ("anyserve_replica_requests_total", "counter", "Requests sent to each replica.", "requests"),
    ("anyserve_errors_total", "counter", "Requests to each replica that failed.", "errors"),
    ("anyserve_in_flight", "gauge", "Requests each replica is serving now.", "in_flight"),
)


def _prometheus(gateway: Gateway) -> str:
    """The registry's counters in the Prometheus text exposition format."""
    replicas = gateway.registry.snapshot()
    totals = gateway.registry.totals()
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{labels} {value}" for labels, value in samples if value is not None)

    family("anyserve_replicas", "gauge", "Registered replicas.", [("", len(replicas))])
    family("anyserve_open_streams", "gauge", "Streams being relayed.", [("", len(gateway.streams))])
    for name, kind, help_text, key in _PER_REPLICA:
        family(name, kind, help_text, [(_labels(r), r[key]) for r in replicas])
    latency = [
        (_labels(r, quantile=q), r[key])
        for r in replicas
        for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms"))
    ]
    family("anyserve_request_latency_ms", "gauge", "Recent latency per replica (ms).", latency)
    family(
        "anyserve_routed_requests_total",
        "counter",
        "Requests routed since start.",
        [("", totals["requests"])],
    )
    family(
        "anyserve_routed_errors_total",
        "counter",
        "Failed requests since start.",
        [("", totals["errors"])],
    )
    # Per capability and replica: outcomes (code="ok"|"error"), in flight, latency histograms;
    # unary requests and streams apart. A series appears with the first request.
    from anyserve.registry import LATENCY_BUCKETS

    records = gateway.registry.records()
    serving: dict[str, int] = {}
    for record in records:
        for capability in record.capabilities:
            text = format_query(capability.match_keys)
            serving[text] = serving.get(text, 0) + 1
    family(
        "anyserve_capability_replicas",
        "gauge",
        "Registered replicas serving each capability.",
        [(f'{{capability="{_label(c)}"}}', n) for c, n in serving.items()],
    )
    les = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    for kind, what in (("requests", "Unary requests"), ("streams", "Streams")):
        stream = kind == "streams"
        counts: list[tuple[str, Any]] = []
        open_now: list[tuple[str, Any]] = []
        hist: list[tuple[str, Any]] = []
        for record in records:
            for cs in record.stats.by_capability.values():
                if cs.capability.stream != stream:
                    continue
                text = format_query(cs.capability.match_keys)
                base = f'capability="{_label(text)}",replica="{_label(record.replica_id)}"'
                counts += [
                    (f'{{{base},code="ok"}}', cs.ok),
                    (f'{{{base},code="error"}}', cs.errors),
                ]
                open_now.append((f"{{{base}}}", cs.in_flight))
                total = 0
                for le, n in zip(les, cs.buckets, strict=True):
                    total += n
                    hist.append((f'_bucket{{{base},le="{le}"}}', total))
                hist += [(f"_sum{{{base}}}", round(cs.seconds, 6)), (f"_count{{{base}}}", total)]
        unit = "stream" if stream else "request"
        family(f"anyserve_{kind}_total", "counter", f"{what} per capability and replica.", counts)
        family(
            "anyserve_streams_open" if stream else "anyserve_requests_in_flight",
            "gauge",
            f"{what} in progress per capability and replica.",
            open_now,
        )
        family(
            f"anyserve_{unit}_duration_seconds",
            "histogram",
            f"{what} duration per capability and replica (seconds).",
            hist,
        )
    return "\n".join(lines) + "\n"


def _labels(replica: Mapping[str, Any], **extra: str) -> str:
    pairs = {"replica": replica["replica_id"], **extra}
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs.items()) + "}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
