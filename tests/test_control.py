"""The control socket of `anyserve up`: a long state directory still works, and a socket,
file or directory that is not this user's is refused by both ends, never used or removed."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from anyserve.control import ControlServer, request, running_pid, socket_path
from anyserve.errors import AnyServeError
from tests.apps.up_support import cli, up_args, write_topology
from tests.conftest import Procs, wait_until

NOBODY = 65534
as_root = pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0,
    reason="making a file owned by another user needs root (os.chown)",
)


def handler(req: dict[str, object]) -> object:
    return {"pid": 4242, "echo": req}


@contextlib.contextmanager
def impostor(path: Path, owner: int = NOBODY) -> Iterator[socket.socket]:
    """A listening socket at ``path`` that belongs to ``owner``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")  # the path may be too long to bind
        sock.listen()
        sock.setblocking(False)
        os.chown(path, owner, owner)
        yield sock
    finally:
        sock.close()
        os.close(dir_fd)


def assert_never_connected(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.accept()


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o700)
    return path


def test_a_state_dir_too_long_for_a_socket_address_works_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / ("x" * 120) / ".anyserve"
    path = socket_path(state)
    assert path.parent == state.resolve() and len(os.fsencode(path)) > 108
    server = ControlServer(state, handler)
    try:
        # Bound in the state directory itself, not in a shared one such as /tmp.
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600
        assert request(state, "ps", x=1) == {"pid": 4242, "echo": {"command": "ps", "x": 1}}
        assert running_pid(state) == 4242
        with pytest.raises(AnyServeError, match="already running"):
            ControlServer(state, handler)
    finally:
        server.close()
    assert not path.exists()


def test_a_stale_socket_of_our_own_is_replaced(tmp_path: Path) -> None:
    state = private_dir(tmp_path / ".anyserve")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(socket_path(state)))  # bound, never listening: an `up` that was killed
    server = ControlServer(state, handler)
    try:
        assert request(state, "ps")["pid"] == 4242
    finally:
        server.close()


@as_root
def test_a_socket_owned_by_another_user_is_refused_by_server_and_client(tmp_path: Path) -> None:
    state = private_dir(tmp_path / ("y" * 120) / ".anyserve")
    path = socket_path(state)
    with impostor(path) as fake:
        with pytest.raises(AnyServeError, match=f"{path}.*owned by uid {NOBODY}"):
            request(state, "down")
        with pytest.raises(AnyServeError, match=f"owned by uid {NOBODY}"):
            running_pid(state)
        with pytest.raises(AnyServeError, match=f"{path}.*owned by uid {NOBODY}"):
            ControlServer(state, handler)
        assert_never_connected(fake)
        assert path.is_socket() and path.stat().st_uid == NOBODY  # not removed


@as_root
def test_a_file_in_place_of_the_socket_is_refused_and_kept(tmp_path: Path) -> None:
    state = private_dir(tmp_path / ".anyserve")
    path = socket_path(state)
    path.write_text("not a socket")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(AnyServeError, match=f"{path} exists but is not a socket"):
        ControlServer(state, handler)
    with pytest.raises(AnyServeError, match="not a socket"):
        request(state, "ps")
    assert path.read_text() == "not a socket"


def test_a_symlink_in_place_of_the_socket_is_refused(tmp_path: Path) -> None:
    state = private_dir(tmp_path / ".anyserve")
    elsewhere = private_dir(tmp_path / "elsewhere")
    server = ControlServer(elsewhere, handler)
    try:
        socket_path(state).symlink_to(socket_path(elsewhere))
        with pytest.raises(AnyServeError, match="not a socket"):
            request(state, "ps")
        with pytest.raises(AnyServeError, match="not a socket"):
            ControlServer(state, handler)
        assert socket_path(state).is_symlink()
    finally:
        server.close()


@as_root
def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = private_dir(tmp_path / ".anyserve")
    with impostor(socket_path(state)) as fake:
        os.chown(state, NOBODY, NOBODY)
        with pytest.raises(AnyServeError, match=f"{state.resolve()} is owned by uid {NOBODY}"):
            ControlServer(state, handler)
        with pytest.raises(AnyServeError, match=f"owned by uid {NOBODY}"):
            request(state, "ps")
        assert_never_connected(fake)
        assert (state.stat().st_mode & 0o777) == 0o700 and state.stat().st_uid == NOBODY


def test_a_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    real = private_dir(tmp_path / "real")
    state = tmp_path / ".anyserve"
    state.symlink_to(real)
    with pytest.raises(AnyServeError, match=f"{state} is a symlink"):
        ControlServer(state, handler)
    assert list(real.iterdir()) == []
    server = ControlServer(real, handler)
    try:
        with pytest.raises(AnyServeError, match="is a symlink"):
            request(state, "ps")
    finally:
        server.close()
    dangling = tmp_path / "gone" / ".anyserve"
    dangling.parent.mkdir()
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(AnyServeError, match=f"{dangling} is a symlink"):
        ControlServer(dangling, handler)
    assert not (tmp_path / "missing").exists()


def test_a_state_dir_opened_to_others_is_not_trusted_by_the_client(tmp_path: Path) -> None:
    state = tmp_path / ".anyserve"
    state.mkdir(mode=0o755)
    server = ControlServer(state, handler)  # it makes its own directory private
    try:
        assert (state.stat().st_mode & 0o777) == 0o700
        state.chmod(0o755)
        with pytest.raises(AnyServeError, match="open to other users"):
            request(state, "ps")
    finally:
        server.close()


@as_root
def test_the_cli_refuses_an_impostor_socket_for_up_down_and_ps(
    procs: Procs, tmp_path: Path
) -> None:
    topology = write_topology(tmp_path, "")
    state = private_dir(tmp_path / ".anyserve")
    path = socket_path(state)
    with impostor(path) as fake:
        for command in ("down", "ps"):
            result = cli(command, "-c", str(topology), cwd=tmp_path)
            assert result.returncode == 1, result.stderr
            assert f"{path} is owned by uid {NOBODY}" in result.stderr
            assert "Traceback" not in result.stderr
        up = procs.start(up_args(topology), name="up", cwd=tmp_path)
        wait_until(lambda: not up.alive(), timeout=30, what="`up` to refuse and exit")
        assert up.stop() == 1
        assert f"{path} is owned by uid {NOBODY}" in up.output()
        assert "Traceback" not in up.output()
        assert_never_connected(fake)
        assert path.is_socket()
