"""The replica registry: leases, capability matching and load counters.

Pure bookkeeping with no I/O: the API server feeds it registrations, heartbeats and
request outcomes, and asks it which replica should take a request. Time comes from
the two clocks passed in (``clock`` for lease arithmetic, ``wall`` for the timestamps
shown to people), which is the seam the tests use to expire leases without sleeping.

Matching follows docs/protocol.md: a query is a dict of lowercased keys; a capability
matches when every key is present with an equal value compared as text (booleans as
``true``/``false``). The ``stream`` key is not an attribute: it separates capabilities
reachable only through ``/infer/stream`` from the unary ones.

Which matching replica takes a request (:meth:`Registry.choose`): one that is healthy
(answers the API server's health checks), not ejected (passive ejection after a failed
connection, see :meth:`Registry.eject`) and below its ``max_in_flight``; among those the
least loaded, ties in turn. When every usable one is at its limit the request waits in a
bounded queue per query (:meth:`Registry.enqueue`) and is handed the first slot that frees
on a replica it may use, oldest first.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anyserve.addresses import Resolver, is_loopback, localhost_addresses
from anyserve.capability import capability_text, format_query, value_text
from anyserve.defaults import MAX_IN_FLIGHT, MAX_IN_FLIGHT_LIMIT
from anyserve.errors import (
    AnyServeError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NoHealthyReplica,
    NoMatchingCapability,
    Overloaded,
    RegistryFull,
    TooManyRegistrations,
)
from anyserve.signature import Tensor, tensors_from_json

__all__ = [
    "Capability",
    "CapabilityStats",
    "Choice",
    "Conflict",
    "Forbidden",
    "Gone",
    "NoHealthyReplica",
    "Overloaded",
    "RateLimiter",
    "Registry",
    "RegistryFull",
    "ReplicaRecord",
    "ReplicaStats",
    "TooManyRegistrations",
    "Waiter",
    "capability_text",
    "format_query",
    "parse_endpoint",
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

#: Passive ejection: a replica that fails a connection is out of rotation for this long,
#: doubled for each further failure in a row, up to ``EJECT_MAX`` (the shape of Envoy's outlier
#: detection). 1 s is short enough for a replica restarted on the same port to be back at
#: once; 30 s is Envoy's base ejection time, a fair price for a replica that keeps failing.
EJECT_BASE = 1.0
EJECT_MAX = 30.0
#: Registered replicas at most. Each costs a gRPC channel and a health check a second; a
#: registry larger than any real deployment means a runaway or hostile registrant.
MAX_REPLICAS = 1024
#: Requests that may wait for a free replica, per query. Enough to ride out a burst of a few
#: times the replicas' concurrency; beyond it waiting only adds latency, so they are shed.
MAX_QUEUE = 64
#: Waiting requests in all queues together: queues are keyed by what clients ask for, so
#: their number is bounded only by this.
MAX_WAITING = 4096

#: Capabilities one registration may declare, attributes one capability may have, and how
#: long a key or a value's text may be. A real app declares a handful of each; the bounds keep
#: one registration from making every lookup, 404 message and dashboard row expensive (40,000
#: capabilities in one 1 MiB body made each 404 take seconds before they existed).
MAX_CAPABILITIES = 256
MAX_ATTRIBUTES = 32
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 256
#: How many distinct capabilities a 404 message lists before it says "and more".
MISS_LISTED = 20

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Keys travel as X-Capability-<Key> headers and gRPC metadata: printable ASCII, no spaces.
_KEY_CHARS = frozenset(map(chr, range(0x21, 0x7F)))
# Control characters (C0, DEL, C1) would forge lines in logs and terminals.
# Registration keys that carry tensor declarations rather than matching attributes.
_DECLARED = ("inputs", "outputs")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def parse_endpoint(endpoint: Any) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; :class:`BadRequest` unless it is a plain host name,
    IPv4 address or ``[IPv6]`` address and a port in 1-65535 (no gRPC target schemes)."""
    if not isinstance(endpoint, str) or not 3 <= len(endpoint) <= 270:
        raise BadRequest(f"'endpoint' must be 'host:port', got {endpoint!r}")
    host, _, port = endpoint.rpartition(":")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise BadRequest(f"'endpoint' {endpoint!r} needs a port from 1 to 65535 after the last ':'")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise BadRequest(f"'endpoint' {endpoint!r}: {host} is not an IPv6 address") from None
        return host, int(port)
    labels = host.removesuffix(".").split(".")
    numeric = all(label.isdigit() for label in labels)
    if numeric:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise BadRequest(f"'endpoint' {endpoint!r}: {host} is not an IPv4 address") from None
    elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise BadRequest(
            f"'endpoint' {endpoint!r}: {host!r} is not a host name or address "
            "(write IPv6 addresses in brackets: [::1]:50051)"
        )
    return host, int(port)


