"""Backpressure: a per-replica limit on requests in flight, a bounded queue per capability
with a timeout, and a fast 503 with Retry-After beyond them.

The queue's rules are tested on the registry with a fake clock; the rest against a real
API server and replicas started with a small ``--max-in-flight``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from anyserve.errors import BadRequest
from anyserve.registry import Choice, Overloaded, Registry

from .conftest import ApiServer, Procs, start_api_server, start_replica, wait_until
from .reliability import REL_APP, FakeClock, call, registration, release, take, text_body

# ---------------------------------------------------------------------- the registry's queue


class Inbox:
    """A waiter's delivery callback that records what it was handed."""

    def __init__(self, accept: bool = True) -> None:
        self.got: list[Choice] = []
        self.accept = accept

    def __call__(self, choice: Choice) -> bool:
        if self.accept:
            self.got.append(choice)
        return self.accept


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_registry(clock: FakeClock, max_queue: int = 64, **replicas: int) -> Registry:
    registry = Registry(clock=clock, wall=clock, max_queue=max_queue)
    for rid, limit in replicas.items():
        registry.register(registration(rid, max_in_flight=limit))
    return registry


def test_a_replica_takes_at_most_its_max_in_flight(clock: FakeClock) -> None:
    registry = make_registry(clock, a=2)
    first, second = take(registry, {"type": "chat"}), take(registry, {"type": "chat"})
    # Full: the request path waits for a slot (no 503 is made for it).
    assert registry.try_acquire({"type": "chat"}) is None
    registry.finish(first, 1.0, ok=True)
    assert take(registry, {"type": "chat"}).replica_id == "a"
    assert {e["replica_id"]: e["max_in_flight"] for e in registry.snapshot()} == {"a": 2}
    del second


def test_waiters_get_freed_slots_in_order(clock: FakeClock) -> None:
    registry = make_registry(clock, a=1)
    running = take(registry, {"type": "chat"})
    inboxes = [Inbox() for _ in range(3)]
    for inbox in inboxes:
        registry.enqueue({"type": "chat"}, False, [], inbox)
    assert registry.waiting == 3
    for turn in range(3):
        registry.finish(running, 1.0, ok=True)
        assert [len(i.got) for i in inboxes] == [1] * (turn + 1) + [0] * (2 - turn)
        running = inboxes[turn].got[0]
        assert running.replica_id == "a"
    # A delivered slot is taken: nothing else fits until it is given back.
    assert registry.try_acquire({"type": "chat"}) is None
    assert registry.waiting == 0


def test_the_queue_is_bounded_per_query(clock: FakeClock) -> None:
    registry = make_registry(clock, max_queue=2, a=1)
    take(registry, {"type": "chat"})
    for _ in range(2):
        registry.enqueue({"type": "chat"}, False, [], Inbox())
    with pytest.raises(Overloaded, match="2 requests are already waiting") as caught:
        registry.enqueue({"type": "chat"}, False, [], Inbox())
    assert caught.value.status == 503
    assert caught.value.retry_after == 1.0
    # Another query has its own queue.
    registry.enqueue({"type": "chat", "model": "x"}, False, [], Inbox())


def test_a_waiter_that_left_is_skipped(clock: FakeClock) -> None:
    registry = make_registry(clock, a=1)
    running = take(registry, {"type": "chat"})
    gone, declines, stays = Inbox(), Inbox(accept=False), Inbox()
    waiter = registry.enqueue({"type": "chat"}, False, [], gone)
    registry.enqueue({"type": "chat"}, False, [], declines)
    registry.enqueue({"type": "chat"}, False, [], stays)
    registry.dequeue(waiter)
    registry.dequeue(waiter)  # idempotent
    registry.finish(running, 1.0, ok=True)
    assert (gone.got, declines.got, len(stays.got)) == ([], [], 1)
    assert registry.snapshot()[0]["in_flight"] == 1


