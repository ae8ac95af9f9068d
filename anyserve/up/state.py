"""The states, kinds, roles and phases of ``anyserve up``, and its process table's rows.

Every label the supervisor compares is a member of a string-valued enum here, so a typo
is a name error rather than a state nobody ever enters. The values are the words the
dashboard and ``anyserve ps --json`` show; members are ``str`` and compare equal to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anyserve.process import ChildProcess


class Label(str, Enum):
    """A string-valued enum that prints as its value (``f"{State.READY}"`` is ``ready``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class State(Label):
    """Where one process is in its life, as shown in the STATE column."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    """Running, but not answering ``ServerReady``."""
    RELOADING = "reloading"
    """Serving while its replacement starts."""
    DRAINING = "draining"
    BACKING_OFF = "backing off"
    CRASH_LOOP = "crash loop"
    STOPPED = "stopped"


class Kind(Label):
    API = "api server"
    REPLICA = "replica"


class Role(Label):
    """What a process is for: a slot's serving process, a reload's new process that is
    not serving yet, or an old one on its way out."""

    SERVE = "serve"
    CANDIDATE = "candidate"
    RETIRE = "retire"


class Phase(Label):
    """The supervisor as a whole."""

    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"


class ReloadPhase(Label):
    """One slot of a rolling reload: start the new process, wait until it is
    registered, then drain the old one."""

    NEXT = "next"
    WAIT_READY = "wait_ready"
    DRAIN = "drain"


class EventKind(Label):
    """What an :class:`anyserve.logs.Event` says (events of the last three kinds are
    kept in the dashboard's Events list)."""

    OUTPUT = "output"
    LIFECYCLE = "lifecycle"
    RELOAD = "reload"
    ERROR = "error"
    EXIT = "exit"


class RestartMode(Label):
    """A group's ``restart`` setting."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


NOTABLE = (EventKind.RELOAD, EventKind.ERROR, EventKind.EXIT)
"""Event kinds the dashboard lists under Events."""


@dataclass
class Proc:
    """One slot's process (or a reload's new process) and everything known about it."""

    group: str
    slot: int
    kind: Kind
    port: int | None = None
    state: State = State.STARTING
    role: Role = Role.SERVE
    child: ChildProcess | None = None
    pid: int | None = None
    replica_id: str | None = None
    instance: str | None = field(default=None, repr=False)
    """The secret of ``replica_id``'s registration, handed to the replica by ``up``."""
    restarts: int = 0
    failures: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    retry_at: float | None = None
    backoff: float | None = None
    exit_code: int | None = None
    message: str = ""
    stderr_tail: tuple[str, ...] = ()
    term_at: float | None = None
    kill_at: float | None = None
    restart_now: bool = False
    unhealthy_since: float | None = None
    """When ``ServerReady`` first went unanswered (None while it answers)."""
    stuck_for: float | None = None
    """Set when the supervisor killed the process for not answering: for how long."""

    @property
    def name(self) -> str:
        return f"{self.group}.{self.slot}"

    @property
    def order(self) -> tuple[int, str, int, int]:
        """Sort key: the API server first, then by group and slot, a retiring process
        before the one that replaces it."""
        return (
            0 if self.kind is Kind.API else 1,
            self.group,
            self.slot,
            0 if self.role is Role.RETIRE else 1,
        )


@dataclass
class Reload:
    """A rolling reload of some slots of one group."""

    group: str
    slots: list[int]
    reason: str
    started: float
    candidate: Proc | None = None
    old: Proc | None = None
    phase: ReloadPhase = ReloadPhase.NEXT
    deadline: float = 0.0
    again: bool = False
    old_state: State | None = None
