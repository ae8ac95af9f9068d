"""The dashboard: rendered into a string console, and live in a pseudo terminal."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from anyserve.up.dashboard import Dashboard
from anyserve.up.snapshot import LogLine, ProcessView, ReplicaView, Snapshot
from tests.apps.up_support import leftovers, write_app, write_topology


def _snapshot() -> Snapshot:
    now = time.time()
    return Snapshot(
        topology="/srv/anyserve.toml",
        api_url="http://127.0.0.1:8080",
        pid=4242,
        started_at=now - 125,
        api_reachable=True,
        processes=(
            ProcessView(
                "api.0",
                "api",
                "api server",
                "ready",
                pid=100,
                port=8080,
                uptime=125,
                cpu=0.4,
                rss=52_000_000,
            ),
            ProcessView(
                "chat.0",
                "chat",
                "replica",
                "ready",
                pid=101,
                port=50051,
                uptime=120,
                cpu=2.5,
                rss=61_000_000,
                replica_id="chat-0-a1b2c3",
            ),
            ProcessView(
                "chat.1",
                "chat",
                "replica",
                "backing off",
                restarts=2,
                backoff=1.0,
                retry_in=0.8,
                exit_code=-9,
                message="killed by SIGKILL",
            ),
            ProcessView(
                "embed.0",
                "embed",
                "replica",
                "unhealthy",
                pid=102,
                port=50052,
                uptime=90,
                message="no answer to ServerReady for 3.0s",
            ),
            ProcessView(
                "bad.0",
                "bad",
                "replica",
                "crash loop",
                restarts=6,
                exit_code=1,
                retry_in=12.0,
                message="exited with code 1: RuntimeError: boom",
                stderr_tail=("Traceback (most recent call last):", "RuntimeError: boom"),
            ),
        ),
        replicas=(
            ReplicaView(
                "chat-0-a1b2c3",
                "127.0.0.1:50051",
                ({"type": "chat", "model": "demo"}, {"type": "chat", "stream": True}),
                in_flight=3,
                requests=1234,
                errors=5,
                p50_ms=4.2,
                p99_ms=31.5,
            ),
        ),
        events=(LogLine(now - 5, "chat", "reloaded chat in 2.3s", "reload"),),
        logs=(LogLine(now - 1, "chat.0", "request 9f0 type=chat ok 0.4ms"),),
    )


def _render(renderable: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_dashboard_shows_processes_replicas_events_and_logs() -> None:
    text = _render(Dashboard(_snapshot()))
    for column in ("NAME", "KIND", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "RSS", "PORT"):
        assert column in text
    for column in ("CAPABILITIES", "IN-FLIGHT", "REQS", "ERRS", "P50 MS", "P99 MS"):
        assert column in text
    assert "up 2m05s" in text and "pid 4242" in text
    chat = next(line for line in text.splitlines() if line.startswith("chat.0 "))
    assert chat.split() == [
        "chat.0",
        "replica",
        "101",
        "ready",
        "0",
        "2m00s",
        "2.5",
        "58.2",
        "MB",
        "50051",
    ]
    crash = next(line for line in text.splitlines() if line.startswith("bad.0 "))
    assert "crash loop" in crash and " 6 " in crash
    assert "bad.0: exited with code 1: RuntimeError: boom; next try in 12.0s" in text
    assert "Traceback (most recent call last):" in text  # the crash loop's last stderr lines
    assert "chat.1: killed by SIGKILL; next try in 0.8s" in text
    stuck = next(line for line in text.splitlines() if line.startswith("embed.0 "))
    assert "unhealthy" in stuck
    assert "embed.0: no answer to ServerReady for 3.0s" in text
    assert "type=chat model=demo" in text and "type=chat (stream)" in text
    replica = next(line for line in text.splitlines() if line.startswith("chat-0-a1b2c3"))
    assert replica.split()[-5:] == ["3", "1234", "5", "4.2", "31.5"]
    assert "reloaded chat in 2.3s" in text and "request 9f0 type=chat ok" in text


def test_dashboard_fits_80_columns() -> None:
    text = _render(Dashboard(_snapshot()), width=80)
    assert "…" not in text.split("Replicas")[0]  # no column of the process table is cut


def test_snapshot_round_trips_through_json() -> None:
    import json

    snap = _snapshot()
    again = Snapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert again == snap


def test_empty_registry_says_why() -> None:
    snap = Snapshot(topology="t", api_url="u", pid=1, started_at=time.time())
    assert "API server not reachable" in _render(Dashboard(snap))


def test_live_dashboard_in_a_pseudo_terminal(tmp_path: Path) -> None:
    """`anyserve up` on a terminal draws the live view; Ctrl-C stops it cleanly (130)."""
    pexpect = pytest.importorskip("pexpect")
    write_app(tmp_path)
    topology = write_topology(
        tmp_path,
        """
        [replicas.echo]
        app = "upapp.echo:app"
        drain_timeout = 1
        """,
    )
    child = pexpect.spawn(
        sys.executable,
        ["-m", "anyserve", "up", "-c", str(topology)],
        cwd=str(tmp_path),
        env={**os.environ, "TERM": "xterm-256color"},  # CI may have no TERM at all
        dimensions=(40, 120),
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect("Processes")
        child.expect("Replicas")
        # The replica shows up as registered (its id in the replicas table).
        child.expect(r"echo-0-[0-9a-f]{6}")
        child.expect("ready")
        time.sleep(0.5)
        child.sendintr()  # Ctrl-C, as the terminal sends it
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus == 130, (child.exitstatus, child.signalstatus)
        assert "anyserve up stopped (exit 130)" in child.before
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
    time.sleep(0.2)
    assert leftovers(str(tmp_path)) == []


HOSTILE = ("[/]", "[bold", "[bold]x", "\x1b[2J", "y" * 300)


def test_hostile_values_render_as_literal_text() -> None:
    """Values from replicas, clients and log lines are text: never markup, never raw
    control characters for the terminal."""
    now = time.time()
    snap = Snapshot(
        topology="/srv/[/]anyserve.toml",
        api_url="http://127.0.0.1:8080",
        pid=1,
        started_at=now,
        api_reachable=True,
        processes=tuple(
            ProcessView(
                f"{value}.0",
                "g",
                "replica",
                "crash loop",
                replica_id=value,
                message=value,
                stderr_tail=(value,),
            )
            for value in HOSTILE
        ),
        replicas=tuple(
            ReplicaView(value, value, ({"type": value, value: value},)) for value in HOSTILE
        ),
        events=tuple(LogLine(now, value, value, "error") for value in HOSTILE),
        logs=tuple(LogLine(now, value, value) for value in HOSTILE),
    )
    narrow = _render(Dashboard(snap, log_lines=10), width=80)
    assert "\x1b" not in narrow and "[/]anyserve.toml" in narrow
    # Wide enough to show every value whole: each is there literally.
    text = _render(Dashboard(snap, log_lines=10), width=4000)
    assert "\x1b" not in text
    assert "\\x1b[2J" in text
    assert "type=[/] [/]=[/]" in text and "type=[bold [bold=[bold" in text
    assert "[bold]x" in text
    assert "y" * 300 in text


def test_up_keeps_running_when_a_replica_registers_hostile_values(tmp_path: Path) -> None:
    """A replica id and capability that are not valid markup neither stop the live view
    nor `up`: its own replicas stay registered and the process keeps running."""
    import shutil

    import httpx

    from tests.apps.up_support import api_url, snapshot
    from tests.conftest import free_port, wait_until

    pexpect = pytest.importorskip("pexpect")
    command = shutil.which("anyserve", path=str(Path(sys.executable).parent))
    assert command is not None, "the anyserve command is not installed next to python"
    write_app(tmp_path)
    topology = write_topology(
        tmp_path,
        """
        [replicas.echo]
        app = "upapp.echo:app"
        drain_timeout = 1
        """,
    )
    url = api_url(topology)
    child = pexpect.spawn(
        command,
        ["up", "-c", str(topology)],
        cwd=str(tmp_path),
        env={**os.environ, "TERM": "xterm-256color"},
        dimensions=(40, 120),
        encoding="utf-8",
        timeout=30,
    )

    def registry_ids() -> set[str]:
        replicas = httpx.get(url + "/registry", timeout=2).json()["replicas"]
        return {str(r["replica_id"]) for r in replicas}

    try:
        child.expect("Replicas")
        wait_until(lambda: any(i.startswith("echo-0-") for i in registry_ids()), timeout=20)
        token = (tmp_path / ".anyserve" / "token").read_text().strip()
        reply = httpx.post(
            url + "/register",
            json={
                "replica_id": "[bold]x",
                "endpoint": f"127.0.0.1:{free_port()}",
                # Control characters are refused by the registry itself (400); markup is
                # valid there, and only the view has to keep it as text.
                "capabilities": [{"type": "[/]"}, {"type": "[red]", "[/]": "[bold"}],
                "instance": "hostile",
            },
            # `up` always has a token; whoever registers by hand holds it too.
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert reply.status_code == 200, reply.text
        # The dashboard draws the hostile record as text...
        child.expect_exact("[bold]x", timeout=15)
        # ... and `up` goes on: it still answers, sees the record, and its replica serves.
        wait_until(
            lambda: any(r["replica_id"] == "[bold]x" for r in snapshot(tmp_path)["replicas"]),
            timeout=10,
        )
        assert child.isalive()
        ids = registry_ids()
        assert "[bold]x" in ids and any(i.startswith("echo-0-") for i in ids), ids
        wait_until(
            lambda: any(
                p["name"] == "echo.0" and p["state"] == "ready"
                for p in snapshot(tmp_path)["processes"]
            ),
            timeout=10,
        )
        assert snapshot(tmp_path)["state"] == "running"
        child.sendintr()
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus == 130, (child.exitstatus, child.signalstatus)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
    wait_until(lambda: leftovers(str(tmp_path)) == [], timeout=5)
