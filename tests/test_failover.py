"""Failover: retries on another replica, passive ejection, and health checks.

The registry's ejection rules are tested with a fake clock; the rest against real
processes that are killed (SIGKILL) or stopped (SIGSTOP, always resumed at teardown).
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest

from anyserve.api_server import ApiServerConfig, Gateway, Routing
from anyserve.registry import (
    EJECT_MAX,
    NoHealthyReplica,
    Registry,
)

from .conftest import Procs, free_port, start_api_server, start_replica, wait_until
from .reliability import (
    REL_APP,
    FakeClock,
    call,
    events,
    output,
    pick,
    registration,
    state,
    stopped,
    take,
    text_body,
)

# ---------------------------------------------------------------------- the registry's rules


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    registry = Registry(lease_ttl=1000.0, heartbeat_interval=100.0, clock=clock, wall=clock)
    for rid in ("a", "b", "c", "d"):
        registry.register(registration(rid))
    return registry


def test_ejection_takes_a_replica_out_for_a_growing_period(
    registry: Registry, clock: FakeClock
) -> None:
    a = registry.get("a")
    assert a is not None
    periods = []
    for _ in range(8):
        period = registry.eject(a, "Socket closed")
        assert period is not None
        periods.append(period)
        assert {pick(registry, {"type": "chat"}).replica_id for _ in range(6)} == {"b", "c", "d"}
        clock.advance(period)  # re-admitted once the period is over
        assert "a" in {pick(registry, {"type": "chat"}).replica_id for _ in range(8)}
    assert periods == [1.0, 2.0, 4.0, 8.0, 16.0, EJECT_MAX, EJECT_MAX, EJECT_MAX]


def test_a_successful_request_resets_the_ejection_period(
    registry: Registry, clock: FakeClock
) -> None:
    a = registry.get("a")
    assert a is not None
    assert registry.eject(a, "x") == 1.0
    clock.advance(1.0)
    assert registry.eject(a, "x") == 2.0
    clock.advance(2.0)
    choice = take(registry, {"type": "chat"}, exclude=["b", "c", "d"])
    registry.finish(choice, 1.0, ok=True)
    assert registry.eject(a, "x") == 1.0


def test_an_ejected_replica_is_not_ejected_again_while_out(registry: Registry) -> None:
    a = registry.get("a")
    assert a is not None
    assert registry.eject(a, "x") == 1.0
    # Fifty requests failing on it at once count as one failure, not fifty doublings.
    assert all(registry.eject(a, "x") is None for _ in range(50))
    assert a.ejections == 1


def test_never_more_than_half_of_a_capability_is_ejected(registry: Registry) -> None:
    records = [registry.get(rid) for rid in ("a", "b", "c", "d")]
    assert [registry.eject(r, "x") for r in records if r is not None] == [1.0, 1.0, None, None]
    snapshot = {e["replica_id"]: e["state"] for e in registry.snapshot()}
    assert snapshot == {"a": "ejected", "b": "ejected", "c": "ready", "d": "ready"}


def test_a_single_replica_is_never_ejected(clock: FakeClock) -> None:
    registry = Registry(clock=clock, wall=clock)
    record = registry.register(registration("only"))
    assert registry.eject(record, "x") is None
    assert pick(registry, {"type": "chat"}).replica_id == "only"


def test_health_checks_take_replicas_out_and_bring_them_back(
    registry: Registry, clock: FakeClock
) -> None:
    records = {rid: registry.get(rid) for rid in ("a", "b", "c", "d")}
    for rid in ("a", "b", "c"):
        record = records[rid]
        assert record is not None
        assert registry.set_health(record, False, "no answer to ServerReady within 0.5s")
    assert {pick(registry, {"type": "chat"}).replica_id for _ in range(4)} == {"d"}
    clock.advance(2.5)
    a = records["a"]
    assert a is not None
    registry.set_health(a, False, "no answer to ServerReady within 0.5s")  # still failing
    entry = {e["replica_id"]: e for e in registry.snapshot()}["a"]
    assert entry["state"] == "unhealthy"
    assert entry["problem"] == "no answer to ServerReady within 0.5s"
    assert entry["unhealthy_for"] == 2.5
    d = records["d"]
    assert d is not None
    # Health checks are the truth: a stuck replica is out even if it was the last one.
    registry.set_health(d, False, "stopped")
    with pytest.raises(NoHealthyReplica, match="d fails health checks"):
        pick(registry, {"type": "chat"})
    assert registry.set_health(d, True, since=clock())
    assert pick(registry, {"type": "chat"}).replica_id == "d"


def test_a_passing_health_check_ends_an_ejection_it_postdates(
    registry: Registry, clock: FakeClock
) -> None:
    a = registry.get("a")
    assert a is not None
    check_started = clock()
    clock.advance(0.1)
    registry.eject(a, "Socket closed")
    # A check that began before the failure says nothing about it.
    registry.set_health(a, True, since=check_started)
    assert registry.snapshot()[0]["state"] == "ejected"
    clock.advance(0.2)
    registry.set_health(a, True, since=clock())  # a replica restarted on the same port
    assert registry.snapshot()[0]["state"] == "ready"


# ---------------------------------------------------------------------- the retry budget


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )


def _routing() -> Routing:
    return Routing(query={"type": "chat"}, request_id="r", timeout=5.0, visited=[], depth=0)


def test_only_transport_failures_are_retried_and_within_the_budget(clock: FakeClock) -> None:
    registry = Registry(clock=clock, wall=clock)
    for rid in ("a", "b", "c"):
        registry.register(registration(rid))
    gateway = Gateway(ApiServerConfig(), registry)
    choice = take(registry, {"type": "chat"})
    exclude: list[str] = []
    # The replica's own UNAVAILABLE (its handler said so) is its answer, not a lost connection.
    assert not gateway._retry(
        _unavailable("the API server is not reachable"), choice, _routing(), exclude, False
    )
    assert gateway._retry(_unavailable("Socket closed"), choice, _routing(), exclude, False)
    assert exclude == [choice.replica_id]
    # Once per request.
    assert not gateway._retry(_unavailable("Socket closed"), choice, _routing(), exclude, False)
    # The budget: 3 retries in flight at least, else a fifth of the active requests.
    gateway.retrying = 3
    assert not gateway._retry(_unavailable("Socket closed"), choice, _routing(), [], False)
    for _ in range(19):
        registry.begin(choice)
    assert registry.active == 20
    assert gateway._retry(
        _unavailable("failed to connect to all addresses"), choice, _routing(), [], False
    )
    gateway.retrying = 4
    assert not gateway._retry(_unavailable("Socket closed"), choice, _routing(), [], False)


# ---------------------------------------------------------------------- real processes


def _pair(procs: Procs, tmp: Path, lease_ttl: float = 30.0) -> tuple:  # type: ignore[type-arg]
    api = start_api_server(procs, lease_ttl=lease_ttl, heartbeat=0.3)
    env = {"ANYSERVE_TEST_DIR": str(tmp)}
    a = start_replica(procs, REL_APP, api_server=api, replica_id="a", env=env)
    b = start_replica(procs, REL_APP, api_server=api, replica_id="b", env=env)
    return api, a, b


def test_a_request_whose_replica_dies_is_answered_by_another(procs: Procs, tmp_path: Path) -> None:
    api, a, b = _pair(procs, tmp_path)
    replicas = {"a": a, "b": b}
    started = tmp_path / "started-t1"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(call, api, "hold", "t1")
        victim = wait_until(lambda: started.exists() and started.read_text(), what="held")
        replicas[victim].proc.stop(signal.SIGKILL)
        survivor = "b" if victim == "a" else "a"
        wait_until(lambda: started.read_text() == survivor, what="the retry on the survivor")
        (tmp_path / "release-t1").write_text("go")
        answer = reply.result(timeout=15)
    assert answer.status_code == 200, answer.text
    assert output(answer.json(), "replica") == survivor
    assert answer.headers["X-AnyServe-Replica"] == survivor
    # Out of rotation at once (lease 30 s): no later request tries the dead one first.
    assert state(api, victim) in ("ejected", "unhealthy")
    assert "not reachable, trying another" in api.proc.output()
    for _ in range(10):
        assert output(call(api, "whoami").json(), "replica") == survivor


def test_an_unreachable_replica_is_ejected_at_once(procs: Procs, tmp_path: Path) -> None:
    api = start_api_server(procs, lease_ttl=30.0, heartbeat=0.3)
    start_replica(
        procs, REL_APP, api_server=api, replica_id="real", env={"ANYSERVE_TEST_DIR": str(tmp_path)}
    )
    ghost = registration("ghost", port=free_port(), kind="whoami")
    assert httpx.post(api.url + "/register", json=ghost).status_code == 200
    started = time.monotonic()
    answers = [call(api, "whoami") for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    assert {output(a.json(), "replica") for a in answers} == {"real"}
    # Taken out by the failed connection or the health check, long before its lease ends.
    wait_until(lambda: state(api, "ghost") in ("ejected", "unhealthy"), timeout=2, what="ghost out")
    assert time.monotonic() - started < 2.5


def test_a_stream_that_sent_an_event_is_not_replayed(procs: Procs, tmp_path: Path) -> None:
    api, a, b = _pair(procs, tmp_path)
    replicas = {"a": a, "b": b}
    with httpx.stream(
        "POST",
        api.url + "/infer/stream",
        json=text_body("s1"),
        headers={"X-Capability-Type": "tick"},
        timeout=30,
    ) as reply:
        received = events(reply.iter_lines())
        assert next(received)["outputs"]
        victim = (tmp_path / "started-s1").read_text()
        replicas[victim].proc.stop(signal.SIGKILL)
        killed = time.monotonic()
        rest = list(received)
    assert time.monotonic() - killed < 1.0
    assert "error" in rest[-1], rest[-1]
    assert rest[-1]["status"] == 503
    assert all("error" not in event for event in rest[:-1])
    # The other replica never saw it.
    assert (tmp_path / "started-s1").read_text() == victim


def test_a_stopped_replica_leaves_rotation_and_returns(procs: Procs, tmp_path: Path) -> None:
    api, a, _ = _pair(procs, tmp_path)
    with stopped(a):
        began = time.monotonic()
        wait_until(lambda: state(api, "a") == "unhealthy", timeout=5, interval=0.02, what="a out")
        assert time.monotonic() - began < 2.0  # the check's 1 s beat plus its 0.5 s timeout
        entry = {e["replica_id"]: e for e in api.registry()}["a"]
        assert "ServerReady" in entry["problem"]
        answers = [call(api, "whoami", timeout=5) for _ in range(10)]
        assert {output(r.json(), "replica") for r in answers} == {"b"}
    began = time.monotonic()
    wait_until(lambda: state(api, "a") == "ready", timeout=5, interval=0.02, what="a back")
    assert time.monotonic() - began < 2.0
    assert "a" in {output(call(api, "whoami").json(), "replica") for _ in range(6)}


def test_a_blocked_event_loop_leaves_rotation(procs: Procs, tmp_path: Path) -> None:
    api = start_api_server(procs, lease_ttl=30.0, heartbeat=0.3)
    start_replica(
        procs, REL_APP, api_server=api, replica_id="a", env={"ANYSERVE_TEST_DIR": str(tmp_path)}
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(call, api, "block", "3")
        began = time.monotonic()
        wait_until(lambda: state(api, "a") == "unhealthy", timeout=5, interval=0.02, what="a out")
        assert time.monotonic() - began < 2.0
        # Nothing else can go there meanwhile: a clear 503, not a wait.
        refused = call(api, "whoami")
        assert refused.status_code == 503
        assert "fails health checks" in refused.json()["detail"]
        assert refused.headers["Retry-After"] == "1"
        assert blocked.result(timeout=15).status_code == 200
    wait_until(lambda: state(api, "a") == "ready", timeout=5, what="a back")


def test_the_deadline_bounds_a_request_to_a_stopped_replica(procs: Procs, tmp_path: Path) -> None:
    api = start_api_server(procs, lease_ttl=30.0, heartbeat=0.3)
    replica = start_replica(
        procs, REL_APP, api_server=api, replica_id="a", env={"ANYSERVE_TEST_DIR": str(tmp_path)}
    )
    with stopped(replica):
        for _ in range(3):
            began = time.monotonic()
            reply = call(api, "whoami", **{"X-Request-Timeout": "1"})
            assert reply.status_code in (503, 504)
            assert time.monotonic() - began < 1.5
