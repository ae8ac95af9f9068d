"""anyserve.toml: one frozen Topology, and one clear error (file, line, key, what was
expected; exit 2; nothing started) for each way to get it wrong."""

from __future__ import annotations

import dataclasses
import socket
import textwrap
from pathlib import Path

import pytest

from anyserve.errors import ConfigError
from anyserve.topology import Topology, load, loads
from tests.apps.up_support import cli, leftovers, write_app
from tests.conftest import ROOT, free_port


def _load(tmp_path: Path, text: str) -> Topology:
    path = tmp_path / "anyserve.toml"
    path.write_text(textwrap.dedent(text))
    return load(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return str(info.value)


def test_the_demo_topology_loads() -> None:
    topo = load(ROOT / "anyserve.toml")
    assert topo.api_server.url == "http://127.0.0.1:8080"
    assert topo.objects.path == Path("/tmp/anyserve-objects") and topo.objects.ttl == 3600
    assert [g.name for g in topo.groups] == ["chat", "embed", "heavy", "stream"]
    chat = topo.group("chat")
    assert chat.app == "examples.mvp_demo.chat_app:app" and chat.port == 50051
    assert chat.count == 1 and chat.restart == "always"
    assert chat.watch == (ROOT / "examples" / "mvp_demo",)  # the app's package folder
    assert topo.group("stream").port is None
    assert chat.max_in_flight == 8 and chat.stuck_timeout == 5.0  # the defaults
    assert topo.api_server.token is None and topo.api_server.loopback
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.groups[0].count = 3  # type: ignore[misc]


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    topo = _load(
        tmp_path,
        """
        [api_server]
        host = "0.0.0.0"
        port = 9000
        lease_ttl = "3s"
        heartbeat_interval = 0.5
        token = "0123456789abcdef-token"
        auth = "all"

        [objects]
        path = "objs"
        ttl = "30m"
        allow_pickle = true

        [replicas.chat]
        app = "pkg.mod:app"
        count = 3
        port = 50100
        host = "127.0.0.1"
        env = { LOG_LEVEL = "debug", WORKERS = 4 }
        watch = ["src"]
        restart = "on-failure"
        drain_timeout = "5s"
        max_in_flight = 2
        stuck_timeout = "10s"
        """,
    )
    assert topo.api_server.url == "http://127.0.0.1:9000"
    assert topo.api_server.lease_ttl == 3.0 and topo.api_server.heartbeat_interval == 0.5
    assert topo.api_server.token == "0123456789abcdef-token" and topo.api_server.auth == "all"
    assert not topo.api_server.loopback
    assert topo.objects.path == tmp_path / "objs" and topo.objects.ttl == 1800
    assert topo.objects.allow_pickle
    chat = topo.group("chat")
    assert chat.env_dict == {"LOG_LEVEL": "debug", "WORKERS": "4"}
    assert chat.watch == (tmp_path / "src",) and chat.restart == "on-failure"
    assert chat.drain_timeout == 5.0
    assert chat.max_in_flight == 2 and chat.stuck_timeout == 10.0
    assert [chat.port_for(i) for i in range(3)] == [50100, None, None]
    assert topo.state_dir == tmp_path / ".anyserve"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # unknown key, with a suggestion
            '[replicas.chat]\napp = "a:b"\nprot = 5\n',
            "anyserve.toml:3: replicas.chat.prot: unknown key (did you mean 'port'?)",
        ),
        (  # missing app: points at the group's header
            "[api_server]\nport = 8080\n\n[replicas.chat]\ncount = 2\n",
            'anyserve.toml:4: replicas.chat.app: missing; expected "module:attribute"',
        ),
        (  # wrong type
            '[replicas.chat]\napp = "a:b"\ncount = "two"\n',
            "anyserve.toml:3: replicas.chat.count: expected a whole number >= 0, "
            "got 'two' (string)",
        ),
        (
            "[api_server]\nport = 70000\n",
            "anyserve.toml:2: api_server.port: expected a port number 1-65535, got 70000",
        ),
        (
            '[objects]\nttl = "soon"\n',
            "anyserve.toml:2: objects.ttl: expected seconds or a duration",
        ),
        ('[replicas.chat]\napp = "no-colon"\n', 'replicas.chat.app: expected "module:attribute"'),
        ('[replicas.chat]\napp = "a:b"\nrestart = "sometimes"\n', "expected one of always"),
        (
            '[replicas.chat]\napp = "a:b"\nwatch = ["nope"]\n',
            "chat.watch: 'nope' does not",
        ),
        (
            '[replicas.chat]\napp = "a:b"\nenv = { A = [1] }\n',
            "chat.env.A: expected a str",
        ),
        ('[replicas.api]\napp = "a:b"\n', "replicas.api: a group name is"),
        ("[server]\nport = 1\n", "anyserve.toml:1: server: unknown key"),
        ("[replicas]\nchat = 3\n", "replicas.chat: expected a table"),
        (
            '[api_server]\nport = 9000\n[replicas.chat]\napp = "a:b"\nport = 9000\n',
            "anyserve.toml:5: replicas.chat.port: port 9000 is already used by api_server.port",
        ),
        ("[replicas.chat\n", "anyserve.toml: invalid TOML"),
        (
            '[replicas.chat]\napp = "a:b"\nmax_in_flight = 0\n',
            "anyserve.toml:3: replicas.chat.max_in_flight: expected a whole number >= 1, got 0",
        ),
        (
            '[replicas.chat]\napp = "a:b"\nmax_in_flight = 2.5\n',
            "replicas.chat.max_in_flight: expected a whole number >= 1, got 2.5 (number)",
        ),
        (
            '[replicas.chat]\napp = "a:b"\nstuck_timeout = "a while"\n',
            "chat.stuck_timeout: expected",
        ),
        (  # a short token is refused, and the message does not repeat it
            '[api_server]\ntoken = "secret"\n',
            "anyserve.toml:2: api_server.token: expected at least 16 visible characters",
        ),
        ("[api_server]\ntoken = 12\n", "api_server.token: expected at least 16"),
        ('[api_server]\nauth = "some"\n', "api_server.auth: expected one of writes, all"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, text)
    assert expected in message, message
    assert "anyserve.toml" in message


