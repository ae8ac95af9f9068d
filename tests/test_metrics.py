"""GET /metrics: Prometheus text that prometheus_client parses, counters that move with traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from anyserve.api_server import ApiServerConfig, create_app
from anyserve.registry import LATENCY_BUCKETS, Registry

from .conftest import ApiServer, Procs, start_cluster
from .reliability import pick

parser = pytest.importorskip("prometheus_client.parser")

CHAT = "type=chat model=demo"
TEXT = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when it is not there yet)."""
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def scrape_app(registry: Registry) -> str:
    app = create_app(ApiServerConfig(), registry)

    async def go() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return (await client.get("/metrics")).text

    return asyncio.run(go())


def test_metrics_from_the_registry_counters() -> None:
    registry = Registry()
    registry.register(
        {
            "replica_id": "a",
            "endpoint": "127.0.0.1:1",
            "capabilities": [{"type": "x", "model": "m"}, {"type": "x", "stream": True}],
        }
    )
    unary = pick(registry, {"type": "x", "model": "m"})
    for latency_ms, ok in ((3.0, True), (40.0, True), (2000.0, False)):
        registry.begin(unary)
        registry.finish(unary, latency_ms, ok)
    registry.begin(unary)  # still running
    stream = pick(registry, {"type": "x"}, stream=True)
    registry.begin(stream)
    registry.finish(stream, 7.0, True)

    text = scrape_app(registry)
    found = families(text)
    assert found["anyserve_requests"].type == "counter"
    assert found["anyserve_request_duration_seconds"].type == "histogram"
    labels = {"capability": "type=x model=m", "replica": "a"}
    assert value(text, "anyserve_requests_total", **labels, code="ok") == 2
    assert value(text, "anyserve_requests_total", **labels, code="error") == 1
    assert value(text, "anyserve_requests_in_flight", **labels) == 1
    buckets = {
        s.labels["le"]: s.value
        for s in found["anyserve_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert list(buckets) == [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    assert (buckets["0.005"], buckets["0.05"], buckets["2.5"], buckets["+Inf"]) == (1, 2, 3, 3)
    assert value(text, "anyserve_request_duration_seconds_count", **labels) == 3
    assert value(text, "anyserve_request_duration_seconds_sum", **labels) == pytest.approx(2.043)
    stream_labels = {"capability": "type=x", "replica": "a"}
    assert value(text, "anyserve_streams_total", **stream_labels, code="ok") == 1
    assert value(text, "anyserve_streams_open", **stream_labels) == 0
    assert value(text, "anyserve_stream_duration_seconds_count", **stream_labels) == 1
    assert value(text, "anyserve_replicas") == 1
    assert value(text, "anyserve_capability_replicas", capability="type=x model=m") == 1
    assert value(text, "anyserve_replica_requests_total", replica="a") == 4
    assert value(text, "anyserve_routed_requests_total") == 4
    assert value(text, "anyserve_routed_errors_total") == 1


def test_label_values_are_escaped() -> None:
    registry = Registry()
    registry.register(
        {
            "replica_id": "r",
            "endpoint": "127.0.0.1:1",
            "capabilities": [{"type": 'say "hi"\\now'}],
        }
    )
    choice = pick(registry, {"type": 'say "hi"\\now'})
    registry.begin(choice)
    registry.finish(choice, 1.0, True)
    text = scrape_app(registry)
    assert (
        value(
            text, "anyserve_requests_total", capability='type=say "hi"\\now', replica="r", code="ok"
        )
        == 1
    )


# ---------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("metrics")
    procs = Procs(tmp)
    try:
        yield start_cluster(procs, tmp)
    finally:
        procs.stop_all()


def scrape(api: ApiServer) -> str:
    reply = httpx.get(api.url + "/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return reply.text


def test_counters_move_with_traffic(api: ApiServer) -> None:
    chat = {"capability": CHAT, "replica": "chat"}
    before = scrape(api)
    families(before)  # parses
    for _ in range(3):
        reply = httpx.post(api.url + "/v2/models/chat/versions/demo/infer", json={"inputs": [TEXT]})
        assert reply.status_code == 200
    seed = {
        "inputs": [{"name": "text", "datatype": "BYTES", "contents": {"bytes_contents": ["x"]}}]
    }
    headers = {"X-Capability-Type": "chat", "X-Capability-Model": "demo"}
    assert httpx.post(api.url + "/infer/json", json=seed, headers=headers).status_code == 200
    with httpx.stream(
        "POST", api.url + "/infer/stream", json=seed, headers={"X-Capability-Type": "chat"}
    ) as events:
        assert events.status_code == 200
        events.read()

    after = scrape(api)
    ok = "anyserve_requests_total"
    assert value(after, ok, **chat, code="ok") == value(before, ok, **chat, code="ok") + 4
    count = "anyserve_request_duration_seconds_count"
    assert value(after, count, **chat) == value(before, count, **chat) + 4
    assert value(after, "anyserve_requests_in_flight", **chat) == 0
    streams = {"capability": "type=chat", "replica": "stream"}
    assert (
        value(after, "anyserve_streams_total", **streams, code="ok")
        == value(before, "anyserve_streams_total", **streams, code="ok") + 1
    )
    assert value(after, "anyserve_replicas") == 2
    assert (
        value(after, "anyserve_routed_requests_total")
        == value(before, "anyserve_routed_requests_total") + 5
    )


def test_errors_are_counted(api: ApiServer) -> None:
    chat = {"capability": CHAT, "replica": "chat"}
    before = scrape(api)
    # Valid JSON the handler refuses: the input is not text.
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "INT32", "data": [1]}]}
    reply = httpx.post(api.url + "/v2/models/chat/versions/demo/infer", json=body)
    assert reply.status_code == 400
    after = scrape(api)
    err = "anyserve_requests_total"
    assert value(after, err, **chat, code="error") == value(before, err, **chat, code="error") + 1
    assert (
        value(after, "anyserve_errors_total", replica="chat")
        == value(before, "anyserve_errors_total", replica="chat") + 1
    )
