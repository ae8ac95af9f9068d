"""Authentication and registration hygiene: the bearer token, endpoint validation, the
loopback rule without a token, the registry's size limit and the registration rate limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from anyserve.addresses import is_loopback
from anyserve.errors import BadRequest
from anyserve.registry import (
    Forbidden,
    RateLimiter,
    Registry,
    RegistryFull,
    parse_endpoint,
)

from .conftest import ApiServer, Procs, start_api_server, start_replica, wait_until
from .reliability import REL_APP, FakeClock, call, registration

TOKEN = "s3cret-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
WRONG = {"Authorization": "Bearer guess"}

# ---------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("endpoint", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("localhost:1", "localhost", 1),
        ("[::1]:8000", "[::1]", 8000),
        ("gpu-7.cluster.example.com:65535", "gpu-7.cluster.example.com", 65535),
    ],
)
def test_endpoints_that_parse(endpoint: str, host: str, port: int) -> None:
    assert parse_endpoint(endpoint) == (host, port)


@pytest.mark.parametrize(
    "endpoint",
    [
        "",
        "127.0.0.1",
        ":80",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:\u0663",  # an Arabic-Indic digit: str.isdigit says yes
        "dns:///evil.example:1",
        "unix:/tmp/socket:1",
        "[::1:80",
        "[not-v6]:80",
        "two words:1",
        "999.1.1.1:5",
        "-leading-dash.example:1",
        "a" * 300 + ":1",
        "host:1:2",
        42,
        None,
    ],
)
def test_endpoints_that_do_not(endpoint: Any) -> None:
    with pytest.raises(BadRequest, match="endpoint"):
        parse_endpoint(endpoint)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        # *.localhost: judged by what it resolves to (tests/test_registry.py, a fake DNS).
        ("[::ffff:127.0.0.1]", True),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("[::]", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_what_counts_as_this_machine(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_rate_limiter_is_a_token_bucket_per_key() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock, max_keys=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # each client its own bucket
    clock.advance(0.25)
    assert limiter.take("a") == pytest.approx(0.25)
    clock.advance(0.25)
    assert limiter.take("a") == 0.0
    clock.advance(100)
    assert [limiter.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, no more
    limiter.take("c")  # a third key: the least recently used bucket ("b") is dropped
    assert len(limiter._buckets) == 2


def test_without_a_token_only_loopback_endpoints_register() -> None:
    registry = Registry(loopback_only=True)
    with pytest.raises(Forbidden, match="ANYSERVE_TOKEN") as caught:
        registry.register(registration("far", host="10.1.2.3"))
    assert caught.value.status == 403
    registry.register(registration("near", host="127.0.0.1"))
    registry.register(registration("named", host="localhost"))
    assert [r.replica_id for r in registry.records()] == ["near", "named"]


def test_the_registry_has_a_size_limit() -> None:
    registry = Registry(max_replicas=2)
    registry.register(registration("a"))
    registry.register(registration("b"))
    with pytest.raises(RegistryFull, match=r"full \(2 replicas\).*--max-replicas") as caught:
        registry.register(registration("c"))
    assert caught.value.status == 507
    registry.register(registration("a", port=50052))  # replacing a record is fine
    assert len(registry) == 2


# ---------------------------------------------------------------------- a server with a token


@pytest.fixture
def secured(procs: Procs, monkeypatch: pytest.MonkeyPatch) -> ApiServer:
    monkeypatch.setenv("ANYSERVE_TOKEN", TOKEN)  # the API server reads it from its environment
    return start_api_server(procs)


def _register(api: ApiServer, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(api.url + "/register", json=body, headers=headers)


def test_registration_needs_the_token(secured: ApiServer) -> None:
    body = registration("r1", kind="whoami")
    missing = _register(secured, body)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="anyserve"'
    assert "Authorization: Bearer" in missing.json()["detail"]
    wrong = _register(secured, body, **WRONG)
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert secured.registry() == []
    assert _register(secured, body, **GOOD).status_code == 200
    assert [r["replica_id"] for r in secured.registry()] == ["r1"]
    for path in ("/heartbeat", "/unregister"):
        assert httpx.post(secured.url + path, json=body).status_code == 401
        assert httpx.post(secured.url + path, json=body, headers=WRONG).status_code == 401
    assert secured.registry() != []
    assert httpx.post(secured.url + "/heartbeat", json=body, headers=GOOD).status_code == 200
    assert httpx.post(secured.url + "/unregister", json=body, headers=GOOD).status_code == 200
    assert secured.registry() == []


def test_with_a_token_other_hosts_may_register(secured: ApiServer) -> None:
    reply = _register(secured, registration("far", host="10.1.2.3"), **GOOD)
    assert reply.status_code == 200


def test_object_writes_need_the_token_reads_do_not(secured: ApiServer) -> None:
    url = secured.url + "/objects"
    assert httpx.post(url + "?key=k", content=b"data").status_code == 401
    assert httpx.post(url + "?key=k", content=b"data", headers=GOOD).status_code == 201
    assert httpx.get(url).status_code == 200
    assert httpx.get(url + "/k").content == b"data"
    assert httpx.delete(url + "/k").status_code == 401
    assert httpx.delete(url + "/k", headers=GOOD).status_code == 200


def test_replicas_with_the_token_register_and_serve(
    procs: Procs, secured: ApiServer, tmp_path: Path
) -> None:
    env = {"ANYSERVE_TEST_DIR": str(tmp_path), "ANYSERVE_TOKEN": TOKEN}
    start_replica(procs, REL_APP, api_server=secured, replica_id="trusted", env=env)
    # Inference is open unless --auth all.
    assert call(secured, "whoami").status_code == 200
    intruder = start_replica(
        procs,
        REL_APP,
        api_server=secured,
        replica_id="intruder",
        env={"ANYSERVE_TEST_DIR": str(tmp_path), "ANYSERVE_TOKEN": ""},
        wait=False,
    )
    wait_until(lambda: "API server answered 401" in intruder.proc.output(), what="refused")
    assert [r["replica_id"] for r in secured.registry()] == ["trusted"]


def test_auth_all_guards_every_route_but_liveness(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANYSERVE_TOKEN", raising=False)
    api = start_api_server(procs, extra=["--token", TOKEN, "--auth", "all"])
    assert httpx.get(api.url + "/health").status_code == 200
    assert httpx.get(api.url + "/v2/health/live").status_code == 200
    for path in ("/registry", "/stats", "/metrics", "/objects", "/openapi.json"):
        assert httpx.get(api.url + path).status_code == 401, path
        assert httpx.get(api.url + path, headers=GOOD).status_code == 200, path
    refused = httpx.get(api.url + "/v2/models/x/ready")
    assert refused.status_code == 401
    assert "error" in refused.json()  # the v2 routes' error shape
    refused = httpx.post(api.url + "/infer/json", json={}, headers={"X-Capability-Type": "x"})
    assert refused.status_code == 401
    assert "detail" in refused.json()


# ---------------------------------------------------------------------- without a token


def test_without_a_token_non_loopback_endpoints_are_refused(api_server: ApiServer) -> None:
    reply = _register(api_server, registration("far", host="10.1.2.3"))
    assert reply.status_code == 403
    assert "token" in reply.json()["detail"]
    reply = _register(api_server, registration("odd", host="dns:///evil.example"))
    assert reply.status_code == 400
    assert api_server.registry() == []


def test_the_registry_size_limit_over_http(procs: Procs) -> None:
    api = start_api_server(procs, extra=["--max-replicas", "3"])
    for i in range(3):
        assert _register(api, registration(f"r{i}", port=50000 + i)).status_code == 200
    full = _register(api, registration("r3", port=50003))
    assert full.status_code == 507
    assert "the registry is full (3 replicas)" in full.json()["detail"]
    assert len(api.registry()) == 3


def test_registrations_are_rate_limited(procs: Procs) -> None:
    api = start_api_server(procs, extra=["--register-rate", "1", "--register-burst", "3"])
    statuses = [_register(api, registration(f"r{i}", port=50000 + i)).status_code for i in range(5)]
    assert statuses[:3] == [200, 200, 200]
    assert 429 in statuses[3:]
    limited = _register(api, registration("r9", port=50009))
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "too many registrations from loopback" in limited.json()["detail"]
    # Heartbeats that only renew a lease are not registrations.
    for _ in range(10):
        reply = httpx.post(api.url + "/heartbeat", json=registration("r0", port=50000))
        assert reply.status_code == 200
