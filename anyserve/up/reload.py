"""The rolling reload of a group, one slot at a time.

For each slot: start the new process (the *candidate*), wait until it is registered,
unregister the old one (it then drains and stops), and wait, bounded, until it is gone.
A candidate that exits or never registers is killed; the old process keeps serving and
the error is shown. A slot with a fixed port goes through a bridge process on a free
port, since the old process still holds the fixed port while the new one starts; a
second round moves the slot back onto its fixed port.

The state machine works on the supervisor's process table through :class:`ReloadHost`,
so it knows nothing of threads, sockets or real processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from anyserve.process import free_port
from anyserve.topology import Topology
from anyserve.up.policy import Timings
from anyserve.up.state import EventKind, Kind, Proc, Reload, ReloadPhase, Role, State

RELOAD_FAILED = "reload failed"
"""How the message of a slot whose last reload failed starts (kept until one succeeds)."""


class ReloadHost(Protocol):
    """What a reload needs of the supervisor."""

    topology: Topology
    timings: Timings
    clock: Callable[[], float]
    procs: list[Proc]
    reloads: dict[str, Reload]
    replicas_started: bool

    def spawn(self, proc: Proc, port: int | None = None) -> None: ...
    def unregister(self, proc: Proc) -> None: ...
    def discard(self, proc: Proc) -> None: ...
    def say(self, message: str, name: str, kind: EventKind = EventKind.LIFECYCLE) -> None: ...


def request_reload(host: ReloadHost, group: str, slot: int | None, reason: str) -> None:
    """Start (or queue) a rolling reload of ``group`` (one ``slot`` or all)."""
    if not host.replicas_started:
        return
    current = host.reloads.get(group)
    if current is not None:
        current.again = True
        return
    slots = sorted(p.slot for p in host.procs if p.group == group and p.role is Role.SERVE)
    if slot is not None:
        slots = [s for s in slots if s == slot]
    if not slots:
        return
    host.reloads[group] = Reload(group=group, slots=slots, reason=reason, started=host.clock())
    host.say(f"reloading {group} ({reason})", group, kind=EventKind.RELOAD)


def step_reload(host: ReloadHost, op: Reload, now: float) -> None:
    """Move ``op`` on as far as ``now`` allows."""
    if op.phase is ReloadPhase.NEXT:
        _next_slot(host, op, now)
    elif op.phase is ReloadPhase.WAIT_READY:
        _wait_ready(host, op, now)
    elif op.phase is ReloadPhase.DRAIN:
        _drain(host, op, now)


def _next_slot(host: ReloadHost, op: Reload, now: float) -> None:
    if not op.slots:
        return _finish(host, op, None)
    group = host.topology.group(op.group)
    slot = op.slots[0]
    old = next(
        (p for p in host.procs if p.group == op.group and p.slot == slot and p.role is Role.SERVE),
        None,
    )
    if old is None:
        op.slots.pop(0)
        return None
    if old.child is None or old.state not in (State.READY, State.STARTING):
        # Nothing serves in this slot (crashed, backing off, stuck): no traffic to
        # protect, so start it with the new code right away. A process still starting
        # may already be registered (and receiving requests) before the registry poll
        # notices, so it is replaced the rolling way like a ready one.
        op.slots.pop(0)
        if old.child is None:
            old.retry_at = now
        else:
            old.restart_now = True
            old.child.kill()
        return None
    fixed = group.port_for(slot)
    # The old process holds the fixed port, so the new one bridges on a free port;
    # a second round moves the slot back onto its fixed port.
    port = fixed if fixed is not None and old.port != fixed else free_port(group.host)
    candidate = Proc(group=op.group, slot=slot, kind=Kind.REPLICA, role=Role.CANDIDATE)
    candidate.restarts = old.restarts
    host.procs.append(candidate)
    host.spawn(candidate, port=port)
    op.old_state = old.state
    old.state = State.RELOADING
    op.old, op.candidate = old, candidate
    op.phase = ReloadPhase.WAIT_READY
    op.deadline = now + host.timings.ready_timeout
    return None


def _wait_ready(host: ReloadHost, op: Reload, now: float) -> None:
    cand, old = op.candidate, op.old
    assert cand is not None and old is not None
    if cand.state is State.READY:
        cand.role = Role.SERVE
        cand.failures = 0
        if old.child is not None:
            host.unregister(old)
        else:
            host.procs.remove(old)
        old.role = Role.RETIRE
        op.phase = ReloadPhase.DRAIN
        drain = host.topology.group(op.group).drain_timeout
        op.deadline = now + host.timings.settle + drain + 2 * host.timings.kill_margin
        return
    failed = cand.child is None
    if not failed and now < op.deadline:
        return
    host.discard(cand)
    why = (
        f"exited with code {cand.exit_code}"
        if failed
        else f"not registered within {host.timings.ready_timeout:.0f}s"
    )
    last = cand.stderr_tail[-1].strip() if cand.stderr_tail else ""
    message = f"{RELOAD_FAILED}: new process {why}" + (f": {last}" if last else "")
    if old.child is not None:
        old.state = op.old_state or State.READY
        old.message = message + " (old code still serving; save again to retry)"
    else:
        old.message = message
    host.say(message, old.name, kind=EventKind.ERROR)
    _finish(host, op, message)


def _drain(host: ReloadHost, op: Reload, now: float) -> None:
    old = op.old
    assert old is not None
    if old in host.procs and now < op.deadline:
        return
    if old in host.procs and old.child is not None:
        old.child.kill()
        return
    cand = op.candidate
    assert cand is not None
    fixed = host.topology.group(op.group).port_for(cand.slot)
    if fixed is None or cand.port == fixed:
        op.slots.pop(0)
    op.phase = ReloadPhase.NEXT
    op.candidate = op.old = None


def _finish(host: ReloadHost, op: Reload, error: str | None) -> None:
    del host.reloads[op.group]
    if error is None:
        took = host.clock() - op.started
        for proc in host.procs:
            if proc.group == op.group and proc.message.startswith(RELOAD_FAILED):
                proc.message = ""
        host.say(f"reloaded {op.group} in {took:.1f}s", op.group, kind=EventKind.RELOAD)
    if op.again:
        request_reload(host, op.group, None, "changed again during the reload")