@dataclass(frozen=True)
class Capability:
    """One registered capability: its attributes, and whether it streams."""

    attrs: dict[str, Any]
    stream: bool = False
    #: Lowercased keys and textual values, precomputed because every request compares them.
    match_keys: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: The ``anyserve-capability`` gRPC metadata value, precomputed for the same reason.
    metadata: str = field(default="", compare=False, repr=False)
    #: How it is shown (:func:`capability_text`), precomputed: 404 messages list many.
    label: str = field(default="", compare=False, repr=False)
    #: Declared tensors, for v2 metadata; never matched against (they are not attributes).
    inputs: tuple[Tensor, ...] = field(default=(), compare=False, repr=False)
    outputs: tuple[Tensor, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, raw: Any) -> Capability:
        """Validate one registration entry; raise :class:`BadRequest` if malformed."""
        if not isinstance(raw, dict) or not raw:
            raise BadRequest(f"a capability must be a non-empty JSON object, got {raw!r}")
        stream = raw.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"capability 'stream' must be true or false, got {stream!r}")
        declared: dict[str, tuple[Tensor, ...]] = {}
        for key in _DECLARED:
            if key in raw:
                try:
                    declared[key] = tensors_from_json(raw[key], key)
                except (TypeError, ValueError) as exc:
                    raise BadRequest(f"capability {key}: {exc}") from None
        if len(raw) - ("stream" in raw) - len(declared) > MAX_ATTRIBUTES:
            raise BadRequest(f"a capability may have at most {MAX_ATTRIBUTES} attributes")
        attrs: dict[str, Any] = {}
        for key, value in raw.items():
            if (
                not isinstance(key, str)
                or not 0 < len(key) <= MAX_KEY_LENGTH
                or not set(key) <= _KEY_CHARS
            ):
                raise BadRequest(
                    f"capability keys must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
                    f"without spaces, got {_shorten(key)}"
                )
            if key == "stream" or key in declared:
                continue
            if value is None or not isinstance(value, (str, int, float, bool)):
                raise BadRequest(
                    f"capability {key!r} must be a string, number or boolean, got {_shorten(value)}"
                )
            text = value_text(value)
            if len(text) > MAX_VALUE_LENGTH or _CONTROL.search(text):
                raise BadRequest(
                    f"capability {key!r}: a value is at most {MAX_VALUE_LENGTH} characters "
                    f"without control characters, got {_shorten(value)}"
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
            label=capability_text(attrs, stream),
            inputs=declared.get("inputs", ()),
            outputs=declared.get("outputs", ()),
        )

    def matches(self, query: Mapping[str, str], stream: bool) -> bool:
        """True when every query key is present here with the same text value."""
        if self.stream != stream:
            return False
        keys = self.match_keys
        return all(keys.get(k) == v for k, v in query.items())

    def to_dict(self) -> dict[str, Any]:
        """The registration form: attributes plus ``"stream": true`` when streaming."""
        out = {**self.attrs, "stream": True} if self.stream else dict(self.attrs)
        if self.inputs or self.outputs:
            out["inputs"] = [t.to_dict() for t in self.inputs]
            out["outputs"] = [t.to_dict() for t in self.outputs]
        return out

    def __str__(self) -> str:
        return self.label or capability_text(self.attrs, self.stream)


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

    def release(self, capability: Capability | None = None) -> None:
        """Undo a :meth:`begin` for a request that was never sent (it gave up its slot)."""
        self.in_flight = max(0, self.in_flight - 1)
        if capability is not None:
            stats = self.by_capability.get((capability.metadata, capability.stream))
            if stats is not None:
                stats.in_flight = max(0, stats.in_flight - 1)

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
    #: Requests the API server may have in flight on it at once (from its registration).
    max_in_flight: int = MAX_IN_FLIGHT
    #: False while it fails the API server's health checks; out of rotation meanwhile.
    healthy: bool = True
    #: ``clock`` time of the first failed check in the current run of failures.
    unhealthy_since: float = 0.0
    #: ``clock`` time until which it is out of rotation after a failure (passive ejection),
    #: and when that ejection started.
    ejected_until: float = 0.0
    ejected_at: float = 0.0
    #: Ejections in a row with no successful request between them; doubles the next period.
    ejections: int = 0
    #: Why it is (or last was) out of rotation, shown in ``/registry``.
    problem: str | None = None

    def usable(self, now: float) -> bool:
        """Healthy and not ejected at ``clock`` time ``now``."""
        return self.healthy and self.ejected_until <= now


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


