"""The local control endpoint of a running ``anyserve up``.

A unix socket in ``.anyserve/`` (a private directory, the socket itself 0600), so only
the same user on the same machine can reach it; nothing listens on the network. The
protocol is one JSON object per line each way: ``{"command": "ps"}`` →
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

Both ends trust the socket only after checking that the state directory is a real
directory (not a symlink) owned by this user and closed to others, and that the socket
in it is a socket owned by this user: anything else may be another user's impostor, so
it is named in an error and never connected to, bound over or removed. A state
directory whose path is too long for a unix socket address is reached through its open
directory descriptor (``/proc/self/fd/N/control.sock``) rather than through a shared
directory such as ``/tmp``, where anyone could claim the name first.

The server thread does not act: it hands each request to the supervisor loop and
waits for the answer, so all state changes happen in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anyserve.errors import AnyServeError, NotReachable

Handler = Callable[[dict[str, Any]], Any]
"""Answers one request; raises :class:`AnyServeError` for an expected refusal."""

SOCKET_NAME = "control.sock"
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, less elsewhere
_FD_DIR = Path("/proc/self/fd")  # Linux: a path to an open directory descriptor


def socket_path(state_dir: Path) -> Path:
    """Where the control socket of the ``up`` owning ``state_dir`` lives (always inside
    it; a long path is reached through a directory descriptor, see :func:`_address`)."""
    return _state_dir(state_dir) / SOCKET_NAME


def _state_dir(state_dir: Path) -> Path:
    # Resolve the parents but not the directory itself, so a symlinked state directory
    # is seen (and refused) instead of silently followed.
    return state_dir.parent.resolve() / state_dir.name


def _open_dir(state_dir: Path) -> int:
    """Open ``state_dir`` (refusing a symlink) and return its descriptor; every later
    check and the socket itself go through this descriptor, so the directory checked is
    the directory used."""
    path = _state_dir(state_dir)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if path.is_symlink():
            raise AnyServeError(
                f"the state directory {path} is a symlink; refusing to use it for the control "
                "socket (replace it with a real directory)"
            ) from None
        raise AnyServeError(f"cannot open the state directory {path}: {exc}") from None


def _check_private(dir_fd: int, path: Path) -> None:
    """Raise unless the directory open as ``dir_fd`` is this user's and closed to others."""
    info = os.fstat(dir_fd)
    if info.st_uid != os.getuid():
        raise AnyServeError(
            f"the state directory {path} is owned by uid {info.st_uid}, not by you "
            f"(uid {os.getuid()}); refusing to use its control socket"
        )
    if info.st_mode & 0o077:
        raise AnyServeError(
            f"the state directory {path} is open to other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); refusing to trust its control socket "
            f"(`chmod 700 {path}`)"
        )


def _check_socket(dir_fd: int, path: Path) -> os.stat_result | None:
    """The socket's stat if it is a socket owned by this user, None if there is none;
    anything else raises, naming the path."""
    try:
        info = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        raise AnyServeError(
            f"{path} exists but is not a socket; refusing to use or remove it (remove it "
            "yourself if it is yours)"
        )
    if info.st_uid != os.getuid():
        raise AnyServeError(
            f"the control socket {path} is owned by uid {info.st_uid}, not by you (uid "
            f"{os.getuid()}); refusing to talk to it or remove it"
        )
    return info


def _address(dir_fd: int, path: Path) -> str:
    """The address to bind or connect for ``path`` whose directory is open as ``dir_fd``."""
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        return str(path)
    if _FD_DIR.is_dir():
        return str(_FD_DIR / str(dir_fd) / SOCKET_NAME)
    raise AnyServeError(
        f"the state directory path {path.parent} is too long for a unix socket on this "
        "system; move the project to a shorter path"
    )


@contextlib.contextmanager
def _trusted(state_dir: Path) -> Iterator[str | None]:
    """The address of a trustworthy control socket of ``state_dir``, None if none
    exists; raises when one exists that is not ours."""
    path = socket_path(state_dir)
    try:
        dir_fd = _open_dir(state_dir)
    except FileNotFoundError:
        yield None
        return
    try:
        if not _exists(dir_fd):
            # Nothing to talk to: say "not running" even when the directory is not private.
            yield None
            return
        _check_private(dir_fd, path.parent)
        _check_socket(dir_fd, path)
        yield _address(dir_fd, path)
    finally:
        os.close(dir_fd)


def _exists(dir_fd: int) -> bool:
    try:
        os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class ControlServer:
    """Serves the control socket in a background thread until :meth:`close`."""

    def __init__(self, state_dir: Path, handler: Handler) -> None:
        self.path = socket_path(state_dir)
        # A symlink (even a dangling one) is refused by _open_dir, with its name.
        with contextlib.suppress(FileExistsError):
            state_dir.mkdir(parents=True, exist_ok=True)
        self._dir_fd = _open_dir(state_dir)
        try:
            if os.fstat(self._dir_fd).st_uid == os.getuid():
                os.fchmod(self._dir_fd, 0o700)
            _check_private(self._dir_fd, self.path.parent)
            self._bind(handler)
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            daemon=True,
            name="control",
        )
        self._thread.start()

    def _bind(self, handler: Handler) -> None:
        address = _address(self._dir_fd, self.path)
        if _check_socket(self._dir_fd, self.path) is not None:
            if _answers(address):
                raise AnyServeError(
                    f"another `anyserve up` is already running here (control socket {self.path}); "
                    "stop it with `anyserve down` first"
                )
            os.unlink(SOCKET_NAME, dir_fd=self._dir_fd)  # ours, left by an `up` that was killed
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
            self._server = socketserver.ThreadingUnixStreamServer(address, _Request)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        # Remember which file we bound, so close() removes only that one.
        self._inode = os.stat(SOCKET_NAME, dir_fd=self._dir_fd, follow_symlinks=False).st_ino

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            info = os.stat(SOCKET_NAME, dir_fd=self._dir_fd, follow_symlinks=False)
            if info.st_ino == self._inode and info.st_uid == os.getuid():
                os.unlink(SOCKET_NAME, dir_fd=self._dir_fd)
        os.close(self._dir_fd)


def _answers(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def running_pid(state_dir: Path) -> int | None:
    """The pid of the ``up`` that owns ``state_dir``, or None if none answers.

    A control socket that is not this user's raises rather than counting as "none"."""
    with _trusted(state_dir) as address:
        if address is None or not _answers(address):
            return None
    try:
        snapshot = request(state_dir, "ps", timeout=5)
    except NotReachable:
        return None
    return int(snapshot.get("pid", 0)) or None


def request(state_dir: Path, command: str, timeout: float = 15.0, **args: Any) -> Any:
    """Send one command to the ``up`` owning ``state_dir`` and return its result."""
    path = socket_path(state_dir)
    with _trusted(state_dir) as address, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            if address is None:
                raise FileNotFoundError
            sock.connect(address)
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
