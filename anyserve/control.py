"""The local control endpoint of a running ``anyserve up``.

A unix socket in ``.anyserve/`` (a private directory, the socket itself 0600), so only
the same user on the same machine can reach it; nothing listens on the network. The
protocol is one JSON object per line each way: ``{"command": "ps"}`` →
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

The server thread does not act: it hands each request to the supervisor loop and
waits for the answer, so all state changes happen in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anyserve.errors import AnyServeError, NotReachable

Handler = Callable[[dict[str, Any]], Any]
"""Answers one request; raises :class:`AnyServeError` for an expected refusal."""

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, less elsewhere


def socket_path(state_dir: Path) -> Path:
    """Where the control socket of the ``up`` owning ``state_dir`` lives.

    Normally ``state_dir/control.sock``; a path too long for a unix socket moves to the
    temp directory under a name derived from ``state_dir``, so a client finds it too.
    """
    path = state_dir.resolve() / "control.sock"
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"anyserve-{os.getuid()}-{digest}.sock"


class ControlServer:
    """Serves the control socket in a background thread until :meth:`close`."""

    def __init__(self, state_dir: Path, handler: Handler) -> None:
        self.path = socket_path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise AnyServeError(
                    f"another `anyserve up` is already running here (control socket {self.path}); "
                    "stop it with `anyserve down` first"
                )
            self.path.unlink()  # left behind by an `up` that was killed
        outer = self

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(1_000_000)
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("expected a JSON object")
                    reply = {"ok": True, "result": outer.handler(request)}
                except AnyServeError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except ValueError as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                with contextlib.suppress(OSError):
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        self.handler = handler
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), _Request)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            daemon=True,
            name="control",
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def running_pid(state_dir: Path) -> int | None:
    """The pid of the ``up`` that owns ``state_dir``, or None if none answers."""
    if not _answers(socket_path(state_dir)):
        return None
    try:
        snapshot = request(state_dir, "ps", timeout=5)
    except AnyServeError:
        return None
    return int(snapshot.get("pid", 0)) or None


def request(state_dir: Path, command: str, timeout: float = 15.0, **args: Any) -> Any:
    """Send one command to the ``up`` owning ``state_dir`` and return its result."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotReachable(
                f"no `anyserve up` is running for {state_dir.parent} (no control socket at "
                f"{path}); start one with `anyserve up`"
            ) from None
        except OSError as exc:
            raise NotReachable(f"cannot reach `anyserve up` at {path}: {exc}") from None
        data = b""
        try:
            sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise NotReachable(f"`anyserve up` did not answer within {timeout:.0f}s") from None
        except OSError:  # it is going away (`down`) or was killed mid-answer
            data = b""
    if not data:
        raise NotReachable("`anyserve up` closed the control connection without answering")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise AnyServeError(str(reply.get("error", "request refused")))
    return reply.get("result")
