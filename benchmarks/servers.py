"""The processes a run starts: each in its own process group, each stopped at the end.

:class:`Children` is a context manager; leaving it (normally, on an error or on Ctrl-C)
stops every child it started, newest first: the signal given, a grace period, then
SIGKILL to the child's whole group and to any descendant that left the group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: children run here so that ``examples.mvp_demo`` imports."""

PY = sys.executable


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def anyserve_command() -> list[str]:
    """The installed ``anyserve`` script beside this interpreter, else ``python -m anyserve``."""
    beside = Path(PY).parent / "anyserve"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("anyserve")
    return [found] if found else [PY, "-m", "anyserve"]


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # not up yet
            last, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r})")


class Child:
    """One child process in a new session; its output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log_dir / f"{name}.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        # (pid, create_time): a pid is only killed while it is still that process.
        self._descendants: set[tuple[int, float]] = set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, last: int = 4000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-last:]

    def check(self) -> None:
        """Raise with the child's output if it has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")

    def remember_descendants(self) -> None:
        """Note the child's descendants now, so stop() can reach those in other groups."""
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self._descendants.add((proc.pid, proc.create_time()))

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        if self.alive():
            self.remember_descendants()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid, created in self._descendants:
            _kill_if_same(pid, created)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._out.close()


def _kill_if_same(pid: int, created: float) -> None:
    """SIGKILL ``pid`` unless it is gone or the pid now belongs to another process."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if proc.create_time() == created:
            proc.kill()


class Children:
    """Starts the children of one run and stops them all when the block is left."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="anyserve-bench-")
            log_dir = Path(self._tmp.name)
        self.dir = log_dir
        self.started: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Child:
        child = Child(name, argv, self.dir, env=env, cwd=cwd)
        self.started.append(child)
        return child

    def stop(self, child: Child, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        child.stop(sig, grace)
        if child in self.started:
            self.started.remove(child)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in reversed(self.started):
            child.stop(grace=3.0)
        self.started.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


# --------------------------------------------------------------------------- AnyServe pieces


class ApiServer:
    """``python -m anyserve.api_server`` on a free port."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def registry(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/registry", timeout=2).json()["replicas"])


def start_api_server(children: Children, object_store: Path, quiet_logs: bool) -> ApiServer:
    """By default at its default log level (a line per request), as users run it."""
    port = free_port()
    argv = [PY, "-m", "anyserve.api_server", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--object-store", str(object_store)]
    if quiet_logs:
        argv += ["--log-level", "warning"]
    child = children.start("api-server", argv)
    server = ApiServer(child, port)

    def healthy() -> bool:
        child.check()
        return httpx.get(server.url + "/health", timeout=1).status_code == 200

    wait_until(healthy, 20, "the API server's /health")
    return server


class Replica:
    """``anyserve replica examples.mvp_demo.stream_app:app`` registered with the API server."""

    def __init__(self, child: Child, port: int, replica_id: str) -> None:
        self.child = child
        self.port = port
        self.replica_id = replica_id
        self.endpoint = f"127.0.0.1:{port}"


DEMO_APP = "examples.mvp_demo.stream_app:app"


def start_replica(
    children: Children, api: ApiServer, object_store: Path, quiet_logs: bool
) -> Replica:
    port = free_port()
    replica_id = f"bench-{port}"
    argv = [*anyserve_command(), "replica", DEMO_APP, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--api-server", api.url, "--replica-id", replica_id]
    argv += ["--object-store", str(object_store)]
    # Per-token delay 0: streaming figures measure AnyServe, not the demo's pacing.
    env = {"ANYSERVE_DEMO_TOKEN_DELAY": "0"}
    if quiet_logs:
        env["ANYSERVE_LOG_LEVEL"] = "WARNING"
    child = children.start("replica", argv, env=env)

    def registered() -> bool:
        child.check()
        api.child.check()
        return any(r["replica_id"] == replica_id for r in api.registry())

    wait_until(registered, 30, f"replica {replica_id} in /registry")
    return Replica(child, port, replica_id)


def start_trivial(children: Children) -> int:
    """The fixed-200 HTTP server of ``benchmarks.trivial`` on a free port."""
    port = free_port()
    child = children.start("trivial", [PY, "-m", "benchmarks.trivial", str(port)])

    def listening() -> bool:
        child.check()
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until(listening, 10, "the trivial HTTP server")
    return port
