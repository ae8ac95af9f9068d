"""A :class:`Snapshot`: the state of ``anyserve up`` as plain frozen data.

The supervisor builds it; the dashboard draws it; the control endpoint sends it (through
:meth:`Snapshot.to_dict`, JSON-able) to ``anyserve ps`` and ``anyserve status`` in another
terminal, which read it back with :meth:`Snapshot.from_dict`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from anyserve.up.state import Phase, Proc


@dataclass(frozen=True)
class ProcessView:
    """One child process as the dashboard and ``anyserve ps`` show it."""

    name: str
    group: str
    kind: str
    state: str
    pid: int | None = None
    port: int | None = None
    replica_id: str | None = None
    restarts: int = 0
    uptime: float | None = None
    cpu: float | None = None
    rss: int | None = None
    exit_code: int | None = None
    backoff: float | None = None
    retry_in: float | None = None
    message: str = ""
    stderr_tail: tuple[str, ...] = ()

    @classmethod
    def of(cls, p: Proc, now: float, sample: tuple[float, int] | None) -> ProcessView:
        """``p`` at ``now`` (on the supervisor's clock), with its CPU % and RSS if known."""
        return cls(
            name=p.name,
            group=p.group,
            kind=p.kind,
            state=p.state,
            pid=p.pid if p.child else None,
            port=p.port,
            replica_id=p.replica_id,
            restarts=p.restarts,
            uptime=(now - p.started_at) if p.child and p.started_at else None,
            cpu=sample[0] if sample else None,
            rss=sample[1] if sample else None,
            exit_code=p.exit_code,
            backoff=p.backoff if p.retry_at is not None else None,
            retry_in=max(0.0, p.retry_at - now) if p.retry_at is not None else None,
            message=p.message,
            stderr_tail=p.stderr_tail,
        )


@dataclass(frozen=True)
class ReplicaView:
    """One replica record from the API server's registry, with its load and latency."""

    replica_id: str
    endpoint: str
    capabilities: tuple[dict[str, Any], ...] = ()
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @classmethod
    def from_registry(cls, record: Mapping[str, Any]) -> ReplicaView:
        def number(key: str) -> float | None:
            value = record.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        def count(key: str) -> int:
            # A malformed record must not break the frame (or `anyserve ps`).
            value = record.get(key)
            return int(value) if isinstance(value, (int, float)) else 0

        return cls(
            replica_id=str(record.get("replica_id", "?")),
            endpoint=str(record.get("endpoint", "")),
            capabilities=tuple(c for c in record.get("capabilities") or () if isinstance(c, dict)),
            in_flight=count("in_flight"),
            requests=count("requests"),
            errors=count("errors"),
            p50_ms=number("p50_ms"),
            p99_ms=number("p99_ms"),
        )


@dataclass(frozen=True)
class LogLine:
    at: float
    name: str
    text: str
    kind: str = "output"


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame of the dashboard shows."""

    topology: str
    api_url: str
    pid: int
    started_at: float
    state: str = Phase.RUNNING
    api_reachable: bool = False
    processes: tuple[ProcessView, ...] = ()
    replicas: tuple[ReplicaView, ...] = ()
    events: tuple[LogLine, ...] = ()
    logs: tuple[LogLine, ...] = ()
    taken_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            topology=data["topology"],
            api_url=data["api_url"],
            pid=data["pid"],
            started_at=data["started_at"],
            state=data.get("state", Phase.RUNNING),
            api_reachable=bool(data.get("api_reachable")),
            processes=tuple(
                ProcessView(**{**p, "stderr_tail": tuple(p.get("stderr_tail", ()))})
                for p in data.get("processes", ())
            ),
            replicas=tuple(
                ReplicaView(**{**r, "capabilities": tuple(r.get("capabilities", ()))})
                for r in data.get("replicas", ())
            ),
            events=tuple(LogLine(**e) for e in data.get("events", ())),
            logs=tuple(LogLine(**e) for e in data.get("logs", ())),
            taken_at=data.get("taken_at", time.time()),
        )
