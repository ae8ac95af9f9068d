"""Closed-loop load: N workers, each sending its next request as soon as the last one ends.

A :class:`Worker` makes one call and says how many events it got and when the first one
came (a unary call is one event, its first event is its reply). :func:`run_phase` opens
the workers, warms them up, then measures for ``duration`` seconds (or until
``max_requests`` have started) and returns a :class:`Phase`: latencies, time to first
event, events, errors, and the CPU seconds a server process used meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psutil

T = TypeVar("T")

#: A phase stops early once this many calls have failed.
MAX_ERRORS = 50


class Worker(Protocol):
    async def call(self) -> tuple[int, float]:
        """One request: ``(events received, seconds until the first one)``; raises on failure."""
        ...

    async def close(self) -> None: ...


OpenWorker = Callable[[], Awaitable[Worker]]


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when installed (the generator should cost as little as it
    can); a stop signal cancels it and comes out as ``KeyboardInterrupt``, after the
    coroutine's own cleanup (connections closed) has run."""
    outcome: list[T] = []
    try:
        import uvloop
    except ImportError:
        interrupted = asyncio.run(_interruptible(coro, outcome))
    else:
        interrupted = uvloop.run(_interruptible(coro, outcome))
    if interrupted:
        raise KeyboardInterrupt
    return outcome[0]


async def _interruptible(coro: Coroutine[Any, Any, T], outcome: list[T]) -> bool:
    """Await ``coro`` into ``outcome``; True when a stop signal cancelled it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopped: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def stop(sig: int) -> None:
        stopped.append(sig)
        task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        outcome.append(await coro)
        return False
    except asyncio.CancelledError:
        if not stopped:
            raise
        return True
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])  # remove_signal_handler resets to the default


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, interpolated; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process so far (all its threads).

    On Linux from the process's CPU-time clock (what ``clock_getcpuclockid(3)`` returns:
    nanoseconds), else from psutil, which counts in clock ticks (10 ms): too coarse for a
    ``--quick`` phase of 60 requests, whose CPU could read as 0.
    """
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = time.clock_gettime(_cpu_clock(pid))
            continue
        except (AttributeError, OSError, OverflowError):
            pass
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = float(times.user + times.system)
    return out


def _cpu_clock(pid: int) -> int:
    """The clock id of process ``pid``'s CPU time on Linux (``CPUCLOCK_SCHED``, all threads)."""
    if not sys.platform.startswith("linux"):
        raise OSError("process CPU clocks are read this way on Linux only")
    return ((~pid) << 3) | 2


@dataclass
class Phase:
    """What one measured phase saw."""

    concurrency: int
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    #: CPU seconds each watched process used during the phase ("api", "replica", "client").
    cpu: dict[str, float] = field(default_factory=dict)
    first_error: str | None = None

    @classmethod
    def merge(cls, phases: list[Phase]) -> Phase:
        """One phase made of several of the same concurrency (rounds taking turns)."""
        merged = cls(phases[0].concurrency)
        for phase in phases:
            merged.seconds += phase.seconds
            merged.requests += phase.requests
            merged.errors += phase.errors
            merged.events += phase.events
            merged.latencies += phase.latencies
            merged.firsts += phase.firsts
            for name, seconds in phase.cpu.items():
                merged.cpu[name] = merged.cpu.get(name, 0.0) + seconds
            merged.first_error = merged.first_error or phase.first_error
        return merged

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else math.nan

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else math.nan

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000

    def first_ms(self, q: float) -> float:
        return percentile(self.firsts, q) * 1000

    def unary(self) -> dict[str, Any]:
        """The figures of a unary phase."""
        out = {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.ms(0.5), 3),
            "p99_ms": round(self.ms(0.99), 3),
        }
        return self._with_cpu(out, self.requests, "cpu_ms_per_request")

    def streaming(self) -> dict[str, Any]:
        """The figures of a streaming phase."""
        out = {
            "streams": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
            "first_event_p50_ms": round(self.first_ms(0.5), 3),
            "first_event_p99_ms": round(self.first_ms(0.99), 3),
            "stream_p50_ms": round(self.ms(0.5), 3),
        }
        return self._with_cpu(out, self.events, "cpu_ms_per_event")

    def _with_cpu(self, out: dict[str, Any], count: int, key: str) -> dict[str, Any]:
        if "api" in self.cpu:
            out[key] = round(self.cpu["api"] * 1000 / count, 4) if count else math.nan
        # CPU milliseconds per request (or event) of each process.
        out["cpu_ms"] = {
            name: round(seconds * 1000 / count, 4) if count else math.nan
            for name, seconds in self.cpu.items()
        }
        # CPU seconds per wall second: 1.0 is one core kept busy; shows who was saturated.
        out["busy"] = {
            name: round(seconds / self.seconds, 2) if self.seconds else math.nan
            for name, seconds in self.cpu.items()
        }
        if self.first_error:
            out["first_error"] = self.first_error
        return out


async def run_phase(
    open_worker: OpenWorker,
    concurrency: int,
    duration: float,
    *,
    warmup: float = 0.3,
    max_requests: int | None = None,
    cpu_pids: Mapping[str, int] | None = None,
) -> Phase:
    """Measure ``concurrency`` closed-loop workers for ``duration`` seconds.

    ``cpu_pids`` names the server processes whose CPU time is taken before and after;
    this process (the load generator) is always added as ``client``.
    """
    pids = {**(cpu_pids or {}), "client": os.getpid()}
    workers = list(await asyncio.gather(*(open_worker() for _ in range(concurrency))))
    try:
        if warmup > 0:
            await _drive(workers, Phase(concurrency), warmup, None)
        phase = Phase(concurrency)
        cpu_before = cpu_seconds(pids)
        started = time.perf_counter()
        await _drive(workers, phase, duration, max_requests)
        phase.seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(pids)
        phase.cpu = {n: cpu_after[n] - cpu_before[n] for n in cpu_after if n in cpu_before}
        return phase
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


async def _drive(
    workers: list[Worker], phase: Phase, duration: float, max_requests: int | None
) -> None:
    deadline = time.perf_counter() + duration
    started = 0

    async def loop(worker: Worker) -> None:
        nonlocal started
        clock = time.perf_counter
        while True:
            t0 = clock()
            if t0 >= deadline or (max_requests is not None and started >= max_requests):
                return
            if phase.errors >= MAX_ERRORS:
                return
            started += 1
            try:
                events, first = await worker.call()
            except Exception as exc:
                phase.errors += 1
                if phase.first_error is None:
                    phase.first_error = f"{type(exc).__name__}: {exc}"[:300]
                continue
            phase.latencies.append(clock() - t0)
            phase.firsts.append(first)
            phase.requests += 1
            phase.events += events

    await asyncio.gather(*(loop(w) for w in workers))
