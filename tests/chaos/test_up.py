"""Chaos with `anyserve up` itself: its API server killed (R4), then `up` killed (R12)."""

from __future__ import annotations

import asyncio
import signal
import time

import psutil
import pytest

from anyserve.errors import AnyServeError
from tests.apps.up_support import registered, snapshot
from tests.chaos.conftest import CHAOS_APP, TIMEOUT, Chaos, seconds
from tests.chaos.load import Conn, infer_body
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT)]

WORK = {"X-Capability-Type": "work"}


async def _status(port: int, method: str, path: str, body: bytes = b"") -> int | None:
    """One request on a fresh connection; None when nothing answers."""
    conn = Conn(port)
    try:
        reply = await asyncio.wait_for(conn.request(method, path, body, WORK), 2.0)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return None
    finally:
        conn.close()
    return reply.status


async def _until(port: int, method: str, path: str, body: bytes, limit: float) -> float:
    """Poll until the request answers 200; return when that was (monotonic)."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        if await _status(port, method, path, body) == 200:
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method} {path} did not answer 200 within {limit}s")


def test_r4_sigkill_the_api_server_under_up(chaos: Chaos) -> None:
    """R4: SIGKILL the API server `anyserve up` runs; `up` restarts it, and the replicas
    are routable within 1 s of its /health answering again (they re-register on their
    next heartbeat, every 0.5 s here)."""
    rounds = int(seconds(2, 5))  # each kill doubles its restart delay: 0.5 s ... 8 s
    port = free_port()
    topology = chaos.topology(
        f"""
        [replicas.work]
        app = "{CHAOS_APP}"
        count = 2
        """,
        api_port=port,
    )
    up = chaos.up(topology)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: len(registered(url, "work-")) == 2, timeout=30, what="two replicas")
    back: list[float] = []  # SIGKILL → /health answers again
    routable: list[float] = []  # /health answers → a request is served

    async def round_trip() -> None:
        api = next(p for p in snapshot(chaos.tmp)["processes"] if p["name"] == "api.0")
        psutil.Process(api["pid"]).kill()
        killed_at = time.monotonic()
        healthy_at = await _until(port, "GET", "/health", b"", 30)
        served_at = await _until(port, "POST", "/infer/json", infer_body("1"), 10)
        back.append(healthy_at - killed_at)
        routable.append(served_at - healthy_at)

    for _ in range(rounds):
        asyncio.run(round_trip())
        # Let the restarted API server settle (both replicas back) before the next kill.
        wait_until(lambda: len(registered(url, "work-")) == 2, timeout=10, what="both back")
    late = [r for r in routable if r > 1.0]
    chaos.report(
        f"R4: {rounds - len(late)} passed, {len(late)} failed (routable "
        f"{max(routable):.2f}s after /health at worst; API server back "
        f"{max(back):.2f}s after SIGKILL)"
    )
    assert late == [], routable
    assert up.alive()
    rows = {p["name"]: p for p in snapshot(chaos.tmp)["processes"]}
    assert rows["api.0"]["restarts"] == rounds and rows["api.0"]["state"] == "ready"


def test_r12_sigkill_up_then_run_it_again(chaos: Chaos) -> None:
    """R12: SIGKILL `anyserve up`: none of its descendants is alive 2 s later, and an
    immediate re-run (same fixed ports, same state directory) serves again."""
    rounds = int(seconds(2, 5))
    port, replica_port = free_port(), free_port()
    topology = chaos.topology(
        f"""
        [replicas.work]
        app = "{CHAOS_APP}"
        count = 2
        port = {replica_port}
        """,
        api_port=port,
    )
    url = f"http://127.0.0.1:{port}"
    gone: list[float] = []  # SIGKILL of `up` → no descendant left
    serving: list[float] = []  # `up` started → both replicas registered and answering
    survivors: list[str] = []
    for n in range(rounds + 1):
        started = time.monotonic()
        up = chaos.up(topology)
        wait_until(lambda: len(registered(url, "work-")) == 2, timeout=30, what="two replicas")
        assert asyncio.run(_status(port, "POST", "/infer/json", infer_body("1"))) == 200
        serving.append(time.monotonic() - started)
        if n == rounds:
            up.popen.send_signal(signal.SIGINT)
            assert up.popen.wait(timeout=20) == 130
            break
        descendants = psutil.Process(up.pid).children(recursive=True)
        assert len(descendants) >= 3  # the API server and two replicas
        up.popen.kill()
        killed_at = time.monotonic()
        up.popen.wait(5)
        give_up = killed_at + 2.0
        while (alive := [p for p in descendants if _alive(p)]) and time.monotonic() < give_up:
            time.sleep(0.01)
        gone.append(time.monotonic() - killed_at)
        survivors += [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive]
        for proc in alive:
            proc.kill()
        if survivors:
            break
    failed = len(survivors)
    chaos.report(
        f"R12: {len(gone) - failed} passed, {failed} failed (descendants gone "
        f"{max(gone):.2f}s after SIGKILL of up at worst; each re-run serving after "
        f"{max(serving[1:], default=0.0):.1f}s)"
    )
    assert survivors == []
    with pytest.raises(AnyServeError):  # and the last `up` has stopped
        snapshot(chaos.tmp)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
