"""Shared fixtures: real API server and replica processes on ephemeral ports.

Every process is started in its own session (process group) and the whole group is
killed at teardown, so no test leaves a process behind. Waiting is always polling
with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    """A port the kernel just handed out for 127.0.0.1 (closed again before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}: {last_exc!r}"
    )


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.args = args
        self.log = log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd or ROOT),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process, wait, then kill its whole group; return the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._out.close()
        return self.popen.returncode


class Procs:
    """Starts processes for one test and stops them all at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def start(
        self,
        args: list[str],
        name: str = "proc",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        proc = Proc(args, self.tmp / f"{name}.{len(self.started)}.log", env=env, cwd=cwd)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop(timeout=5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


class ApiServer:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def registry(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/registry", timeout=5).json()["replicas"])

    def wait_registered(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        return wait_until(  # type: ignore[no-any-return]
            lambda: r if len(r := self.registry()) >= count else None,
            timeout=timeout,
            what=f"{count} replicas in /registry",
        )


def start_api_server(
    procs: Procs,
    *,
    lease_ttl: float = 3.0,
    heartbeat: float = 0.5,
    port: int | None = None,
    extra: list[str] | None = None,
) -> ApiServer:
    """Start ``python -m anyserve.api_server`` on a free port and wait for /health."""
    port = port or free_port()
    proc = procs.start(
        [
            PY,
            "-m",
            "anyserve.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lease-ttl",
            str(lease_ttl),
            "--heartbeat-interval",
            str(heartbeat),
            *(extra or []),
        ],
        name="api",
    )
    server = ApiServer(proc, port)

    def healthy() -> bool:
        if not proc.alive():
            raise AssertionError("api server exited:\n" + proc.output())
        return httpx.get(server.url + "/health", timeout=1).status_code == 200

    wait_until(healthy, timeout=15, what="api server /health")
    return server


@pytest.fixture
def api_server(procs: Procs) -> ApiServer:
    return start_api_server(procs)


class Replica:
    def __init__(self, proc: Proc, port: int, replica_id: str) -> None:
        self.proc = proc
        self.port = port
        self.replica_id = replica_id
        self.endpoint = f"127.0.0.1:{port}"


def start_replica(
    procs: Procs,
    app: str,
    *,
    api_server: ApiServer | None = None,
    object_store: Path | None = None,
    replica_id: str | None = None,
    port: int | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Replica:
    """Start ``anyserve replica APP`` on a free port; wait until it serves gRPC."""
    port = port or free_port()
    replica_id = replica_id or f"r{port}"
    args = [
        PY,
        "-m",
        "anyserve",
        "replica",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--replica-id",
        replica_id,
    ]
    if api_server is not None:
        args += ["--api-server", api_server.url]
    if object_store is not None:
        args += ["--object-store", str(object_store)]
    proc = procs.start(args + list(extra or []), name=f"replica-{replica_id}", env=env)
    replica = Replica(proc, port, replica_id)
    if wait:
        wait_for_grpc(replica)
        if api_server is not None:
            wait_until(
                lambda: any(r["replica_id"] == replica_id for r in api_server.registry()),
                timeout=15,
                what=f"{replica_id} registered",
            )
    return replica


#: The chat and streaming demo apps with their replica ids, for tests that need a small cluster.
DEMO_APPS = (
    ("examples.mvp_demo.chat_app:app", "chat"),
    ("examples.mvp_demo.stream_app:app", "stream"),
)


def start_cluster(
    procs: Procs, tmp: Path, apps: tuple[tuple[str, str], ...] = DEMO_APPS
) -> ApiServer:
    """An API server and one replica per ``(app, replica_id)``, sharing a store under ``tmp``."""
    server = start_api_server(procs, extra=["--object-store", str(tmp / "objects")])
    for app, replica_id in apps:
        start_replica(
            procs,
            app,
            api_server=server,
            object_store=tmp / "objects",
            replica_id=replica_id,
            env={"ANYSERVE_DEMO_TOKEN_DELAY": "0"},
            wait=False,
        )
    server.wait_registered(len(apps), timeout=30)
    return server


def wait_for_grpc(replica: Replica, timeout: float = 15.0) -> None:
    import grpc

    from anyserve._proto import grpc_predict_v2_pb2 as pb
    from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg

    def ready() -> bool:
        if not replica.proc.alive():
            raise AssertionError("replica exited:\n" + replica.proc.output())
        with grpc.insecure_channel(replica.endpoint) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready)

    wait_until(ready, timeout=timeout, what=f"replica on {replica.endpoint} ready")