def test_a_waiter_is_not_handed_a_replica_it_excludes(clock: FakeClock) -> None:
    registry = make_registry(clock, a=1, b=1)
    on_a, on_b = take(registry, {"type": "chat"}), take(registry, {"type": "chat"})
    assert {on_a.replica_id, on_b.replica_id} == {"a", "b"}
    if on_a.replica_id != "a":
        on_a, on_b = on_b, on_a
    delegated, plain = Inbox(), Inbox()
    registry.enqueue({"type": "chat"}, False, ["a"], delegated)  # first in line
    registry.enqueue({"type": "chat"}, False, [], plain)
    registry.finish(on_a, 1.0, ok=True)
    assert (delegated.got, [c.replica_id for c in plain.got]) == ([], ["a"])
    registry.finish(on_b, 1.0, ok=True)
    assert [c.replica_id for c in delegated.got] == ["b"]


def test_new_and_recovered_replicas_serve_the_queue(clock: FakeClock) -> None:
    registry = make_registry(clock, a=1)
    running = take(registry, {"type": "chat"})
    first, second, third = Inbox(), Inbox(), Inbox()
    for inbox in (first, second, third):
        registry.enqueue({"type": "chat"}, False, [], inbox)
    registry.register(registration("b", max_in_flight=1))
    assert [c.replica_id for c in first.got] == ["b"]
    a = running.record
    registry.set_health(a, False, "stopped")
    registry.finish(running, 1.0, ok=True)
    assert second.got == []  # its slot is free, but it does not answer health checks
    registry.set_health(a, True, since=clock())
    assert [x.replica_id for x in second.got] == ["a"]
    # A heartbeat that raises the limit frees slots too.
    registry.heartbeat(registration("b", max_in_flight=2))
    assert [x.replica_id for x in third.got] == ["b"]


@pytest.mark.parametrize("bad", [0, -1, "8", 8.5, True, None, 10**9])
def test_max_in_flight_must_be_a_sensible_whole_number(clock: FakeClock, bad: Any) -> None:
    registry = make_registry(clock)
    with pytest.raises(BadRequest, match="max_in_flight"):
        registry.register(registration("a", max_in_flight=bad))
    assert len(registry) == 0


# ---------------------------------------------------------------------- real processes


def _cluster(procs: Procs, tmp: Path, max_in_flight: int, *api_flags: str) -> ApiServer:
    api = start_api_server(procs, lease_ttl=30.0, heartbeat=0.3, extra=list(api_flags))
    start_replica(
        procs,
        REL_APP,
        api_server=api,
        replica_id="a",
        extra=["--max-in-flight", str(max_in_flight)],
        env={"ANYSERVE_TEST_DIR": str(tmp)},
    )
    return api


def _waiting(api: ApiServer) -> int:
    return int(httpx.get(api.url + "/stats", timeout=5).json()["waiting"])


def test_beyond_the_limit_and_the_queue_requests_are_shed_fast(
    procs: Procs, tmp_path: Path
) -> None:
    api = _cluster(procs, tmp_path, 2, "--max-queue", "3", "--queue-timeout", "20")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = [pool.submit(call, api, "hold", f"h{i}") for i in range(5)]
        wait_until(lambda: _waiting(api) == 3, what="three waiting")
        wait_until(lambda: len(list(tmp_path.glob("started-*"))) == 2, what="two running")
        time.sleep(0.2)  # (a third would have started by now if the limit let it through)
        assert len(list(tmp_path.glob("started-*"))) == 2
        began = time.monotonic()
        shed = call(api, "hold", "h5")
        elapsed = time.monotonic() - began
        assert shed.status_code == 503
        assert elapsed < 0.1
        assert shed.headers["Retry-After"] == "1"
        assert "3 requests are already waiting" in shed.json()["detail"]
        release(tmp_path)
        assert [f.result(timeout=15).status_code for f in held] == [200] * 5
    assert _waiting(api) == 0


