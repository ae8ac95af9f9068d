"""What the helper threads report to the supervisor loop: one small frozen type each.

Threads never touch the supervisor's state; they put one of these on its inbox (through
the ``report`` callable they were given) and the loop acts on it. A test drives the loop
the same way, by handing it a scripted sequence of messages.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from anyserve.errors import AnyServeError
from anyserve.up.state import EventKind


@dataclass(frozen=True)
class OutputLine:
    """A line a child wrote (``stream`` is ``"stdout"`` or ``"stderr"``)."""

    pid: int
    stream: str
    line: str


@dataclass(frozen=True)
class ApiHealthy:
    """The API server answered ``/health``."""


@dataclass(frozen=True)
class Registry:
    """What ``/registry`` listed; ``records`` is None when the API server did not answer."""

    records: tuple[Mapping[str, Any], ...] | None

    @classmethod
    def of(cls, *replica_ids: str) -> Registry:
        """Records naming just ``replica_ids`` (enough to mark those replicas ready)."""
        return cls(tuple({"replica_id": rid} for rid in replica_ids))


@dataclass(frozen=True)
class FilesChanged:
    paths: frozenset[str]


@dataclass(frozen=True)
class Note:
    """Something a helper thread has to say (its own trouble, usually)."""

    text: str
    kind: EventKind = EventKind.LIFECYCLE


@dataclass(frozen=True)
class ProbeAnswers:
    """One round of ``ServerReady``: ``{pid: answered ready}``, asked at ``sent_at``."""

    sent_at: float
    answers: Mapping[int, bool]


class Reply:
    """Where the loop puts its answer to a control request; the asking thread waits."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.value: Any = None
        self.error: AnyServeError | None = None

    def answer(self, value: Any) -> None:
        self.value = value
        self.ready.set()

    def fail(self, error: AnyServeError) -> None:
        self.error = error
        self.ready.set()


@dataclass(frozen=True)
class ControlRequest:
    """A command from ``anyserve ps/restart/scale/down``, answered through ``reply``."""

    request: Mapping[str, Any]
    reply: Reply = field(default_factory=Reply, compare=False)


Message = Union[OutputLine, ApiHealthy, Registry, FilesChanged, Note, ProbeAnswers, ControlRequest]