class Waiter:
    """A request waiting for a free replica; ``deliver`` hands it a :class:`Choice` whose
    slot is already taken, and returns False if the request no longer wants it."""

    __slots__ = ("deliver", "exclude", "key", "query", "queued", "seq", "stream")

    def __init__(
        self,
        key: tuple[tuple[tuple[str, str], ...], bool],
        query: Mapping[str, str],
        stream: bool,
        exclude: Collection[str],
        deliver: Callable[[Choice], bool],
        seq: int,
    ) -> None:
        self.key = key
        self.query = query
        self.stream = stream
        self.exclude = exclude
        self.deliver = deliver
        self.seq = seq
        self.queued = True


class RateLimiter:
    """Token buckets per key (a client address): ``rate`` tokens a second, at most ``burst``.

    Pure arithmetic on the ``clock`` passed in. At most ``max_keys`` buckets are kept; the
    least recently used is forgotten first (it comes back full, as a new client would).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when allowed, else the seconds until one is there."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return 0.0 if allowed else (1.0 - tokens) / self.rate


class Registry:
    """Registered replicas with leases, matching, and per-replica load counters.

    ``clock`` measures leases, ejections and waits (monotonic by default so a wall-clock
    jump evicts no one); ``wall`` stamps ``registered_at`` / ``last_heartbeat`` for display.
    ``loopback_only`` refuses endpoints that are not on this machine (the API server sets it
    when it has no token: anyone who can reach it could register).
    """

    def __init__(
        self,
        lease_ttl: float = 8.0,
        heartbeat_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        *,
        max_replicas: int = MAX_REPLICAS,
        max_queue: int = MAX_QUEUE,
        loopback_only: bool = False,
        resolve: Resolver = localhost_addresses,
    ) -> None:
        if lease_ttl <= 0 or heartbeat_interval <= 0:
            raise ValueError("lease_ttl and heartbeat_interval must be positive")
        self.lease_ttl = lease_ttl
        self.heartbeat_interval = heartbeat_interval
        self.max_replicas = max_replicas
        self.max_queue = max_queue
        self.loopback_only = loopback_only
        self._resolve = resolve
        self._clock = clock
        self._wall = wall
        self._records: dict[str, ReplicaRecord] = {}
        # Totals over every request since start, including replicas that have left.
        self._totals = {"requests": 0, "errors": 0}
        # Requests in flight on every replica together (the retry budget is a share of it).
        self._in_flight = 0
        # Replica processes unregistered on purpose (a drain before a reload, `registry rm`):
        # their heartbeats must not bring them back. Only explicit registration does.
        self._unregistered: dict[tuple[str, str | None], None] = {}
        # Round-robin position per (query, stream): spreads ties evenly and deterministically.
        self._turns: dict[tuple[tuple[tuple[str, str], ...], bool], int] = {}
        # Requests waiting for a free replica, one FIFO per (query, stream); empty ones removed.
        self._queues: dict[tuple[tuple[tuple[str, str], ...], bool], deque[Waiter]] = {}
        self._waiting = 0
        self._max_waiting = max(MAX_WAITING, max_queue)
        self._seq = itertools.count()

    # ------------------------------------------------------------------ membership

    def register(self, body: Any, *, trusted: bool = False) -> ReplicaRecord:
        """Add or replace a replica from a ``/register`` body; all-or-nothing.

        Raises :class:`BadRequest` for a malformed body, :class:`Forbidden` for an endpoint
        the policy refuses or for a live record owned by a replica process (see
        :meth:`_check_owner`; ``trusted`` is a caller that showed the token),
        :class:`Conflict` for one owned by another instance, and :class:`RegistryFull`
        for a new id when the registry is full (and changes nothing).
        """
        replica_id, endpoint, capabilities, instance, max_in_flight = self._parse(body)
        now, wall = self._clock(), self._wall()
        previous = self._records.get(replica_id)
        if previous is not None and not self._expired(previous, now):
            self._check_owner(previous, instance, "register", trusted)
        if previous is None and self.max_replicas <= sum(
            1 for r in self._records.values() if not self._expired(r, now)
        ):
            raise RegistryFull(
                f"the registry is full ({self.max_replicas} replicas); replica {replica_id!r} "
                "was not registered. Unregister replicas that are gone, or start the API server "
                "with a larger --max-replicas"
            )
        # Counters survive a re-registration of the same id (a restarted replica, a
        # heartbeat after an API server hiccup): history stays, and requests still in
        # flight to the old record are still accounted for when they finish.
        stats = previous.stats if previous is not None else ReplicaStats()
        self._unregistered.pop((replica_id, instance), None)
        # A new record starts healthy and not ejected: a restarted replica is routable at once.
        record = ReplicaRecord(
            replica_id=replica_id,
            endpoint=endpoint,
            capabilities=capabilities,
            instance=instance,
            registered_at=wall,
            last_heartbeat=wall,
            renewed=now,
            stats=stats,
            max_in_flight=max_in_flight,
        )
        self._records[replica_id] = record
        self._dispatch(record)
        return record

    def heartbeat(self, body: Any, *, trusted: bool = False) -> tuple[ReplicaRecord, bool]:
        """Renew a lease; returns ``(record, registered)``.

        A heartbeat for an unknown id registers it (``registered`` is True), which is
        how a restarted API server repopulates itself, except from a process that was
        unregistered explicitly (:class:`Gone`): it is being drained or was removed, and
        only an explicit ``register`` brings it back. A heartbeat from another
        ``instance`` than the record's raises :class:`Conflict`.
        """
        replica_id, endpoint, capabilities, instance, max_in_flight = self._parse(body)
        record = self._records.get(replica_id)
        if record is None or self._expired(record, self._clock()):
            if (replica_id, instance) in self._unregistered:
                raise Gone(
                    f"replica {replica_id!r} was unregistered and is not re-registered by "
                    "its heartbeats; restart it (or POST /register) to serve again"
                )
            return self.register(body, trusted=trusted), True
        self._check_owner(record, instance, "heartbeat", trusted)
        record.renewed = self._clock()
        record.last_heartbeat = self._wall()
        # A heartbeat carries the full registration, so it also refreshes what changed.
        record.endpoint = endpoint
        record.capabilities = capabilities
        if record.max_in_flight != max_in_flight:
            record.max_in_flight = max_in_flight
            self._dispatch(record)
        return record, False

    def known(self, replica_id: Any) -> bool:
        """Whether ``replica_id`` has a live record (a heartbeat for it only renews it)."""
        record = self._records.get(replica_id) if isinstance(replica_id, str) else None
        return record is not None and not self._expired(record, self._clock())

    def unregister(
        self, replica_id: Any, instance: Any = None, *, trusted: bool = False
    ) -> ReplicaRecord | None:
        """Remove a record if ``instance`` is its owner; None if unknown.

        Without an instance only a record made by hand, or a ``trusted`` caller (one that
        showed the API server's token), may remove it. Raises :class:`Conflict` or
        :class:`Forbidden` and keeps the record otherwise (see :meth:`_check_owner`).
        """
        if not isinstance(replica_id, str) or not replica_id:
            raise BadRequest("'replica_id' must be a non-empty string")
        if instance is not None and not isinstance(instance, str):
            raise BadRequest("'instance' must be a string")
        record = self._records.get(replica_id)
        if record is None:
            return None
        self._check_owner(record, instance, "unregister", trusted)
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

    def now(self) -> float:
        """The registry's ``clock`` (health checks say when they started in its time)."""
        return self._clock()

    def records(self) -> list[ReplicaRecord]:
        """Live records in registration order."""
        now = self._clock()
        return [r for r in self._records.values() if not self._expired(r, now)]

    def endpoints(self) -> set[str]:
        """Endpoints of the live records (the API server keeps a channel for each)."""
        return {r.endpoint for r in self.records()}

    def __len__(self) -> int:
        return len(self.records())

    # ------------------------------------------------------------------ health

    def eject(self, record: ReplicaRecord, problem: str) -> float | None:
        """Take ``record`` out of rotation after a failed connection (passive ejection).

        Returns the seconds it is out for: ``EJECT_BASE`` doubled for every ejection in a
        row, capped at ``EJECT_MAX``. Returns None, and ejects nothing, when it is already
        out, no longer registered, or when ejecting it would leave fewer than half of the
        replicas of one of its capabilities in rotation: a failure that hits them all is
        more likely the network's or the API server's own, and a replica tried is better
        than none.
        """
        now = self._clock()
        if self._records.get(record.replica_id) is not record or record.ejected_until > now:
            return None
        for capability in record.capabilities:
            peers = [
                r
                for r in self._records.values()
                if not self._expired(r, now) and capability in r.capabilities
            ]
            out = sum(1 for r in peers if r.ejected_until > now)
            if out + 1 > len(peers) // 2:
                return None
        period = min(EJECT_MAX, EJECT_BASE * 2 ** min(record.ejections, 16))
        record.ejections += 1
        record.ejected_at = now
        record.ejected_until = now + period
        record.problem = problem
        return period

    def set_health(
        self, record: ReplicaRecord, healthy: bool, problem: str | None = None, since: float = 0.0
    ) -> bool:
        """Record a health check of ``record`` that started at ``clock`` time ``since``.

        A failed check takes it out of rotation until a check passes. A passed check also
        ends a passive ejection that began before the check did (as Envoy does with active
        health checking): a replica restarted on the same port is routable again at once.
        Returns True when this changed whether the replica is in rotation.
        """
        if self._records.get(record.replica_id) is not record:
            return False
        now = self._clock()
        before = record.usable(now)
        if healthy:
            record.healthy = True
            if record.ejected_until > now and record.ejected_at < since:
                record.ejected_until = 0.0
        else:
            if record.healthy:
                record.unhealthy_since = now
            record.healthy = False
            record.problem = problem
        after = record.usable(now)
        if after and not before:
            self._dispatch(record)
        return after != before

    # ------------------------------------------------------------------ routing

    def candidates(
        self, query: Mapping[str, str], stream: bool, exclude: Iterable[str] = ()
    ) -> list[tuple[ReplicaRecord, Capability]]:
        """Live replicas with a capability matching ``query``, with that capability.

        When a replica has several matching capabilities the most specific one (fewest
        attributes, then declaration order) is the one its handler is chosen by. Health
        and load are not considered here; :meth:`try_acquire` does.
        """
        excluded = set(exclude)
        found = []
        for record in self.records():
            if record.replica_id in excluded:
                continue
            capability = _most_specific(record, query, stream)
            if capability is not None:
                found.append((record, capability))
        return found

    def try_acquire(
        self, query: Mapping[str, str], stream: bool = False, exclude: Collection[str] = ()
    ) -> Choice | None:
        """Pick the least-loaded usable matching replica below its limit (ties in turn) and
        count the request in flight on it; None when every usable match is at its
        ``max_in_flight``: the caller then waits for a slot (:meth:`enqueue`).

        Raises :class:`NoMatchingCapability` (404) with a message listing what exists, and
        :class:`NoHealthyReplica` (503) when every match is ejected or unhealthy.
        """
        picked = self._pick(query, stream, exclude)
        if isinstance(picked, Choice):
            self.begin(picked)
            return picked
        now = self._clock()
        if any(r.usable(now) for r, _ in picked):
            return None
        raise self._unavailable(query, stream, picked, now)

    def _pick(
        self, query: Mapping[str, str], stream: bool, exclude: Collection[str]
    ) -> Choice | list[tuple[ReplicaRecord, Capability]]:
        """:meth:`try_acquire`'s pick, or every match when none of them can take a request."""
        found = self.candidates(query, stream, exclude)
        if not found:
            raise NoMatchingCapability(self.describe_miss(query, stream, exclude))
        now = self._clock()
        ready = [(r, c) for r, c in found if r.usable(now) and r.stats.in_flight < r.max_in_flight]
        if not ready:
            return found
        least = min(r.stats.in_flight for r, _ in ready)
        ties = [(r, c) for r, c in ready if r.stats.in_flight == least]
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
        # Linear and bounded: a registry may hold thousands of capabilities, and every
        # unauthenticated 404 builds this message on the event loop.
        existing: dict[str, None] = {}
        more = False
        for record in self.records():
            for capability in record.capabilities:
                if capability.label in existing:
                    continue
                if len(existing) == MISS_LISTED:
                    more = True
                    break
                existing[capability.label] = None
            if more:
                break
        if not existing:
            return f"{message}; no replicas are registered (start one with `anyserve up`)"
        hint = ""
        if any(c.matches(query, not stream) for r in self.records() for c in r.capabilities):
            route = "/infer/json or /infer" if stream else "/infer/stream"
            hint = f" (a {'unary' if stream else 'streaming'} one matches: use {route})"
        listed = ", ".join(existing) + (", and more (see /registry)" if more else "")
        return f"{message}{hint}; registered: {listed}"

    def begin(self, choice: Choice) -> None:
        """A request was sent to the chosen replica (it now counts as in flight)."""
        choice.record.stats.begin(choice.capability)
        self._in_flight += 1

    def finish(self, choice: Choice, latency_ms: float, ok: bool) -> None:
        """The request started with :meth:`begin` ended, successfully or not."""
        # The record may have been replaced or evicted meanwhile; its stats object is
        # still the one this request was counted in.
        record = choice.record
        record.stats.finish(latency_ms, ok, choice.capability)
        self._in_flight -= 1
        self._totals["requests"] += 1
        if not ok:
            self._totals["errors"] += 1
        elif record.ejections:
            record.ejections = 0  # it answered: the next ejection starts short again
        if self._waiting:
            self._dispatch(self._records.get(record.replica_id))

    def release(self, choice: Choice) -> None:
        """Give back the slot of a request that was never sent (it gave up while waiting)."""
        choice.record.stats.release(choice.capability)
        self._in_flight -= 1
        if self._waiting:
            self._dispatch(self._records.get(choice.record.replica_id))

    # ------------------------------------------------------------------ waiting

    def enqueue(
        self,
        query: Mapping[str, str],
        stream: bool,
        exclude: Collection[str],
        deliver: Callable[[Choice], bool],
    ) -> Waiter:
        """Wait for a slot on a replica matching ``query``: ``deliver`` gets the first one free.

        Raises :class:`Overloaded` when this query's queue (or all queues together) is full.
        The caller must :meth:`dequeue` the waiter if it stops waiting undelivered.
        """
        key = (tuple(sorted(query.items())), stream)
        queue = self._queues.get(key)
        if queue is None:
            queue = deque()
        if len(queue) >= self.max_queue or self._waiting >= self._max_waiting:
            kind = "streaming " if stream else ""
            raise Overloaded(
                f"every replica serving {kind}{format_query(query)} is at its limit and "
                f"{len(queue)} requests are already waiting; retry later, or add replicas"
            )
        waiter = Waiter(key, query, stream, exclude, deliver, next(self._seq))
        queue.append(waiter)
        self._queues[key] = queue
        self._waiting += 1
        return waiter

    def dequeue(self, waiter: Waiter) -> None:
        """Stop ``waiter`` waiting (its request timed out or went away); idempotent."""
        if not waiter.queued:
            return
        waiter.queued = False
        queue = self._queues[waiter.key]
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.key]
        self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Requests waiting for a free replica."""
        return self._waiting

    @property
    def active(self) -> int:
        """Requests in flight on replicas plus those waiting for one."""
        return self._in_flight + self._waiting

    def dispatch(self) -> None:
        """Hand every free slot to a waiting request (after ejections ran out, say)."""
        if self._waiting:
            for record in list(self._records.values()):
                self._dispatch(record)

    def _dispatch(self, record: ReplicaRecord | None) -> None:
        """Give ``record``'s free slots to the longest-waiting requests it can serve."""
        if record is None or self._records.get(record.replica_id) is not record:
            return
        now = self._clock()
        if self._expired(record, now):
            return
        while (
            self._waiting and record.stats.in_flight < record.max_in_flight and record.usable(now)
        ):
            best: tuple[Waiter, Capability] | None = None
            for queue in self._queues.values():
                head = queue[0]
                if best is not None and head.seq > best[0].seq:
                    continue
                capability = _most_specific(record, head.query, head.stream)
                if capability is None:
                    continue
                # Usually the head; a request delegated from this replica skips it.
                waiter = next((w for w in queue if record.replica_id not in w.exclude), None)
                if waiter is not None and (best is None or waiter.seq < best[0].seq):
                    best = (waiter, capability)
            if best is None:
                return
            waiter, capability = best
            self.dequeue(waiter)
            choice = Choice(record, capability, ((record.replica_id, record.stats.in_flight),))
            self.begin(choice)
            if not waiter.deliver(choice):
                record.stats.release(capability)
                self._in_flight -= 1

    def _unavailable(
        self,
        query: Mapping[str, str],
        stream: bool,
        found: list[tuple[ReplicaRecord, Capability]],
        now: float,
    ) -> AnyServeError:
        """The error for matches none of which is usable (ejected or failing health checks)."""
        kind = "streaming " if stream else ""
        reasons = []
        for record, _ in found:
            if not record.healthy:
                reasons.append(f"{record.replica_id} fails health checks ({record.problem})")
            else:
                left = record.ejected_until - now
                reasons.append(
                    f"{record.replica_id} is out of rotation for {left:.1f}s more "
                    f"after a failure ({record.problem})"
                )
        return NoHealthyReplica(
            f"no replica serving {kind}{format_query(query)} is available: " + "; ".join(reasons)
        )

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
        # "unhealthy": failing health checks; "ejected": out of rotation for a while after a
        # failed connection; "stale": heartbeats are late, it may be gone and will be
        # evicted when the lease runs out (it still takes requests meanwhile).
        if not record.healthy:
            state = "unhealthy"
        elif record.ejected_until > now:
            state = "ejected"
        elif age > 2 * self.heartbeat_interval:
            state = "stale"
        else:
            state = "ready"
        return {
            "replica_id": record.replica_id,
            "endpoint": record.endpoint,
            "capabilities": [c.to_dict() for c in record.capabilities],
            "registered_at": record.registered_at,
            "last_heartbeat": record.last_heartbeat,
            "heartbeat_age": round(age, 3),
            "state": state,
            "problem": record.problem if state in ("unhealthy", "ejected") else None,
            "ejected_for": round(max(0.0, record.ejected_until - now), 3),
            # How long it has failed health checks: a supervisor restarts it past a limit.
            "unhealthy_for": 0.0 if record.healthy else round(now - record.unhealthy_since, 3),
            "in_flight": stats.in_flight,
            "max_in_flight": record.max_in_flight,
            "requests": stats.requests,
            "errors": stats.errors,
            "p50_ms": stats.percentile(0.50),
            "p99_ms": stats.percentile(0.99),
        }

    # ------------------------------------------------------------------ helpers

    def _expired(self, record: ReplicaRecord, now: float) -> bool:
        return now - record.renewed > self.lease_ttl

    @staticmethod
    def _check_owner(
        record: ReplicaRecord, instance: str | None, action: str, trusted: bool
    ) -> None:
        """A record made by a replica process (it sent its ``instance``, a secret it never
        shows) belongs to that process: only the same instance, or a caller holding the API
        server's token (``trusted``) without an instance, may act on it. A record made by
        hand, without an instance, belongs to no process and anyone may replace it."""
        if record.instance is None or instance == record.instance:
            return
        if instance is None:
            if trusted:
                return
            raise Forbidden(
                f"{action} refused: replica id {record.replica_id!r} belongs to a running "
                "replica process; only that process, or a caller with the API server's token, "
                "may change it (stop the replica, or use the token)"
            )
        # The instance is the lease's secret: never echo the owner's.
        raise Conflict(
            f"{action} refused: replica id {record.replica_id!r} belongs to another process; "
            "give each replica a unique --replica-id"
        )

    def _parse(self, body: Any) -> tuple[str, str, list[Capability], str | None, int]:
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
        host, _ = parse_endpoint(endpoint)
        if self.loopback_only and not is_loopback(host, self._resolve):
            raise Forbidden(
                f"replica {replica_id!r} at {endpoint}: without a token only endpoints on this "
                "machine (127.0.0.1, ::1, localhost) may register; give the API server and the "
                "replicas a token (ANYSERVE_TOKEN) to register replicas of other hosts"
            )
        raw_caps = body.get("capabilities")
        if not isinstance(raw_caps, list):
            raise BadRequest("'capabilities' must be a list of objects")
        if len(raw_caps) > MAX_CAPABILITIES:
            raise BadRequest(
                f"a replica may register at most {MAX_CAPABILITIES} capabilities, "
                f"got {len(raw_caps)}"
            )
        capabilities = [Capability.parse(c) for c in raw_caps]
        instance = body.get("instance")
        if instance is not None and (
            not isinstance(instance, str) or not 0 < len(instance) <= _ID_MAX
        ):
            raise BadRequest(f"'instance' must be a non-empty string, got {_shorten(instance)}")
        max_in_flight = body.get("max_in_flight", MAX_IN_FLIGHT)
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or not 0 < max_in_flight <= MAX_IN_FLIGHT_LIMIT
        ):
            raise BadRequest(
                f"'max_in_flight' must be a whole number from 1 to {MAX_IN_FLIGHT_LIMIT}, "
                f"got {max_in_flight!r}"
            )
        return replica_id, str(endpoint), capabilities, instance, max_in_flight


def _shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages echo untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _most_specific(
    record: ReplicaRecord, query: Mapping[str, str], stream: bool
) -> Capability | None:
    """The record's capability with the fewest attributes that matches, or None."""
    best: Capability | None = None
    for capability in record.capabilities:
        if capability.matches(query, stream) and (
            best is None or len(capability.attrs) < len(best.attrs)
        ):
            best = capability
    return best
