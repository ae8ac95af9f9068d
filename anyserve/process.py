"""The one place child processes are spawned, stopped and sampled.

Every child of ``anyserve up`` runs in its own process group (so the terminal's Ctrl-C
reaches only the supervisor, which decides the stop order) and is started through a
tiny launcher, ``python -c <launcher> PARENT_PID CMD...``. The launcher asks
the kernel to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``, kept across
``exec``), checks that the parent is still the one it was started by (it may have died
before the request took effect), then execs the real command. A ``preexec_fn`` could
do the same, but it is not safe in a process that runs threads, and the supervisor does.

Output is read by two threads per child and handed to a callback line by line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

# Run as ``python -c`` so that it does not import the anyserve package (and the SDK
# behind it) just to exec the real command. 1 is PR_SET_PDEATHSIG, 9 is SIGKILL.
_LAUNCHER = """
import os, sys
parent, cmd = int(sys.argv[1]), sys.argv[2:]
if sys.platform.startswith("linux"):
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)
    except Exception:
        pass
if os.getppid() != parent:
    sys.exit(1)  # the parent died before prctl took effect: nobody would kill us
try:
    os.execvp(cmd[0], cmd)
except OSError as exc:
    sys.stderr.write(f"anyserve: cannot run {cmd[0]}: {exc.strerror or exc}\\n")
    sys.exit(127)
"""

LineCallback = Callable[["ChildProcess", str, str], None]
"""``(child, stream, line)`` with ``stream`` ``"stdout"`` or ``"stderr"``."""


class ChildProcess(Protocol):
    """What the supervisor needs of a running child: :class:`Child`, or a test's fake."""

    pid: int
    stderr_tail: deque[str]

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float) -> int | None: ...
    def join_output(self, timeout: float = 1.0) -> None: ...


Spawn = Callable[[Sequence[str], Path, Mapping[str, str], "LineCallback"], ChildProcess]
"""Starts a child: ``(argv, cwd, env, on_line)``; :func:`spawn` outside of tests."""


class Child:
    """One running child process in its own process group."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_line: LineCallback,
    ) -> None:
        self.argv = list(argv)
        self.started_at = time.monotonic()
        self.stderr_tail: deque[str] = deque(maxlen=20)
        """The last lines the child wrote to stderr (why it crashed, usually)."""
        launcher = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        # Children must be spawned from a thread that outlives them: the parent-death
        # signal fires when the *thread* that forked the child exits.
        self._popen = subprocess.Popen(
            launcher,
            cwd=str(cwd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self._popen.pid
        self._readers = [
            threading.Thread(
                target=_pump, args=(self, name, pipe, on_line), name=f"out-{self.pid}", daemon=True
            )
            for name, pipe in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def poll(self) -> int | None:
        """The exit code once the process has exited (``-N`` for signal N), else None."""
        return self._popen.poll()

    @property
    def alive(self) -> bool:
        return self._popen.poll() is None

    def terminate(self) -> None:
        """Ask the whole process group to stop (SIGTERM): replicas unregister and drain."""
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group, including anything the child started."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        if self._popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """Block up to ``timeout`` seconds for the exit code (used only at final cleanup)."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def join_output(self, timeout: float = 1.0) -> None:
        """Wait briefly for the output readers to reach end of file."""
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))


def spawn(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], on_line: LineCallback
) -> ChildProcess:
    """Start ``argv`` as a :class:`Child`."""
    return Child(argv, cwd=cwd, env=env, on_line=on_line)


def _pump(child: Child, stream: str, pipe: IO[bytes] | None, on_line: LineCallback) -> None:
    if pipe is None:
        return
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if stream == "stderr" and line.strip():
                child.stderr_tail.append(line)
            on_line(child, stream, line)


class Sampler:
    """CPU % and RSS of children by pid; psutil objects are kept so CPU % has a baseline."""

    def __init__(self) -> None:
        self._procs: dict[int, Any] = {}

    def sample(self, pids: Sequence[int]) -> dict[int, tuple[float, int]]:
        """``{pid: (cpu_percent, rss_bytes)}`` for the pids still alive."""
        import psutil

        out: dict[int, tuple[float, int]] = {}
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                with proc.oneshot():
                    out[pid] = (proc.cpu_percent(None), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
        for pid in set(self._procs) - set(pids):
            del self._procs[pid]
        return out


class ReadinessProbe:
    """Asks replicas the KServe v2 ``ServerReady`` over gRPC, all at once, with a deadline.

    Channels are kept per endpoint between rounds (a probe must not cost a connection
    each second) and closed once an endpoint is no longer asked about.
    """

    def __init__(self) -> None:
        self._channels: dict[str, tuple[Any, Any]] = {}

    def ask(self, targets: Mapping[int, str], timeout: float) -> dict[int, bool]:
        """``{key: answered ready}`` for ``targets`` (``{key: "host:port"}``)."""
        import grpc

        from anyserve._proto import grpc_predict_v2_pb2 as pb
        from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg

        for endpoint in set(self._channels) - set(targets.values()):
            self._channels.pop(endpoint)[0].close()
        calls = {}
        for key, endpoint in targets.items():
            if endpoint not in self._channels:
                channel = grpc.insecure_channel(endpoint)
                self._channels[endpoint] = (channel, pbg.GRPCInferenceServiceStub(channel))
            stub = self._channels[endpoint][1]
            calls[key] = stub.ServerReady.future(pb.ServerReadyRequest(), timeout=timeout)
        answers: dict[int, bool] = {}
        for key, call in calls.items():
            try:
                answers[key] = bool(call.result().ready)
            except grpc.RpcError:
                answers[key] = False
        return answers

    def forget_all(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound (another process listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # No SO_REUSEPORT: a listener that set it must still count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on ``host`` (free again once this returns)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
