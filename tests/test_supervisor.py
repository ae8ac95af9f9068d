"""Supervision: backoff, crash loop, restarts, dying with `up`; and the small parts
(restart policy, which groups a change reloads, log files, the control socket)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from anyserve.control import ControlServer, request, socket_path
from anyserve.errors import AnyServeError, BadRequest, NotReachable
from anyserve.logs import Event, LogFiles, Printer, follow, log_names, tail
from anyserve.process import Child
from anyserve.topology import loads
from anyserve.up.changes import changed_groups
from anyserve.up.policy import RestartPolicy
from anyserve.up.tokens import token_file, token_plan
from tests.apps.up_support import (
    api_url,
    infer,
    leftovers,
    process,
    registered,
    snapshot,
    up_args,
    write_app,
    write_topology,
)
from tests.conftest import Procs, wait_until

# ---------------------------------------------------------------------------- real processes


def test_crash_backoff_crash_loop_and_sigkill_of_up(procs: Procs, tmp_path: Path) -> None:
    """A crashed replica restarts with growing delays; an always-failing one reaches the
    crash-loop state with its exit code and stderr while the rest keep serving; a stopped
    replica shows as unhealthy and is restarted once it stays stuck; after a SIGKILL of
    `up` no child outlives it by 2 s."""
    write_app(tmp_path)
    topology = write_topology(
        tmp_path,
        """
        [replicas.echo]
        app = "upapp.echo:app"
        drain_timeout = 1
        stuck_timeout = "2s"

        [replicas.bad]
        app = "upapp.broken:app"

        [replicas.once]
        app = "upapp.broken:app"
        restart = "never"
        """,
    )
    url = api_url(topology)
    up = procs.start(up_args(topology), name="up", cwd=tmp_path)
    wait_until(lambda: registered(url, "echo-0-"), timeout=20, what="echo registered")

    # The broken group: delays grow (0.5, 1, 2 ... with jitter), then the crash loop.
    delays: list[float] = []

    def crash_loop() -> dict[str, object] | None:
        row = process(tmp_path, "bad.0")
        if row and row["backoff"] is not None and (not delays or row["backoff"] != delays[-1]):
            delays.append(row["backoff"])
        return row if row and row["state"] == "crash loop" else None

    row = wait_until(crash_loop, timeout=30, interval=0.05, what="bad.0 in crash loop")
    assert len(delays) >= 3 and delays == sorted(delays), delays
    assert delays[0] < 0.7 and delays[-1] > 1.5, delays
    assert row["exit_code"] == 1 and row["restarts"] >= 3
    assert "boom: this app always fails at import" in row["message"]
    assert any("RuntimeError" in line for line in row["stderr_tail"])
    with httpx.Client() as client:
        assert infer(client, url) == "v1"  # the rest keeps serving
    once = process(tmp_path, "once.0")
    assert once is not None and once["state"] == "stopped" and once["restarts"] == 0
    assert once["message"].startswith("exited with code 1")

    # A replica that dies is restarted (after a backoff visible in its state).
    echo = process(tmp_path, "echo.0")
    assert echo is not None and echo["state"] == "ready"
    os.kill(echo["pid"], signal.SIGKILL)
    backing = wait_until(
        lambda: (r := process(tmp_path, "echo.0")) and r["state"] == "backing off" and r,
        timeout=5,
        interval=0.02,
        what="echo.0 backing off",
    )
    assert backing["message"].startswith("killed by SIGKILL") and backing["retry_in"] is not None
    again = wait_until(
        lambda: (r := process(tmp_path, "echo.0")) and r["state"] == "ready" and r,
        timeout=20,
        what="echo.0 ready again",
    )
    assert again["restarts"] == 1 and again["pid"] != echo["pid"]

    # A stopped replica (as good as a blocked event loop) is unhealthy, then killed and
    # restarted once it has not answered ServerReady for its stuck_timeout.
    os.kill(again["pid"], signal.SIGSTOP)
    try:
        wait_until(
            lambda: (r := process(tmp_path, "echo.0")) and r["state"] == "unhealthy",
            timeout=4,
            what="echo.0 unhealthy",
        )
        restarted = wait_until(
            lambda: (r := process(tmp_path, "echo.0")) and r["pid"] != again["pid"] and r,
            timeout=6,
            interval=0.02,
            what="stuck echo.0 killed",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(again["pid"], signal.SIGCONT)
    assert "stuck (no answer to ServerReady for 2." in restarted["message"], restarted
    assert not _not_zombie(again["pid"])
    wait_until(
        lambda: (r := process(tmp_path, "echo.0")) and r["state"] == "ready" and r,
        timeout=20,
        what="echo.0 ready after the stuck restart",
    )
    assert "echo.0 | [anyserve] stuck: no answer to ServerReady" in up.output()

    # SIGKILL of `up`: nobody left to stop the children; they must die with it.
    children = [p["pid"] for p in snapshot(tmp_path)["processes"] if p["pid"]]
    assert len(children) >= 2
    up.popen.send_signal(signal.SIGKILL)
    up.popen.wait(5)
    time.sleep(2.0)
    alive = [pid for pid in children if psutil.pid_exists(pid) and _not_zombie(pid)]
    assert alive == []
    assert leftovers(str(tmp_path)) == []


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_child_runs_in_own_process_group_and_dies_with_its_parent(tmp_path: Path) -> None:
    lines: list[str] = []
    child = Child(
        ["sh", "-c", "echo hello; echo oops >&2; exec sleep 30"],
        cwd=tmp_path,
        env=dict(os.environ),
        on_line=lambda c, stream, line: lines.append(f"{stream}:{line}"),
    )
    try:
        wait_until(lambda: len(lines) == 2, what="both lines")
        assert sorted(lines) == ["stderr:oops", "stdout:hello"]
        assert list(child.stderr_tail) == ["oops"]
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        # The launcher exec'ed the command itself (same pid, no extra process).
        assert "sleep" in Path(f"/proc/{child.pid}/cmdline").read_text()
        child.terminate()
        assert child.wait(5) == -signal.SIGTERM
    finally:
        child.kill()


# ---------------------------------------------------------------------------- small parts


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n, rand=lambda: 0.5) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.delay(20, rand=lambda: 0.5) == 30.0
    low, high = policy.delay(3, rand=lambda: 0.0), policy.delay(3, rand=lambda: 1.0)
    assert 1.6 < low < 2.0 < high < 2.4


def test_a_change_reloads_only_the_groups_that_watch_it(tmp_path: Path) -> None:
    pkg = tmp_path / "demo"
    pkg.mkdir()
    for name in ("__init__", "chat", "embed", "shared"):
        (pkg / f"{name}.py").write_text("")
    (tmp_path / "other").mkdir()
    topo = loads(
        """
        [replicas.chat]
        app = "demo.chat:app"
        [replicas.embed]
        app = "demo.embed:app"
        [replicas.solo]
        app = "demo.chat:app"
        watch = ["other"]
        """,
        tmp_path / "anyserve.toml",
    )
    assert changed_groups(topo, {str(pkg / "chat.py")}) == ["chat"]
    assert changed_groups(topo, {str(pkg / "embed.py")}) == ["embed"]
    assert changed_groups(topo, {str(pkg / "shared.py")}) == ["chat", "embed"]
    assert changed_groups(topo, {str(tmp_path / "other" / "x.json")}) == ["solo"]
    assert changed_groups(topo, {str(tmp_path / "elsewhere.py")}) == []


def test_log_files_rotate_and_read_back(tmp_path: Path) -> None:
    files = LogFiles(tmp_path, max_bytes=400, keep=2)
    for i in range(80):
        files.write(Event(kind="output", name="chat.0", message=f"line {i}"))
    files.write(Event(kind="lifecycle", name="api.0", message="ready"))
    files.close()
    assert (tmp_path / "chat.0.log.1").exists() and (tmp_path / "chat.0.log.2").exists()
    assert not (tmp_path / "chat.0.log.3").exists()
    assert log_names(tmp_path) == ["api.0", "chat.0"]
    assert log_names(tmp_path, "chat") == ["chat.0"]
    last = tail(tmp_path / "chat.0.log", 2)
    assert [line.split(" ", 1)[1] for line in last] == ["line 78", "line 79"]
    assert tail(tmp_path / "api.0.log", 5)[0].endswith("[anyserve] ready")


def test_follow_yields_new_lines_and_new_files(tmp_path: Path) -> None:
    (tmp_path / "chat.0.log").write_text("old\n")

    def later() -> None:
        time.sleep(0.1)
        with open(tmp_path / "chat.0.log", "a") as handle:
            handle.write("new 1\nnew ")  # a partial line waits for its end
        (tmp_path / "api.0.log").write_text("api line\n")

    writer = threading.Thread(target=later)
    writer.start()
    got = list(follow(tmp_path, ["chat.0"], None, interval=0.02, stop=time.monotonic() + 0.5))
    writer.join()
    assert sorted(got) == [("api.0", "api line"), ("chat.0", "new 1")]


def test_printer_prefixes_and_colours_only_on_request() -> None:
    plain = io.StringIO()
    Printer(plain, width=6)(Event(kind="output", name="chat.0", message="hello"))
    assert plain.getvalue() == "chat.0 | hello\n"
    coloured = io.StringIO()
    printer = Printer(coloured, colour=True, width=6)
    printer(Event(kind="output", name="chat.0", message="hello"))
    printer(Event(kind="output", name="chat.1", message="hello"))
    first, second = coloured.getvalue().splitlines()
    assert first.startswith("\x1b[") and first.split("m", 1)[0] == second.split("m", 1)[0]


def test_control_socket_is_private_and_answers(tmp_path: Path) -> None:
    state = tmp_path / ".anyserve"

    def handler(req: dict[str, object]) -> object:
        if req["command"] == "boom":
            raise BadRequest("no such thing")
        return {"echo": req}

    with pytest.raises(NotReachable, match="no `anyserve up` is running"):
        request(state, "ps")
    server = ControlServer(state, handler)
    try:
        assert (socket_path(state).stat().st_mode & 0o777) == 0o600
        assert (state.stat().st_mode & 0o777) == 0o700
        assert request(state, "ps", x=1) == {"echo": {"command": "ps", "x": 1}}
        with pytest.raises(AnyServeError, match="no such thing"):
            request(state, "boom")
        with pytest.raises(AnyServeError, match="already running"):
            ControlServer(state, handler)
    finally:
        server.close()
    assert not socket_path(state).exists()


# ---------------------------------------------------------------------------- the token


def test_token_comes_from_the_file_the_environment_or_is_created(tmp_path: Path) -> None:
    def plan(api: str, env: dict[str, str], insecure: bool = False) -> tuple[str | None, bool]:
        (tmp_path / "anyserve.toml").write_text(f"[api_server]\n{api}\n")
        topo = loads(f"[api_server]\n{api}\n", tmp_path / "anyserve.toml")
        return token_plan(topo, insecure=insecure, env=env)

    configured = 'token = "from-the-file-0123456789"'
    assert plan(configured, {"ANYSERVE_TOKEN": "env"}) == ("from-the-file-0123456789", False)
    assert plan('host = "127.0.0.1"', {"ANYSERVE_TOKEN": "env"}) == ("env", False)
    # With neither, `up` makes one, on loopback too (another local user must not hold the
    # registry), and --insecure alone does not give that up.
    assert plan('host = "127.0.0.1"', {}) == (None, True)
    assert plan('host = "0.0.0.0"', {}) == (None, True)
    assert plan('host = "0.0.0.0"', {}, insecure=True) == (None, True)
    # Only `token = false` runs without one: as asked on loopback, else with --insecure.
    assert plan('host = "127.0.0.1"\ntoken = false', {}) == (None, False)
    assert plan('host = "0.0.0.0"\ntoken = false', {}, insecure=True) == (None, False)
    assert plan("token = false", {"ANYSERVE_TOKEN": "env"}) == (None, False)
    with pytest.raises(AnyServeError, match=r"anyserve.toml:3: api_server.token: false leaves"):
        plan('host = "0.0.0.0"\ntoken = false', {})


def test_a_created_token_is_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / ".anyserve"
    token = token_file(state)
    assert len(token) >= 32
    assert (state / "token").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert token_file(state) == token  # the next `up` keeps the clients' token working
    (state / "token").chmod(0o644)
    with pytest.raises(AnyServeError, match="not a private file"):
        token_file(state)
