"""Unit tests of the registry: leases, ownership, matching and load balancing.

No processes and no sleeping: a fake clock drives the leases.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from anyserve.errors import BadRequest, NoMatchingCapability
from anyserve.registry import Capability, Conflict, Forbidden, Gone, Registry, value_text

from .reliability import pick


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(lease_ttl=8.0, heartbeat_interval=2.0, clock=clock, wall=clock)


def body(
    replica_id: str = "r1",
    endpoint: str = "127.0.0.1:50051",
    capabilities: list[dict[str, Any]] | None = None,
    instance: str | None = "i1",
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "replica_id": replica_id,
        "endpoint": endpoint,
        "capabilities": capabilities if capabilities is not None else [{"type": "chat"}],
    }
    if instance is not None:
        data["instance"] = instance
    return data


# ---------------------------------------------------------------------- registration


def test_register_and_snapshot(registry: Registry, clock: FakeClock) -> None:
    caps = [{"type": "chat", "model": "demo"}, {"type": "chat", "stream": True}]
    registry.register(body(capabilities=caps))
    [entry] = registry.snapshot()
    assert entry["replica_id"] == "r1"
    assert entry["endpoint"] == "127.0.0.1:50051"
    assert entry["capabilities"] == caps
    assert entry["registered_at"] == clock.now
    assert entry["last_heartbeat"] == clock.now
    assert entry["state"] == "ready"
    assert (entry["in_flight"], entry["requests"], entry["errors"]) == (0, 0, 0)
    assert entry["p50_ms"] is None and entry["p99_ms"] is None


def test_register_same_id_replaces(registry: Registry) -> None:
    # A registration made by hand (no instance) belongs to no process: the same id again
    # replaces it, as the seed's curl lines expect.
    registry.register(body(endpoint="127.0.0.1:1", instance=None))
    registry.register(body(endpoint="127.0.0.1:2", instance="i2"))
    [entry] = registry.snapshot()
    assert entry["endpoint"] == "127.0.0.1:2"
    assert registry.endpoints() == {"127.0.0.1:2"}


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "r1",
        {"endpoint": "h:1", "capabilities": []},
        {"replica_id": "", "endpoint": "h:1", "capabilities": []},
        {"replica_id": 5, "endpoint": "h:1", "capabilities": []},
        {"replica_id": "a,b", "endpoint": "h:1", "capabilities": []},
        {"replica_id": "a=b", "endpoint": "h:1", "capabilities": []},
        {"replica_id": "a b", "endpoint": "h:1", "capabilities": []},
        {"replica_id": "r\u00e9", "endpoint": "h:1", "capabilities": []},
        {"replica_id": "r", "capabilities": []},
        {"replica_id": "r", "endpoint": "nohost", "capabilities": []},
        {"replica_id": "r", "endpoint": "h:notaport", "capabilities": []},
        {"replica_id": "r", "endpoint": "h:70000", "capabilities": []},
        {"replica_id": "r", "endpoint": "h:1"},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": {"type": "chat"}},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [{"type": "chat"}, "x"]},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [{}]},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [{"stream": True}]},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [{"type": None}]},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [{"type": ["a"]}]},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [{"type": "a", "stream": "yes"}]},
        {"replica_id": "r", "endpoint": "h:1", "capabilities": [], "instance": 3},
    ],
)
def test_malformed_registration_changes_nothing(registry: Registry, bad: Any) -> None:
    registry.register(body(replica_id="r", endpoint="127.0.0.1:9"))
    before = registry.snapshot()
    with pytest.raises(BadRequest):
        registry.register(bad)
    assert registry.snapshot() == before


def test_capability_values_are_compared_as_text() -> None:
    cap = Capability.parse({"type": "heavy", "gpus": 2, "fp16": True, "Ratio": 0.5})
    assert cap.matches({"gpus": "2"}, stream=False)
    assert cap.matches({"fp16": "true", "type": "heavy"}, stream=False)
    assert cap.matches({"ratio": "0.5"}, stream=False)  # keys are matched lowercased
    assert not cap.matches({"gpus": "3"}, stream=False)
    assert not cap.matches({"gpus": "2", "model": "x"}, stream=False)
    assert not cap.matches({"gpus": "2"}, stream=True)
    assert value_text(False) == "false"
    assert cap.metadata == '{"type":"heavy","gpus":"2","fp16":"true","Ratio":"0.5"}'
    assert str(cap) == "type=heavy gpus=2 fp16=true Ratio=0.5"


# ---------------------------------------------------------------------- leases


def test_lease_expires_without_heartbeat(registry: Registry, clock: FakeClock) -> None:
    registry.register(body())
    clock.advance(5)
    assert registry.snapshot()[0]["state"] == "stale"  # late, but the lease still holds
    assert registry.expire() == []
    clock.advance(3.5)
    assert registry.snapshot() == []  # expired records are never shown or chosen...
    [gone] = registry.expire()  # ...and are evicted by the sweep
    assert gone.replica_id == "r1"
    assert registry.expire() == []
    with pytest.raises(NoMatchingCapability):
        pick(registry, {"type": "chat"})


def test_heartbeat_renews_the_lease(registry: Registry, clock: FakeClock) -> None:
    registry.register(body())
    for _ in range(10):
        clock.advance(2)
        _, registered = registry.heartbeat(body())
        assert not registered
    assert registry.expire() == []
    assert registry.snapshot()[0]["last_heartbeat"] == clock.now
    assert registry.snapshot()[0]["registered_at"] == clock.now - 20


def test_heartbeat_for_unknown_id_registers(registry: Registry) -> None:
    record, registered = registry.heartbeat(body(replica_id="new"))
    assert registered
    assert record.replica_id == "new"
    assert pick(registry, {"type": "chat"}).replica_id == "new"


def test_heartbeat_after_expiry_registers_again(registry: Registry, clock: FakeClock) -> None:
    registry.register(body())
    clock.advance(9)
    _, registered = registry.heartbeat(body(instance="other"))
    assert registered


def test_heartbeat_from_another_instance_conflicts(registry: Registry) -> None:
    registry.register(body(instance="owner"))
    with pytest.raises(Conflict) as info:
        registry.heartbeat(body(instance="intruder"))
    assert info.value.status == 409
    assert "r1" in str(info.value)


def test_unregister_only_by_owner(registry: Registry) -> None:
    registry.register(body(instance="owner"))
    with pytest.raises(Conflict):
        registry.unregister("r1", "intruder")
    assert [r.replica_id for r in registry.records()] == ["r1"]
    assert registry.unregister("r1", "owner") is not None
    assert registry.records() == []
    assert registry.unregister("r1", "owner") is None  # already gone: not an error


def test_heartbeat_after_unregister_does_not_resurrect(registry: Registry) -> None:
    # A replica being drained keeps heartbeating until it stops; it must stay out.
    registry.register(body(instance="old"))
    registry.unregister("r1", trusted=True)  # the supervisor, with the token
    with pytest.raises(Gone) as info:
        registry.heartbeat(body(instance="old"))
    assert info.value.status == 410
    assert registry.records() == []
    # Its replacement (another process) heartbeating under the same id is welcome...
    _, registered = registry.heartbeat(body(instance="new"))
    assert registered
    # ...and so is an explicit registration of the old one.
    registry.unregister("r1", "new")
    registry.register(body(instance="old"))
    registry.heartbeat(body(instance="old"))


def test_eviction_does_not_block_reregistration(registry: Registry, clock: FakeClock) -> None:
    registry.register(body())
    clock.advance(9)
    registry.expire()
    _, registered = registry.heartbeat(body())
    assert registered


def test_unregister_without_instance(registry: Registry) -> None:
    registry.register(body(instance="owner"))
    with pytest.raises(Forbidden) as info:
        registry.unregister("r1")  # another local user, no token
    assert info.value.status == 403
    assert [r.replica_id for r in registry.records()] == ["r1"]
    assert registry.unregister("r1", trusted=True) is not None  # with the token
    with pytest.raises(BadRequest):
        registry.unregister("")


def test_hand_registration_is_removed_by_id(registry: Registry) -> None:
    # The seed's curl lines: register without an instance, DELETE by id.
    registry.register(body(instance=None))
    assert registry.unregister("r1") is not None


def test_an_owned_id_cannot_be_taken_over(registry: Registry) -> None:
    registry.register(body(endpoint="127.0.0.1:1", instance="owner"))
    with pytest.raises(Forbidden):
        registry.register(body(endpoint="127.0.0.1:666", instance=None))
    with pytest.raises(Conflict) as info:
        registry.register(body(endpoint="127.0.0.1:666", instance="intruder"))
    assert "owner" not in str(info.value)  # the lease's secret is never echoed
    with pytest.raises(Forbidden):
        registry.heartbeat(body(endpoint="127.0.0.1:666", instance=None))
    assert registry.endpoints() == {"127.0.0.1:1"}
    # The owner itself re-registers freely.
    registry.register(body(endpoint="127.0.0.1:2", instance="owner"))
    assert registry.endpoints() == {"127.0.0.1:2"}


def test_a_dead_owner_frees_its_id_when_its_lease_runs_out(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(body(instance="crashed"))
    clock.advance(9)
    registry.register(body(instance="restarted"))
    assert [r.instance for r in registry.records()] == ["restarted"]


def test_registration_size_is_bounded(registry: Registry) -> None:
    from anyserve.registry import MAX_ATTRIBUTES, MAX_CAPABILITIES, MAX_VALUE_LENGTH

    with pytest.raises(BadRequest, match="at most"):
        registry.register(
            body(capabilities=[{"type": f"t{i}"} for i in range(MAX_CAPABILITIES + 1)])
        )
    with pytest.raises(BadRequest, match="attributes"):
        registry.register(body(capabilities=[{f"k{i}": 1 for i in range(MAX_ATTRIBUTES + 1)}]))
    with pytest.raises(BadRequest, match="characters"):
        registry.register(body(capabilities=[{"type": "x" * (MAX_VALUE_LENGTH + 1)}]))
    with pytest.raises(BadRequest, match="control"):
        registry.register(body(capabilities=[{"type": "chat\nforged log line"}]))
    with pytest.raises(BadRequest, match="printable"):
        registry.register(body(capabilities=[{"ty pe": "chat"}]))
    assert registry.records() == []
    registry.register(body(capabilities=[{"type": f"t{i}"} for i in range(MAX_CAPABILITIES)]))
    assert len(registry.snapshot()[0]["capabilities"]) == MAX_CAPABILITIES


def test_miss_message_is_bounded(registry: Registry) -> None:
    from anyserve.registry import MAX_CAPABILITIES, MAX_REPLICAS, MISS_LISTED

    caps = [{"type": f"t{i}", "model": "m" * 200} for i in range(MAX_CAPABILITIES)]
    for n in range(40):
        registry.register(body(replica_id=f"r{n}", capabilities=caps, instance=f"i{n}"))
    assert MAX_REPLICAS >= 40
    message = registry.describe_miss({"type": "nope"}, stream=False)
    assert message.count("type=t") == MISS_LISTED
    assert message.endswith("and more (see /registry)")
    assert len(message) < 10_000


# ---------------------------------------------------------------------- routing


def test_stream_and_unary_are_separate(registry: Registry) -> None:
    registry.register(body("unary", capabilities=[{"type": "chat"}]))
    registry.register(body("streamer", capabilities=[{"type": "chat", "stream": True}]))
    for _ in range(5):
        assert pick(registry, {"type": "chat"}, stream=False).replica_id == "unary"
        assert pick(registry, {"type": "chat"}, stream=True).replica_id == "streamer"


def test_most_specific_capability_is_chosen(registry: Registry) -> None:
    caps = [{"type": "chat", "model": "with-embedding"}, {"type": "chat"}]
    registry.register(body(capabilities=caps))
    assert pick(registry, {"type": "chat"}).capability.attrs == {"type": "chat"}
    choice = pick(registry, {"type": "chat", "model": "with-embedding"})
    assert choice.capability.attrs == caps[0]


def test_least_in_flight_wins(registry: Registry) -> None:
    for rid in ("a", "b", "c"):
        registry.register(body(rid))
    busy = pick(registry, {"type": "chat"})
    registry.begin(busy)
    registry.begin(busy)
    second = pick(registry, {"type": "chat"})
    registry.begin(second)
    third = pick(registry, {"type": "chat"})
    assert len({busy.replica_id, second.replica_id, third.replica_id}) == 3
    assert dict(third.candidates) == {busy.replica_id: 2, second.replica_id: 1, third.replica_id: 0}
    registry.finish(busy, 12.0, ok=True)
    registry.finish(busy, 30.0, ok=False)
    entry = {e["replica_id"]: e for e in registry.snapshot()}[busy.replica_id]
    assert (entry["in_flight"], entry["requests"], entry["errors"]) == (0, 2, 1)
    assert entry["p50_ms"] == 12.0 or entry["p50_ms"] == 30.0
    assert entry["p99_ms"] == 30.0
    assert registry.totals() == {"requests": 2, "errors": 1, "in_flight": 1}


def test_ties_are_broken_fairly(registry: Registry) -> None:
    for rid in ("a", "b", "c"):
        registry.register(body(rid))
    picks = Counter(pick(registry, {"type": "chat"}).replica_id for _ in range(300))
    assert picks == {"a": 100, "b": 100, "c": 100}


def test_exclusion_list(registry: Registry) -> None:
    registry.register(body("a"))
    registry.register(body("b"))
    for _ in range(4):
        assert pick(registry, {"type": "chat"}, exclude=["a"]).replica_id == "b"
    with pytest.raises(NoMatchingCapability) as info:
        pick(registry, {"type": "chat"}, exclude=["a", "b"])
    assert "delegated from (a, b)" in str(info.value)


def test_miss_message_lists_what_exists(registry: Registry) -> None:
    registry.register(body("a", capabilities=[{"type": "chat", "model": "demo"}]))
    registry.register(body("b", capabilities=[{"type": "embed"}, {"type": "chat", "stream": True}]))
    with pytest.raises(NoMatchingCapability) as info:
        pick(registry, {"type": "chat2"})
    assert info.value.status == 404
    assert str(info.value) == (
        "no replica serves type=chat2; registered: "
        "type=chat model=demo, type=embed, type=chat (stream)"
    )


def test_miss_message_points_to_the_other_route(registry: Registry) -> None:
    registry.register(body("a", capabilities=[{"type": "echo"}]))
    with pytest.raises(NoMatchingCapability) as info:
        pick(registry, {"type": "echo"}, stream=True)
    assert "a unary one matches: use /infer/json or /infer" in str(info.value)


def test_miss_message_with_nothing_registered(registry: Registry) -> None:
    with pytest.raises(NoMatchingCapability) as info:
        pick(registry, {"type": "chat"})
    assert "no replicas are registered" in str(info.value)


def test_counters_survive_reregistration(registry: Registry) -> None:
    registry.register(body())
    choice = pick(registry, {"type": "chat"})
    registry.begin(choice)
    registry.register(body(endpoint="127.0.0.1:2"))  # the replica restarted
    assert registry.snapshot()[0]["in_flight"] == 1
    registry.finish(choice, 5.0, ok=True)
    assert registry.snapshot()[0]["in_flight"] == 0
    assert registry.snapshot()[0]["requests"] == 1


def test_latency_window_is_bounded(registry: Registry) -> None:
    registry.register(body())
    choice = pick(registry, {"type": "chat"})
    for i in range(5000):
        registry.begin(choice)
        registry.finish(choice, float(i), ok=True)
    stats = choice.record.stats
    assert len(stats.latencies_ms) < 5000
    assert stats.percentile(0.5) is not None and stats.percentile(0.5) > 4000  # recent only


def test_localhost_names_are_judged_by_what_they_resolve_to(clock: FakeClock) -> None:
    # A fake DNS at the edge: /etc/hosts (or a resolver) may map *.localhost anywhere.
    hosts = {"localhost": ["127.0.0.1", "::1"], "evil.localhost": ["10.1.2.3"]}
    registry = Registry(
        clock=clock, wall=clock, loopback_only=True, resolve=lambda name: hosts.get(name, [])
    )
    registry.register(body(replica_id="ok", endpoint="localhost:50051"))
    for endpoint in ("evil.localhost:50051", "unknown.localhost:50051", "example.com:1"):
        with pytest.raises(Forbidden):
            registry.register(body(replica_id="evil", endpoint=endpoint))
    assert [r.replica_id for r in registry.records()] == ["ok"]


def test_is_loopback_with_the_system_resolver() -> None:
    from anyserve.addresses import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.com")
    # Not in /etc/hosts and no resolver answers for it here: refused, not trusted by its name.
    assert not is_loopback("anyserve-test-unmapped.localhost")
