"""The helper threads of ``anyserve up``. Each is given only a ``report(message)``
callable (and a stop event): it never touches the supervisor's state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from anyserve.topology import Topology
from anyserve.up.messages import (
    ApiHealthy,
    FilesChanged,
    Message,
    Note,
    ProbeAnswers,
    Registry,
)
from anyserve.up.policy import Timings
from anyserve.up.state import EventKind

Report = Callable[[Message], None]


def poll_api(
    url: str,
    headers: Mapping[str, str],
    timings: Timings,
    fast: threading.Event,
    stop: threading.Event,
    report: Report,
) -> None:
    """``/health`` until it answers, then ``/registry``; faster while ``fast`` is set."""
    import httpx

    healthy = False
    with httpx.Client(timeout=2.0, headers=dict(headers)) as client:
        while not stop.is_set():
            try:
                if not healthy:
                    healthy = client.get(url + "/health").status_code == 200
                    if healthy:
                        report(ApiHealthy())
                else:
                    reply = client.get(url + "/registry")
                    reply.raise_for_status()
                    records = reply.json().get("replicas", [])
                    report(Registry(tuple(r for r in records if isinstance(r, dict))))
            except (httpx.HTTPError, ValueError, AttributeError):
                if healthy:
                    report(Registry(None))
            wait = timings.poll_fast if fast.is_set() else timings.poll_slow
            # Wake early when something starts, so readiness is seen quickly.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not stop.is_set():
                if fast.is_set() and wait > timings.poll_fast:
                    break
                stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))


def probe_replicas(
    targets: Callable[[], Mapping[int, str]],
    timings: Timings,
    clock: Callable[[], float],
    stop: threading.Event,
    report: Report,
) -> None:
    """Ask every replica in ``targets()`` (``{pid: endpoint}``) ``ServerReady``."""
    from anyserve.process import ReadinessProbe

    probe = ReadinessProbe()
    every = timings.probe_every
    next_at = time.monotonic() + every
    try:
        # At a fixed rate, not a pause after each round: a round that waits for a stuck
        # replica's timeout must not stretch the time until it is found stuck.
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + every, time.monotonic())
            asked = targets()
            if not asked:
                probe.forget_all()
                continue
            sent_at = clock()
            answers = probe.ask(asked, min(timings.probe_timeout, every))
            if not stop.is_set():
                report(ProbeAnswers(sent_at, answers))
    except Exception as exc:  # a broken probe must not take `up` down; say so
        report(Note(f"replica health probe stopped: {exc}", EventKind.ERROR))
    finally:
        probe.forget_all()


def watch_files(
    topology: Topology, debounce_ms: int, stop: threading.Event, report: Report
) -> None:
    """Watch every group's files; report the changed paths (debounced)."""
    from watchfiles import DefaultFilter, watch

    paths = sorted({str(p) for g in topology.groups for p in g.watch if p.exists()})
    if not paths:
        return
    ignore = (str(topology.state_dir), str(topology.objects.path))

    class _Filter(DefaultFilter):
        ignore_entity_patterns = (*DefaultFilter.ignore_entity_patterns, r"\.log(\.\d+)?$")

    try:
        for changes in watch(
            *paths,
            watch_filter=_Filter(ignore_paths=ignore),
            debounce=debounce_ms,
            step=50,
            stop_event=stop,
            raise_interrupt=False,
        ):
            report(FilesChanged(frozenset(path for _, path in changes)))
    except Exception as exc:  # e.g. inotify limits; reload is a convenience, keep serving
        report(Note(f"file watching stopped: {exc}", EventKind.ERROR))


def sweep_objects(path: Path, ttl: float, report: Report) -> None:
    """Remove objects older than ``ttl`` once; say how many."""
    from anyserve.objects import ObjectStore

    try:
        removed = ObjectStore(path).cleanup(ttl)
    except Exception as exc:
        report(Note(f"object store cleanup failed: {exc}", EventKind.ERROR))
        return
    if removed:
        report(Note(f"object store: removed {removed} object(s) older than the TTL"))
