"""The control commands ``anyserve up`` answers: ``ps``/``status``, ``down``, ``restart``
and ``scale``. The socket that carries them is :mod:`anyserve.control`; the supervisor
loop calls :func:`answer` with each request, so commands see a consistent state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from anyserve.errors import BadRequest, NotFound
from anyserve.topology import API_NAME, GroupSpec, Topology
from anyserve.up.reload import ReloadHost, request_reload
from anyserve.up.snapshot import Snapshot
from anyserve.up.state import EventKind, Kind, Proc, Role


class CommandHost(ReloadHost, Protocol):
    """What the commands need of the supervisor."""

    desired: dict[str, int]
    clock: Callable[[], float]

    def snapshot(self) -> Snapshot: ...
    def begin_stop(self, code: int, why: str) -> None: ...
    def add_slot(self, group: GroupSpec, slot: int) -> Proc: ...


def answer(host: CommandHost, request: Mapping[str, Any]) -> Any:
    """The reply to one control request; raises an :class:`AnyServeError` to refuse."""
    command = request.get("command")
    if command in ("ps", "status"):
        return host.snapshot().to_dict()
    if command == "down":
        host.begin_stop(0, "stopping (anyserve down)")
        return "stopping"
    if command == "restart":
        return restart(host, str(request.get("name", "")))
    if command == "scale":
        return scale(host, str(request.get("name", "")), request.get("count"))
    raise BadRequest(f"unknown command {command!r}")


def restart(host: CommandHost, name: str) -> str:
    """Restart the API server, or a group or slot one replica at a time (a reload)."""
    group, _, slot_text = name.partition(".")
    if group == API_NAME:
        api = next(p for p in host.procs if p.kind is Kind.API)
        api.failures = 0
        if api.child is not None:
            api.restart_now = True
            api.term_at = host.clock()
        else:
            api.retry_at = host.clock()
        return "restarting the API server"
    try:
        host.topology.group(group)
    except KeyError:
        raise NotFound(f"no process or group named {name!r}; {known(host.topology)}") from None
    slot = None
    if slot_text:
        if not slot_text.isdigit() or not any(
            p.group == group and p.slot == int(slot_text) for p in host.procs
        ):
            raise NotFound(f"no process named {name!r}; {known(host.topology)}")
        slot = int(slot_text)
    for proc in host.procs:
        if proc.group == group and (slot is None or proc.slot == slot):
            proc.failures = 0
    request_reload(host, group, slot, "restart requested")
    return f"restarting {name} one replica at a time"


def scale(host: CommandHost, name: str, count: object) -> str:
    """Run ``count`` replicas of group ``name``: start new slots or retire the highest."""
    try:
        group = host.topology.group(name)
    except KeyError:
        raise NotFound(f"no replica group named {name!r}; {known(host.topology)}") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise BadRequest(f"expected a replica count >= 0, got {count!r}")
    host.desired[name] = count
    serving = sorted(
        (p for p in host.procs if p.group == name and p.role is Role.SERVE), key=lambda p: p.slot
    )
    if count > len(serving):
        used = {p.slot for p in serving}
        slot = 0
        for _ in range(count - len(serving)):
            while slot in used:
                slot += 1
            used.add(slot)
            host.add_slot(group, slot)
    else:
        for proc in serving[count:]:
            if proc.child is None:
                host.procs.remove(proc)
            else:
                host.unregister(proc)
    host.say(f"scaled {name} to {count}", name, kind=EventKind.RELOAD)
    return f"scaled {name} from {len(serving)} to {count}"


def known(topology: Topology) -> str:
    names = [API_NAME] + [g.name for g in topology.groups]
    return "known: " + ", ".join(names)