def test_token_false_and_stuck_timeout_zero_turn_things_off(tmp_path: Path) -> None:
    topo = _load(
        tmp_path,
        """
        [api_server]
        host = "::1"
        token = false

        [replicas.chat]
        app = "a:b"
        stuck_timeout = 0
        """,
    )
    assert topo.api_server.token is None and topo.api_server.token_off
    assert topo.api_server.loopback and topo.api_server.url.startswith("http://[::1]:")
    assert topo.group("chat").stuck_timeout is None
    assert "hunter2" not in _error(tmp_path, '[api_server]\ntoken = "hunter2"\n')


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "anyserve.toml")


def test_loads_runs_no_user_code(tmp_path: Path) -> None:
    pkg = tmp_path / "evil"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('imported!')\n")
    (pkg / "app.py").write_text("raise SystemExit('imported!')\n")
    topo = loads('[replicas.x]\napp = "evil.app:app"\n', tmp_path / "anyserve.toml")
    assert topo.group("x").watch == (pkg,)


# ---------------------------------------------------------------------------- the command line


def test_dry_run_validates_only(tmp_path: Path) -> None:
    write_app(tmp_path)
    (tmp_path / "anyserve.toml").write_text('[replicas.echo]\napp = "upapp.echo:app"\n')
    result = cli("up", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "upapp.echo:app" in result.stdout
    assert not (tmp_path / ".anyserve").exists()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[replicas.chat]\napp = "a:b"\nprot = 5\n', "replicas.chat.prot: unknown key"),
        ("[replicas.chat]\ncount = 1\n", "replicas.chat.app: missing"),
        ('[replicas.chat]\napp = "a:b"\ncount = "two"\n', "replicas.chat.count: expected"),
    ],
)
def test_bad_file_exits_2_with_one_line_and_starts_nothing(
    tmp_path: Path, text: str, key: str
) -> None:
    (tmp_path / "anyserve.toml").write_text(text)
    result = cli("up", "--no-tui", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: anyserve.toml:") and key in lines[0]
    assert not (tmp_path / ".anyserve").exists()


def test_port_in_use_exits_2_naming_port_and_group(tmp_path: Path) -> None:
    write_app(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "anyserve.toml").write_text(
            f'[api_server]\nport = {free_port()}\n\n[objects]\npath = "{tmp_path / "objs"}"\n\n'
            f'[replicas.chat]\napp = "upapp.echo:app"\nport = {port}\n'
        )
        result = cli("up", "--no-tui", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert f"anyserve.toml:9: replicas.chat.port: port {port}" in message
    assert "already in use (group chat)" in message
    assert not (tmp_path / ".anyserve" / "logs").exists()
    assert leftovers(str(tmp_path)) == []


def test_control_commands_without_a_running_up_fail_cleanly(tmp_path: Path) -> None:
    for args in (["ps"], ["status"], ["restart", "chat"], ["scale", "chat=2"], ["down"]):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: no `anyserve up` is running"), result.stderr
        assert "Traceback" not in result.stderr
    bad = cli("scale", "chat", cwd=tmp_path)
    assert bad.returncode == 2 and "NAME=N" in bad.stderr


def test_a_non_loopback_api_server_needs_a_token_or_insecure(tmp_path: Path) -> None:
    write_app(tmp_path)
    toml = tmp_path / "anyserve.toml"
    toml.write_text('[api_server]\nhost = "0.0.0.0"\n\n[replicas.echo]\napp = "upapp.echo:app"\n')
    shown = cli("up", "--dry-run", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"token created in {tmp_path / '.anyserve' / 'token'}" in shown.stdout
    assert "max in flight 8" in shown.stdout
    assert not (tmp_path / ".anyserve").exists()  # a dry run creates nothing

    toml.write_text(toml.read_text().replace('"0.0.0.0"\n', '"0.0.0.0"\ntoken = false\n'))
    for args in (["up", "--no-tui"], ["up", "--dry-run"]):
        refused = cli(*args, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "anyserve.toml:3: api_server.token: false leaves" in lines[0]
        assert "--insecure" in lines[0]
    assert not (tmp_path / ".anyserve").exists()
    assert leftovers(str(tmp_path)) == []
    allowed = cli("up", "--dry-run", "--insecure", cwd=tmp_path)
    assert allowed.returncode == 0 and "no token" in allowed.stdout
