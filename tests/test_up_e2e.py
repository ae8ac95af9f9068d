"""`anyserve up` end to end: real API server and replicas from a temp topology.

One `up` run walks through what a user does in a session: it serves and prints prefixed
lines; a handler edit reloads while a client sends requests back to back and sees no
failure; a syntax error leaves the old code serving with the error in `ps` and the logs;
fixing it reloads; `scale` adds a replica; Ctrl-C exits 130 and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

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
    stream_tokens,
    up_args,
    write_app,
    write_topology,
)
from tests.conftest import ROOT, Procs, free_port, wait_until


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
    # `up` has a token by default, and its unregister of the old replica is accepted
    # (as the lease's owner) rather than left to the replica's own on SIGTERM.
    assert (tmp_path / ".anyserve" / "token").stat().st_mode & 0o777 == 0o600
    assert "unregistered echo-0-" in up.output()
    assert "could not unregister" not in up.output()
    # The dashboard's per-replica numbers come from the API server.
    wait_until(
        lambda: any(r["requests"] > 0 for r in snapshot(tmp_path)["replicas"]),
        timeout=5,
        what="request counts in the snapshot",
    )

    # A second `up` for the same file refuses to start and leaves the first alone.
    second = cli("up", "--no-tui", "-c", str(topology), cwd=tmp_path)
    assert second.returncode == 1 and "already running" in second.stderr

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

    # -- and back down: the extra replica unregisters, drains and goes away
    assert cli("scale", "echo=1", "-c", str(topology), cwd=tmp_path).returncode == 0
    wait_until(lambda: len(registered(url, "echo-")) == 1, timeout=10, what="one echo replica")
    wait_until(lambda: process(tmp_path, "echo.1") is None, timeout=10, what="echo.1 gone")

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


def test_control_from_another_terminal_and_object_ttl(procs: Procs, tmp_path: Path) -> None:
    """`status`, `restart` (a group, the API server), `down`; and the TTL sweep of objects."""
    from anyserve.objects import ObjectStore

    write_app(tmp_path)
    topology = write_topology(
        tmp_path,
        """
        [replicas.echo]
        app = "upapp.echo:app"
        drain_timeout = 5
        """,
    )
    objects = tmp_path / "objects"
    ObjectStore(objects, clock=lambda: time.time() - 7200).create({"a": 1}, key="old")
    ObjectStore(objects).create({"b": 2}, key="fresh")
    url = api_url(topology)
    up = procs.start(up_args(topology), name="up", cwd=tmp_path)
    first = wait_until(lambda: registered(url, "echo-0-"), timeout=20, what="echo registered")

    # The supervisor sweeps objects older than the TTL (1h here).
    wait_until(lambda: not ObjectStore(objects).exists("old"), timeout=10, what="old object gone")
    assert ObjectStore(objects).exists("fresh")

    # Idle, `up` costs next to nothing.
    time.sleep(0.5)
    cpu = psutil.Process(up.pid).cpu_percent(None)
    time.sleep(2.0)
    cpu = psutil.Process(up.pid).cpu_percent(None)
    assert cpu < 5.0, f"idle anyserve up used {cpu:.1f}% CPU"

    status = cli("status", "-c", str(topology), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "Processes" in status.stdout and "Replicas" in status.stdout
    assert first[0]["replica_id"] in status.stdout

    # A rolling restart while a stream is open on the old replica: the stream finishes.
    streamed: list[list[str]] = []
    reader = threading.Thread(target=lambda: streamed.append(stream_tokens(url)))
    reader.start()
    time.sleep(0.3)
    restarted = cli("restart", "echo", "-c", str(topology), cwd=tmp_path)
    assert restarted.returncode == 0 and "one replica at a time" in restarted.stdout
    wait_until(
        lambda: (
            (r := registered(url, "echo-0-"))
            and r[0]["replica_id"] != first[0]["replica_id"]
            and len(r) == 1
        ),
        timeout=20,
        what="echo replaced by a new process",
    )
    reader.join(20)
    assert streamed == [[f"t{i}" for i in range(20)]]

    api_pid = (process(tmp_path, "api.0") or {})["pid"]
    assert cli("restart", "api", "-c", str(topology), cwd=tmp_path).returncode == 0
    wait_until(
        lambda: (r := process(tmp_path, "api.0")) and r["pid"] != api_pid and r["state"] == "ready",
        timeout=20,
        what="API server restarted",
    )
    # The replicas' next heartbeats repopulate the new API server's registry.
    wait_until(lambda: registered(url, "echo-0-"), timeout=10, what="echo registered again")

    unknown = cli("restart", "nope", "-c", str(topology), cwd=tmp_path)
    assert unknown.returncode == 1 and "no process or group named 'nope'" in unknown.stderr

    down = cli("down", "-c", str(topology), cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert up.popen.wait(timeout=10) == 0
    wait_until(lambda: not leftovers(str(tmp_path)), timeout=5, what="no process left")


def test_the_demo_topology_serves_the_seed_readme_requests(procs: Procs, tmp_path: Path) -> None:
    """The repository's anyserve.toml (ports moved to free ones) serves the seed README's
    curl requests; Ctrl-C exits 130 and leaves no process behind."""
    text = (ROOT / "anyserve.toml").read_text()
    api_port, chat_port = free_port(), free_port()
    text = text.replace("port = 8080", f"port = {api_port}")
    text = text.replace("port = 50051", f"port = {chat_port}")
    text = text.replace("/tmp/anyserve-objects", str(tmp_path / "objects"))
    (tmp_path / "anyserve.toml").write_text(text)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    url = f"http://127.0.0.1:{api_port}"
    up = procs.start(up_args(tmp_path / "anyserve.toml"), name="up", cwd=tmp_path)
    wait_until(lambda: len(registered(url, "")) == 4, timeout=30, what="the four demo groups")

    def ask(cap: str, name: str, text: str) -> dict[str, object]:
        body = {
            "inputs": [
                {
                    "name": name,
                    "datatype": "BYTES",
                    "shape": [1],
                    "contents": {"bytes_contents": [text]},
                }
            ]
        }
        reply = httpx.post(
            url + "/infer/json", json=body, headers={"X-Capability-Type": cap}, timeout=10
        )
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    assert "Hello World" in json.dumps(ask("chat", "text", "Hello World"))
    assert ask("embed", "text", "Sample text")["outputs"]
    assert ask("heavy", "data", "Heavy task")["outputs"]
    chat = next(r for r in registered(url, "chat-0-"))
    assert chat["endpoint"] == f"127.0.0.1:{chat_port}"

    pids = [p["pid"] for p in snapshot(tmp_path)["processes"]]
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(timeout=20) == 130
    assert not any(psutil.pid_exists(pid) and _alive(pid) for pid in pids)
    assert leftovers(str(tmp_path)) == []


def test_sigterm_exits_143_and_a_second_signal_forces(procs: Procs, tmp_path: Path) -> None:
    """SIGTERM starts the graceful stop (exit 143); a Ctrl-C during it kills everything now."""
    write_app(tmp_path)
    topology = write_topology(
        tmp_path,
        """
        [replicas.echo]
        app = "upapp.echo:app"
        drain_timeout = 30
        """,
    )
    up = procs.start(up_args(topology), name="up", cwd=tmp_path)
    wait_until(lambda: registered(api_url(topology), "echo-0-"), timeout=20, what="registered")
    # A 6 s stream keeps the replica draining (drain_timeout 30) long after SIGTERM.
    reader = threading.Thread(target=_quietly, args=(stream_tokens, api_url(topology)))
    reader.start()
    time.sleep(0.5)
    up.popen.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM received" in up.output(), timeout=5, what="stop begun")
    time.sleep(0.3)
    assert up.popen.poll() is None  # still draining
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(timeout=3) == 143
    reader.join(10)
    assert "second signal: killing everything now" in up.output()
    wait_until(lambda: not leftovers(str(tmp_path)), timeout=3, what="no process left")


def _quietly(func: Any, *args: Any) -> None:
    with contextlib.suppress(Exception):
        func(*args)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_token_reaches_every_child_and_never_a_command_line(
    procs: Procs, tmp_path: Path
) -> None:
    """With `[api_server] token`, registration needs it: the replicas `up` starts register
    (they got it), a stranger's registration is refused, a rolling restart still
    unregisters through the API server, and no command line shows the token."""
    token = "t0ken-for-the-up-e2e-test"
    write_app(tmp_path)
    topology = write_topology(
        tmp_path,
        """
        [replicas.echo]
        app = "upapp.echo:app"
        drain_timeout = 2
        max_in_flight = 3
        """,
    )
    topology.write_text(
        topology.read_text().replace("[objects]", f'token = "{token}"\n\n[objects]')
    )
    url = api_url(topology)
    up = procs.start(up_args(topology), name="up", cwd=tmp_path, env={"ANYSERVE_TOKEN": ""})
    first = wait_until(lambda: registered(url, "echo-0-"), timeout=20, what="echo registered")
    assert first[0]["max_in_flight"] == 3

    stranger = {"replica_id": "intruder", "endpoint": "127.0.0.1:1", "capabilities": [{}]}
    assert httpx.post(url + "/register", json=stranger, timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert httpx.post(url + "/register", json=stranger, headers=wrong, timeout=5).status_code == 401
    assert [r["replica_id"] for r in registered(url, "")] == [first[0]["replica_id"]]
    with httpx.Client() as client:
        assert infer(client, url) == "v1"

    # The supervisor's own unregister (a rolling restart) carries the token too.
    assert cli("restart", "echo", "-c", str(topology), cwd=tmp_path).returncode == 0
    wait_until(
        lambda: (r := registered(url, "echo-0-")) and r[0]["replica_id"] != first[0]["replica_id"],
        timeout=20,
        what="echo replaced",
    )
    assert "could not unregister" not in up.output()
    for row in snapshot(tmp_path)["processes"]:
        assert token not in " ".join(psutil.Process(row["pid"]).cmdline())
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(timeout=20) == 130
    assert token not in up.output()


def test_beyond_loopback_up_creates_a_token_and_hands_it_over(procs: Procs, tmp_path: Path) -> None:
    """An API server on 0.0.0.0 with no token configured: `up` creates one in
    .anyserve/token (0600), the replicas register with it, strangers cannot."""
    write_app(tmp_path)
    topology = write_topology(tmp_path, '[replicas.echo]\napp = "upapp.echo:app"\n')
    topology.write_text(topology.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"'))
    url = api_url(topology)
    up = procs.start(up_args(topology), name="up", cwd=tmp_path, env={"ANYSERVE_TOKEN": ""})
    wait_until(lambda: registered(url, "echo-0-"), timeout=20, what="echo registered")
    token_path = tmp_path / ".anyserve" / "token"
    assert token_path.stat().st_mode & 0o777 == 0o600
    token = token_path.read_text().strip()
    assert len(token) >= 32 and token not in up.output()
    assert f"the token in {token_path}" in up.output()
    stranger = {"replica_id": "intruder", "endpoint": "127.0.0.1:1", "capabilities": [{}]}
    assert httpx.post(url + "/register", json=stranger, timeout=5).status_code == 401
    with httpx.Client() as client:
        assert infer(client, url) == "v1"
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(timeout=20) == 130
