"""The replica registry: leases, capability matching and load counters.

Pure bookkeeping with no I/O: the API server feeds it registrations, heartbeats and
request outcomes, and asks it which replica should take a request. Time comes from
the two clocks passed in (``clock`` for lease arithmetic, ``wall`` for the timestamps
shown to people), which is the seam the tests use to expire leases without sleeping.

Matching follows docs/protocol.md: a query is a dict of lowercased keys; a capability
matches when every key is present with an equal value compared as text (booleans as
``true``/``false``). The ``stream`` key is not an attribute: it separates capabilities
reachable only through ``/infer/stream`` from the unary ones.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anyserve.errors import AnyServeError, BadRequest, NoMatchingCapability

__all__ = [
    "Capability",
    "CapabilityStats",
    "Choice",
    "Conflict",
    "Gone",
    "Registry",
    "ReplicaRecord",
    "ReplicaStats",
    "capability_text",
    "format_query",
    "value_text",
]

#: How many recent latencies the p50/p99 are computed over.
LATENCY_WINDOW = 1024
#: Upper bounds (seconds) of the ``/metrics`` latency histogram buckets; +Inf follows.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_ID_MAX = 200
#: How many explicitly unregistered (id, instance) pairs are remembered.
_TOMBSTONES = 4096
# Printable ASCII except space, ',' and '='.
_ID_CHARS = frozenset(map(chr, range(0x21, 0x7F))) - {",", "="}


class Conflict(AnyServeError):
    """Another process owns this replica id (a different ``instance``)."""

    status = 409


class Gone(AnyServeError):
    """A heartbeat from a replica process that was explicitly unregistered."""

    status = 410


def value_text(value: Any) -> str:
    """A capability value as the text it is compared by (``True`` → ``"true"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_query(query: Mapping[str, str]) -> str:
    """``{"type": "chat", "model": "demo"}`` → ``"type=chat model=demo"``."""
    return " ".join(f"{k}={v}" for k, v in query.items())


def capability_text(attrs: Mapping[str, Any], stream: bool = False) -> str:
    """How a capability is shown in messages and tables: ``type=chat model=demo``."""
    text = format_query({k: value_text(v) for k, v in attrs.items()})
    return f"{text} (stream)" if stream else text


@dataclass(frozen=True)
class Capability:
    """One registered capability: its attributes, and whether it streams."""

    attrs: dict[str, Any]
    stream: bool = False
    #: Lowercased keys and textual values, precomputed because every request compares them.
    match_keys: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: The ``anyserve-capability`` gRPC metadata value, precomputed for the same reason.
    metadata: str = field(default="", compare=False, repr=False)

    @classmethod
    def parse(cls, raw: Any) -> Capability:
        """Validate one registration entry; raise :class:`BadRequest` if malformed."""
        if not isinstance(raw, dict) or not raw:
            raise BadRequest(f"a capability must be a non-empty JSON object, got {raw!r}")
        stream = raw.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"capability 'stream' must be true or false, got {stream!r}")
        attrs: dict[str, Any] = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not key:
                raise BadRequest(f"capability keys must be non-empty strings, got {key!r}")
            if key == "stream":
                continue
            if value is None or not isinstance(value, (str, int, float, bool)):
                raise BadRequest(
                    f"capability {key!r} must be a string, number or boolean, got {value!r}"
                )
            attrs[key] = value
        if not attrs:
            raise BadRequest(f"capability {raw!r} has no attributes besides 'stream'")
        return cls(
            attrs=attrs,
            stream=stream,
            match_keys={k.lower(): value_text(v) for k, v in attrs.items()},
            # Values as the text they are compared by, so both sides agree (True → "true").
            metadata=json.dumps(
                {k: value_text(v) for k, v in attrs.items()},
                separators=(",", ":"),
                ensure_ascii=True,
            ),
        )

    def matches(self, query: Mapping[str, str], stream: bool) -> bool:
        """True when every query key is present here with the same text value."""
        if self.stream != stream:
            return False
        keys = self.match_keys
        return all(keys.get(k) == v for k, v in query.items())

    def to_dict(self) -> dict[str, Any]:
        """The registration form: attributes plus ``"stream": true`` when streaming."""
        return {**self.attrs, "stream": True} if self.stream else dict(self.attrs)

    def __str__(self) -> str:
        return capability_text(self.attrs, self.stream)


