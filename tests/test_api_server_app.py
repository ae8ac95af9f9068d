"""The API server's ASGI app in-process: error handling, header parsing, metrics text.

These need no replica: a registry is passed in (the seam), and requests go through
httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from anyserve.api_server import ApiServerConfig, create_app, parse_size
from anyserve.registry import Registry

from .reliability import pick


class BrokenRegistry(Registry):
    """A registry with a bug in it, to see what a client gets from an unexpected error."""

    def snapshot(self) -> list[dict[str, Any]]:
        raise RuntimeError("secret internals")


def request(registry: Registry, method: str, path: str, **kwargs: Any) -> httpx.Response:
    app = create_app(ApiServerConfig(), registry)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_unexpected_error_is_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="anyserve.api_server"):
        reply = request(BrokenRegistry(), "GET", "/registry", headers={"X-Request-ID": "bug-1"})
    assert reply.status_code == 500
    assert reply.json() == {"detail": "internal error (request id bug-1)"}
    assert reply.headers["X-Request-ID"] == "bug-1"
    assert "secret" not in reply.text
    # The traceback is in the server log, once, with the request id.
    [record] = [r for r in caplog.records if r.exc_info]
    assert "bug-1" in record.getMessage()
    assert "secret internals" in caplog.text


def test_capability_headers_become_query_keys() -> None:
    registry = Registry()
    registry.register(
        {
            "replica_id": "r",
            "endpoint": "127.0.0.1:1",
            "capabilities": [{"type": "chat", "model_name": "Demo-1"}],
        }
    )
    # Nothing listens on port 1, so a matched request ends in 503; a miss in 404.
    headers = {"X-Capability-Type": "chat", "X-Capability-Model-Name": "Demo-1"}
    body = {
        "inputs": [
            {"name": "t", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": ["x"]}}
        ]
    }
    matched = request(registry, "POST", "/infer/json", headers=headers, json=body)
    assert matched.status_code == 503, matched.text
    assert matched.json()["detail"].startswith("replica r at 127.0.0.1:1 is unavailable")
    headers["X-Capability-Model-Name"] = "demo-1"  # values are compared exactly
    assert request(registry, "POST", "/infer/json", headers=headers, json=body).status_code == 404


def test_bad_request_ids_are_replaced() -> None:
    reply = request(Registry(), "GET", "/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert reply.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(reply.headers["X-Request-ID"]) == 16


def test_metrics_text() -> None:
    registry = Registry()
    registry.register(
        {"replica_id": "a", "endpoint": "127.0.0.1:1", "capabilities": [{"type": "x"}]}
    )
    choice = pick(registry, {"type": "x"})
    registry.begin(choice)
    registry.finish(choice, 12.5, ok=False)
    text = request(registry, "GET", "/metrics").text
    assert 'anyserve_replica_requests_total{replica="a"} 1' in text
    assert 'anyserve_errors_total{replica="a"} 1' in text
    assert 'anyserve_in_flight{replica="a"} 0' in text
    assert 'anyserve_request_latency_ms{replica="a",quantile="0.99"} 12.5' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2, line


def test_parse_size() -> None:
    assert parse_size("1G") == 1024**3
    assert parse_size("200MB") == 200 * 1024**2
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1000") == 1000
    for bad in ("", "x", "-1", "0"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)