def test_a_request_waits_no_longer_than_the_queue_timeout(procs: Procs, tmp_path: Path) -> None:
    api = _cluster(procs, tmp_path, 1, "--queue-timeout", "0.5")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(call, api, "hold", "h0")
        wait_until(lambda: (tmp_path / "started-h0").exists(), what="held")
        began = time.monotonic()
        reply = call(api, "whoami")
        assert 0.4 < time.monotonic() - began < 1.5
        assert reply.status_code == 503
        assert reply.headers["Retry-After"] == "1"
        assert "queue timeout" in reply.json()["detail"]
        # A request whose own deadline is shorter gets 504 at its deadline instead.
        reply = call(api, "whoami", **{"X-Request-Timeout": "0.2"})
        assert reply.status_code == 504
        release(tmp_path)
        assert held.result(timeout=15).status_code == 200
    assert _waiting(api) == 0


def test_a_waiting_request_is_sent_as_soon_as_a_slot_frees(procs: Procs, tmp_path: Path) -> None:
    api = _cluster(procs, tmp_path, 1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(call, api, "hold", "h0")
        wait_until(lambda: (tmp_path / "started-h0").exists(), what="held")
        waiting = pool.submit(call, api, "whoami")
        wait_until(lambda: _waiting(api) == 1, what="queued")
        release(tmp_path, "h0")
        freed = time.monotonic()
        assert waiting.result(timeout=10).status_code == 200
        # The handler polls its release file every 10 ms; the queue adds no polling of its own.
        assert time.monotonic() - freed < 0.5
        assert held.result(timeout=10).status_code == 200


def test_an_open_stream_holds_a_slot(procs: Procs, tmp_path: Path) -> None:
    api = _cluster(procs, tmp_path, 1, "--queue-timeout", "0.3")
    with httpx.stream(
        "POST",
        api.url + "/infer/stream",
        json=text_body("s0"),
        headers={"X-Capability-Type": "stall"},
        timeout=30,
    ) as stream:
        lines = stream.iter_lines()  # (a dropped iterator would close the response)
        assert "first" in next(lines)
        assert call(api, "whoami").status_code == 503
        release(tmp_path, "s0")
        assert any("late" in line for line in lines)
    assert call(api, "whoami").status_code == 200


def test_a_flood_is_shed_with_bounded_memory(procs: Procs, tmp_path: Path) -> None:
    api = _cluster(procs, tmp_path, 2, "--max-queue", "4", "--queue-timeout", "20")
    process = psutil.Process(api.proc.pid)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(call, api, "hold", f"h{i}") for i in range(2)]
        wait_until(lambda: len(list(tmp_path.glob("started-*"))) == 2, what="both held")
        rss_before = process.memory_info().rss

        async def flood(n: int) -> list[tuple[int, float, str | None]]:
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(limits=limits, timeout=30) as client:

                async def one(i: int) -> tuple[int, float, str | None]:
                    began = time.monotonic()
                    reply = await client.post(
                        api.url + "/infer/json",
                        json=text_body(f"f{i}"),
                        headers={"X-Capability-Type": "hold"},
                    )
                    return (
                        reply.status_code,
                        time.monotonic() - began,
                        reply.headers.get("Retry-After"),
                    )

                tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
                await asyncio.sleep(0)
                done = []
                # The shed ones answer at once; release the admitted ones after that.
                while len(done) < n - 4:
                    finished, _ = await asyncio.wait(
                        [t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED
                    )
                    done += [t.result() for t in finished]
                release(tmp_path)
                return [await t for t in tasks]

        began = time.monotonic()
        results = asyncio.run(flood(300))
        assert [f.result(timeout=15).status_code for f in held] == [200, 200]
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 4
    assert statuses.count(503) == 296
    assert all(r == "1" for s, _, r in results if s == 503)
    assert time.monotonic() - began < 10
    # 300 requests at once leave nothing behind worth mentioning.
    assert process.memory_info().rss - rss_before < 64 * 1024 * 1024
    assert _waiting(api) == 0
