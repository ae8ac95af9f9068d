"""Stuck replicas: which replicas the probe asks ``ServerReady``, and what an answer (or
its absence) means for one of them.

One that has not answered for its group's ``stuck_timeout`` (its event loop is blocked,
or it was stopped) is SIGKILLed, and the normal restart path with backoff takes over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from anyserve.addresses import reachable_host
from anyserve.topology import Topology
from anyserve.up.state import EventKind, Kind, Proc, Role, State

Say = Callable[[str, str, EventKind], None]
"""``(message, process name, kind)``."""


def probe_targets(procs: Iterable[Proc], topology: Topology) -> dict[int, str]:
    """``{pid: endpoint}`` of the replicas the probe thread should ask ``ServerReady``."""
    targets: dict[int, str] = {}
    for proc in procs:
        if (
            proc.kind is not Kind.REPLICA
            or proc.child is None
            or proc.role is Role.RETIRE
            or proc.state not in (State.READY, State.UNHEALTHY)
            or proc.port is None
        ):
            continue
        group = topology.group(proc.group)
        if group.stuck_timeout is None:
            continue
        host = reachable_host(group.host)  # a wildcard bind is probed on loopback
        host = f"[{host}]" if ":" in host else host
        targets[proc.child.pid] = f"{host}:{proc.port}"
    return targets


def judge(
    proc: Proc,
    ok: bool,
    *,
    sent_at: float,
    now: float,
    bound: float | None,
    may_kill: bool,
    say: Say,
) -> None:
    """Mark ``proc`` unhealthy while it does not answer; kill it once stuck past ``bound``
    (unless ``may_kill`` is false: a group that never restarts is left as it is)."""
    if (
        proc.child is None
        or proc.stuck_for is not None  # already killed; its exit is on the way
        or proc.state not in (State.READY, State.UNHEALTHY)
    ):
        return
    if ok:
        if proc.state is State.UNHEALTHY:
            proc.state = State.READY
            proc.message = ""
            say("answers ServerReady again", proc.name, EventKind.LIFECYCLE)
        proc.unhealthy_since = None
        return
    if proc.unhealthy_since is None:
        proc.unhealthy_since = sent_at
        proc.state = State.UNHEALTHY
        say(f"pid {proc.child.pid} does not answer ServerReady", proc.name, EventKind.EXIT)
    silent = now - proc.unhealthy_since
    proc.message = f"no answer to ServerReady for {silent:.1f}s"
    if bound is None or silent < bound:
        return
    if not may_kill:
        proc.message += " (restart = 'never': left as it is)"
        return
    proc.stuck_for = silent
    say(
        f"stuck: no answer to ServerReady for {silent:.1f}s; killing pid {proc.child.pid}",
        proc.name,
        EventKind.ERROR,
    )
    proc.child.kill()  # SIGKILL ends a stopped process too; the exit path restarts it