class CapabilityStats:
    """Counters of one capability on one replica, for ``/metrics``: outcomes, in flight,
    and a cumulative-ready latency histogram over :data:`LATENCY_BUCKETS`."""

    __slots__ = ("buckets", "capability", "errors", "in_flight", "ok", "seconds")

    def __init__(self, capability: Capability) -> None:
        self.capability = capability
        self.in_flight = 0
        self.ok = 0
        self.errors = 0
        #: Count per bucket (not cumulative); the last one is +Inf.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0

    def finish(self, latency_ms: float, ok: bool) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if ok:
            self.ok += 1
        else:
            self.errors += 1
        seconds = latency_ms / 1000
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds


class ReplicaStats:
    """Load counters of one replica id; they survive re-registration of that id."""

    __slots__ = ("by_capability", "errors", "in_flight", "latencies_ms", "requests")

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        #: Per capability served, keyed by (its metadata text, stream).
        self.by_capability: dict[tuple[str, bool], CapabilityStats] = {}

    def begin(self, capability: Capability | None = None) -> None:
        """A request was sent to this replica (for ``capability``, when given)."""
        self.in_flight += 1
        if capability is not None:
            key = (capability.metadata, capability.stream)
            stats = self.by_capability.get(key)
            if stats is None:
                stats = self.by_capability[key] = CapabilityStats(capability)
            stats.in_flight += 1

    def finish(self, latency_ms: float, ok: bool, capability: Capability | None = None) -> None:
        """A request sent with :meth:`begin` ended (successfully or not)."""
        self.in_flight = max(0, self.in_flight - 1)
        self.requests += 1
        if not ok:
            self.errors += 1
        self.latencies_ms.append(latency_ms)
        if capability is not None:
            stats = self.by_capability.get((capability.metadata, capability.stream))
            if stats is not None:
                stats.finish(latency_ms, ok)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the recent latencies, or None with no data."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return round(ordered[index], 3)


@dataclass
class ReplicaRecord:
    """What the registry knows about one registered replica."""

    replica_id: str
    endpoint: str
    capabilities: list[Capability]
    instance: str | None
    registered_at: float  # wall clock, for people
    last_heartbeat: float  # wall clock, for people
    renewed: float  # ``clock`` time of the last registration or heartbeat; the lease runs from it
    stats: ReplicaStats = field(default_factory=ReplicaStats)


@dataclass(frozen=True)
class Choice:
    """The replica picked for a request and why."""

    record: ReplicaRecord
    capability: Capability
    #: Every matching candidate with its in-flight count at the time of the choice.
    candidates: tuple[tuple[str, int], ...]

    @property
    def replica_id(self) -> str:
        return self.record.replica_id

    @property
    def endpoint(self) -> str:
        return self.record.endpoint


