"""`anyserve up` end to end: real API server and replicas from a temp topology.

One `up` run walks through what a user does in a session: it serves and prints prefixed
lines; a handler edit reloads while a client sends requests back to back and sees no
failure; a syntax error leaves the old code serving with the error in `ps` and the logs;
fixing it reloads; `scale` adds a replica; Ctrl-C exits 130 and leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx

from tests.apps.up_support import (
    ECHO_APP,
    Traffic,
    api_url,
    cli,
    infer,
    leftovers,
    process,
    registered,
    snapshot,
    up_args,
    write_app,
    write_topology,
)
from tests.conftest import Procs, free_port, wait_until


def test_up_serves_reloads_without_failures_scales_and_stops(procs: Procs, tmp_path: Path) -> None:
    handler = write_app(tmp_path, "v1")
    port = free_port()
    topology = write_topology(
        tmp_path,
        f"""
        [replicas.echo]
        app = "upapp.echo:app"
        port = {port}
        drain_timeout = 2
        """,
    )
    url = api_url(topology)
    up = procs.start(up_args(topology), name="up", cwd=tmp_path)

    wait_until(lambda: registered(url, "echo-0-"), timeout=20, what="echo replica registered")
    with httpx.Client() as client:
        assert infer(client, url) == "v1"
    out = up.output()
    # Prefixed `name.N |` lines, plain text since the output is not a terminal.
    assert re.search(r"^api\.0 +\| ", out, re.M) and re.search(r"^echo\.0 +\| ", out, re.M)
    assert "\x1b[" not in out
    assert (tmp_path / ".anyserve" / "logs" / "echo.0.log").exists()

    # -- hot reload under load: the answer changes, no request fails
    with Traffic(url).running() as traffic:
        wait_until(lambda: len(traffic.answers) > 20, what="traffic flowing")
        edited = time.monotonic()
        handler.write_text(ECHO_APP.format(version="v2-edited"))
        wait_until(lambda: traffic.latest() == "v2-edited", timeout=6, what="new answer")
        first_new = next(t for t, a in traffic.answers if a == "v2-edited") - edited
        # Wait for the whole reload (a fixed port goes through a bridge process and back).
        wait_until(lambda: _settled(tmp_path, "echo.0", port), timeout=20, what="reload done")
        time.sleep(0.5)
    assert traffic.failures == [], traffic.failures[:5]
    last_old = max(t for t, a in traffic.answers if a == "v1") - edited
    assert first_new < 3.0, f"new answer only after {first_new:.1f}s"
    assert last_old < 3.0, f"old answer still seen {last_old:.1f}s after the edit"
    assert len(traffic.answers) > 50

    # -- a syntax error: old code keeps serving, the error shows in ps and the log
    handler.write_text("def broken(:\n    pass\n")
    wait_until(
        lambda: "reload failed" in (process(tmp_path, "echo.0") or {}).get("message", ""),
        timeout=20,
        what="reload failure in ps",
    )
    with httpx.Client() as client:
        assert infer(client, url) == "v2-edited"
    ps = cli("ps", "-c", str(topology), cwd=tmp_path)
    assert ps.returncode == 0, ps.stderr
    assert "reload failed" in ps.stdout and "SyntaxError" in ps.stdout
    assert "SyntaxError" in (tmp_path / ".anyserve" / "logs" / "echo.0.log").read_text()
    logs = cli("logs", "echo", "-c", str(topology), cwd=tmp_path)
    assert "SyntaxError" in logs.stdout and "echo.0" in logs.stdout

    # -- fixing it reloads
    handler.write_text(ECHO_APP.format(version="v3"))
    with httpx.Client() as client:
        wait_until(lambda: infer(client, url) == "v3", timeout=15, what="fixed code serving")
    wait_until(lambda: _settled(tmp_path, "echo.0", port), timeout=20, what="reload done")
    assert (process(tmp_path, "echo.0") or {})["message"] == ""

    # -- scale adds a registered replica on a free port
    scaled = cli("scale", "echo=2", "-c", str(topology), cwd=tmp_path)
    assert scaled.returncode == 0, scaled.stderr
    wait_until(lambda: len(registered(url, "echo-")) == 2, timeout=20, what="two echo replicas")
    wait_until(lambda: (process(tmp_path, "echo.1") or {}).get("state") == "ready", timeout=10)
    rows = json.loads(cli("ps", "--json", "-c", str(topology), cwd=tmp_path).stdout)
    assert sorted(r["name"] for r in rows) == ["api.0", "echo.0", "echo.1"]
    assert rows[-1]["port"] not in (None, port)

    # -- Ctrl-C: replicas drain, the API server stops, exit 130, nothing left
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(timeout=20) == 130
    assert "SIGINT received" in up.output()
    wait_until(lambda: not leftovers(str(tmp_path)), timeout=5, what="no process left")
    assert not (tmp_path / ".anyserve" / "control.sock").exists()


def _settled(root: Path, name: str, port: int) -> bool:
    """One ready process for ``name``, on its fixed port, and no reload in progress."""
    rows = [p for p in snapshot(root)["processes"] if p["name"] == name]
    return len(rows) == 1 and rows[0]["state"] == "ready" and rows[0]["port"] == port