class Registry:
    """Registered replicas with leases, matching, and per-replica load counters.

    ``clock`` measures leases (monotonic by default so a wall-clock jump evicts no one);
    ``wall`` stamps ``registered_at`` / ``last_heartbeat`` for display.
    """

    def __init__(
        self,
        lease_ttl: float = 8.0,
        heartbeat_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if lease_ttl <= 0 or heartbeat_interval <= 0:
            raise ValueError("lease_ttl and heartbeat_interval must be positive")
        self.lease_ttl = lease_ttl
        self.heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._wall = wall
        self._records: dict[str, ReplicaRecord] = {}
        # Totals over every request since start, including replicas that have left.
        self._totals = {"requests": 0, "errors": 0}
        # Replica processes unregistered on purpose (a drain before a reload, `registry rm`):
        # their heartbeats must not bring them back. Only explicit registration does.
        self._unregistered: dict[tuple[str, str | None], None] = {}
        # Round-robin position per (query, stream): spreads ties evenly and deterministically.
        self._turns: dict[tuple[tuple[tuple[str, str], ...], bool], int] = {}

    # ------------------------------------------------------------------ membership

    def register(self, body: Any) -> ReplicaRecord:
        """Add or replace a replica from a ``/register`` body; all-or-nothing.

        Raises :class:`BadRequest` for a malformed body (and changes nothing).
        """
        replica_id, endpoint, capabilities, instance = self._parse(body)
        now, wall = self._clock(), self._wall()
        previous = self._records.get(replica_id)
        # Counters survive a re-registration of the same id (a restarted replica, a
        # heartbeat after an API server hiccup): history stays, and requests still in
        # flight to the old record are still accounted for when they finish.
        stats = previous.stats if previous is not None else ReplicaStats()
        self._unregistered.pop((replica_id, instance), None)
        record = ReplicaRecord(
            replica_id=replica_id,
            endpoint=endpoint,
            capabilities=capabilities,
            instance=instance,
            registered_at=wall,
            last_heartbeat=wall,
            renewed=now,
            stats=stats,
        )
        self._records[replica_id] = record
        return record

    def heartbeat(self, body: Any) -> tuple[ReplicaRecord, bool]:
        """Renew a lease; returns ``(record, registered)``.

        A heartbeat for an unknown id registers it (``registered`` is True), which is
        how a restarted API server repopulates itself, except from a process that was
        unregistered explicitly (:class:`Gone`): it is being drained or was removed, and
        only an explicit ``register`` brings it back. A heartbeat from another
        ``instance`` than the record's raises :class:`Conflict`.
        """
        replica_id, endpoint, capabilities, instance = self._parse(body)
        record = self._records.get(replica_id)
        if record is None or self._expired(record, self._clock()):
            if (replica_id, instance) in self._unregistered:
                raise Gone(
                    f"replica {replica_id!r} was unregistered and is not re-registered by "
                    "its heartbeats; restart it (or POST /register) to serve again"
                )
            return self.register(body), True
        self._check_owner(record, instance, "heartbeat")
        record.renewed = self._clock()
        record.last_heartbeat = self._wall()
        # A heartbeat carries the full registration, so it also refreshes what changed.
        record.endpoint = endpoint
        record.capabilities = capabilities
        return record, False

    def unregister(self, replica_id: Any, instance: Any = None) -> ReplicaRecord | None:
        """Remove a record if ``instance`` is its owner (or omitted); None if unknown.

        Raises :class:`Conflict` (and keeps the record) when another instance owns it.
        """
        if not isinstance(replica_id, str) or not replica_id:
            raise BadRequest("'replica_id' must be a non-empty string")
        if instance is not None and not isinstance(instance, str):
            raise BadRequest("'instance' must be a string")
        record = self._records.get(replica_id)
        if record is None:
            return None
        self._check_owner(record, instance, "unregister")
        del self._records[replica_id]
        self._unregistered[(replica_id, record.instance)] = None
        if len(self._unregistered) > _TOMBSTONES:
            del self._unregistered[next(iter(self._unregistered))]  # the oldest
        return record

    def expire(self) -> list[ReplicaRecord]:
        """Evict every record whose lease ran out; return the evicted ones."""
        now = self._clock()
        gone = [r for r in self._records.values() if self._expired(r, now)]
        for record in gone:
            del self._records[record.replica_id]
        return gone

    def get(self, replica_id: str) -> ReplicaRecord | None:
        return self._records.get(replica_id)

    def records(self) -> list[ReplicaRecord]:
        """Live records in registration order."""
        now = self._clock()
        return [r for r in self._records.values() if not self._expired(r, now)]

    def endpoints(self) -> set[str]:
        """Endpoints of the live records (the API server keeps a channel for each)."""
        return {r.endpoint for r in self.records()}

    def __len__(self) -> int:
        return len(self.records())

    # ------------------------------------------------------------------ routing

    def candidates(
        self, query: Mapping[str, str], stream: bool, exclude: Iterable[str] = ()
    ) -> list[tuple[ReplicaRecord, Capability]]:
        """Live replicas with a capability matching ``query``, with that capability.

        When a replica has several matching capabilities the most specific one (fewest
        attributes, then declaration order) is the one its handler is chosen by.
        """
        excluded = set(exclude)
        found = []
        for record in self.records():
            if record.replica_id in excluded:
                continue
            matching = [c for c in record.capabilities if c.matches(query, stream)]
            if matching:
                found.append((record, min(matching, key=lambda c: len(c.attrs))))
        return found

    def choose(
        self, query: Mapping[str, str], stream: bool = False, exclude: Iterable[str] = ()
    ) -> Choice:
        """Pick the least-loaded matching replica, ties in turn.

        Raises :class:`NoMatchingCapability` with a message listing what exists.
        """
        excluded = list(exclude)
        found = self.candidates(query, stream, excluded)
        if not found:
            raise NoMatchingCapability(self.describe_miss(query, stream, excluded))
        least = min(r.stats.in_flight for r, _ in found)
        ties = [(r, c) for r, c in found if r.stats.in_flight == least]
        turn_key = (tuple(sorted(query.items())), stream)
        turn = self._turns.get(turn_key, 0)
        self._turns[turn_key] = turn + 1
        if len(self._turns) > 4096:  # queries come from clients: keep the table bounded
            self._turns.clear()
        record, capability = ties[turn % len(ties)]
        return Choice(
            record=record,
            capability=capability,
            candidates=tuple((r.replica_id, r.stats.in_flight) for r, _ in found),
        )

    def describe_miss(
        self, query: Mapping[str, str], stream: bool, exclude: Iterable[str] = ()
    ) -> str:
        """The 404 message: what was asked, and which capabilities do exist."""
        kind = "streaming " if stream else ""
        message = f"no replica serves {kind}{format_query(query)}"
        excluded = set(exclude)
        if excluded and self.candidates(query, stream):
            skipped = ", ".join(sorted(excluded))
            return f"{message} other than the ones the request was delegated from ({skipped})"
        existing: list[str] = []
        for record in self.records():
            for capability in record.capabilities:
                text = str(capability)
                if text not in existing:
                    existing.append(text)
        if not existing:
            return f"{message}; no replicas are registered (start one with `anyserve up`)"
        hint = ""
        if any(c.matches(query, not stream) for r in self.records() for c in r.capabilities):
            route = "/infer/json or /infer" if stream else "/infer/stream"
            hint = f" (a {'unary' if stream else 'streaming'} one matches: use {route})"
        return f"{message}{hint}; registered: {', '.join(existing)}"

    def begin(self, choice: Choice) -> None:
        """A request was sent to the chosen replica (it now counts as in flight)."""
        choice.record.stats.begin(choice.capability)

    def finish(self, choice: Choice, latency_ms: float, ok: bool) -> None:
        """The request started with :meth:`begin` ended, successfully or not."""
        # The record may have been replaced or evicted meanwhile; its stats object is
        # still the one this request was counted in.
        choice.record.stats.finish(latency_ms, ok, choice.capability)
        self._totals["requests"] += 1
        if not ok:
            self._totals["errors"] += 1

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live record as the JSON shape of ``GET /registry``."""
        now = self._clock()
        return [self._describe(r, now) for r in self.records()]

    def totals(self) -> dict[str, int]:
        """Requests and errors since start (departed replicas included), and in flight now."""
        in_flight = sum(r.stats.in_flight for r in self._records.values())
        return {**self._totals, "in_flight": in_flight}

    def _describe(self, record: ReplicaRecord, now: float) -> dict[str, Any]:
        age = max(0.0, now - record.renewed)
        stats = record.stats
        return {
            "replica_id": record.replica_id,
            "endpoint": record.endpoint,
            "capabilities": [c.to_dict() for c in record.capabilities],
            "registered_at": record.registered_at,
            "last_heartbeat": record.last_heartbeat,
            "heartbeat_age": round(age, 3),
            # "stale" means heartbeats are late: the replica may be gone and will be
            # evicted when the lease runs out.
            "state": "ready" if age <= 2 * self.heartbeat_interval else "stale",
            "in_flight": stats.in_flight,
            "requests": stats.requests,
            "errors": stats.errors,
            "p50_ms": stats.percentile(0.50),
            "p99_ms": stats.percentile(0.99),
        }

    # ------------------------------------------------------------------ helpers

    def _expired(self, record: ReplicaRecord, now: float) -> bool:
        return now - record.renewed > self.lease_ttl

    @staticmethod
    def _check_owner(record: ReplicaRecord, instance: str | None, action: str) -> None:
        if instance is not None and record.instance is not None and instance != record.instance:
            raise Conflict(
                f"{action} refused: replica id {record.replica_id!r} belongs to another "
                f"process (instance {record.instance}); give each replica a unique --replica-id"
            )

    @staticmethod
    def _parse(body: Any) -> tuple[str, str, list[Capability], str | None]:
        if not isinstance(body, dict):
            raise BadRequest(
                "the body must be a JSON object with replica_id, endpoint, capabilities"
            )
        replica_id = body.get("replica_id")
        if not isinstance(replica_id, str) or not replica_id or len(replica_id) > _ID_MAX:
            raise BadRequest(f"'replica_id' must be a non-empty string, got {replica_id!r}")
        if not set(replica_id) <= _ID_CHARS:
            # Ids travel in HTTP headers and gRPC metadata (ASCII), comma-separated in
            # X-Delegated-From and as id=load pairs in X-AnyServe-Candidates.
            raise BadRequest(
                f"'replica_id' {replica_id!r} may use printable ASCII only, without spaces, "
                "commas or '='"
            )
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or ":" not in endpoint or endpoint.strip() != endpoint:
            raise BadRequest(f"'endpoint' must be 'host:port', got {endpoint!r}")
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRequest(f"'endpoint' must be 'host:port', got {endpoint!r}")
        raw_caps = body.get("capabilities")
        if not isinstance(raw_caps, list):
            raise BadRequest("'capabilities' must be a list of objects")
        capabilities = [Capability.parse(c) for c in raw_caps]
        instance = body.get("instance")
        if instance is not None and not isinstance(instance, str):
            raise BadRequest(f"'instance' must be a string, got {instance!r}")
        return replica_id, endpoint, capabilities, instance
