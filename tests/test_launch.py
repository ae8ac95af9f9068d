"""``up`` builds its children's command lines only from their configurations' ``to_argv``,
and what each command line says is read back as the same configuration."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import typer

from anyserve.cli import launchers
from anyserve.defaults import MAX_BODY_SIZE, max_message_bytes
from anyserve.errors import ConfigError
from anyserve.replica import ReplicaConfig
from anyserve.server.config import parse_args
from anyserve.topology import loads
from anyserve.up import launch

TOKEN = "a-token-that-must-stay-off-every-command-line"

TOPOLOGY = f"""
[api_server]
host = "127.0.0.2"
port = 18080
lease_ttl = "3s"
heartbeat_interval = "750ms"
token = "{TOKEN}"
auth = "all"
grpc_port = 18081
max_body_size = "100MiB"

[objects]
path = "/var/tmp/anyserve store"
allow_pickle = true

[replicas.chat]
app = "examples.mvp_demo.chat_app:app"
max_in_flight = 3
drain_timeout = "2.5s"
"""


def parse_replica(argv: list[str]) -> ReplicaConfig:
    """What ``anyserve replica ARGV`` would run with (parsed by the command, not run)."""
    command = typer.main.get_command(launchers.commands)
    replica = command.commands["replica"]  # type: ignore[attr-defined]
    context = replica.make_context("replica", list(argv))
    config: ReplicaConfig = launchers.replica_config(**context.params)
    return config


def without_environment(config: ReplicaConfig) -> ReplicaConfig:
    """The fields a command line carries: the token, auth mode and instance travel in the
    environment, and ``workers`` has no option."""
    return dataclasses.replace(config, token=None, auth="writes", instance="", workers=1)


def test_a_replica_config_round_trips_through_its_command_line() -> None:
    config = ReplicaConfig(
        app="pkg.module:app",
        host="0.0.0.0",
        port=50123,
        api_server="http://127.0.0.1:18080",
        object_store=Path("/var/tmp/a store"),
        replica_id="chat-0-abc123",
        allow_pickle=True,
        grace=0.1 + 0.2,
        max_in_flight=3,
        max_message_bytes=100 * 1024 * 1024 + 1,
        token=None,
        instance="",
    )
    defaults = ReplicaConfig(app="x:y", token=None, instance="")
    for field in dataclasses.fields(ReplicaConfig):
        if field.name not in ("token", "auth", "instance", "workers"):
            assert getattr(config, field.name) != getattr(defaults, field.name), field.name
    assert without_environment(parse_replica(config.to_argv())) == without_environment(config)


def test_up_builds_the_api_server_command_line_from_its_config() -> None:
    topology = loads(TOPOLOGY, Path("anyserve.toml"))
    argv = launch.api_server_argv(topology)
    assert argv[:3] == [sys.executable, "-m", "anyserve.api_server"]
    config = launch.api_server_config(topology)
    assert argv[3:] == config.to_argv(with_token=False)
    parsed = parse_args(argv[3:])
    assert dataclasses.replace(parsed, token=None) == config
    assert (parsed.host, parsed.port, parsed.auth, parsed.grpc_port) == (
        "127.0.0.2",
        18080,
        "all",
        18081,
    )
    assert (parsed.lease_ttl, parsed.heartbeat_interval) == (3.0, 0.75)
    assert parsed.max_body_size == 100 * 1024 * 1024
    assert parsed.object_store == Path("/var/tmp/anyserve store")
    assert TOKEN not in " ".join(argv)


def test_up_gives_replicas_the_api_servers_body_limit() -> None:
    topology = loads(TOPOLOGY, Path("anyserve.toml"))
    [group] = topology.groups
    argv = launch.replica_argv(topology, group, 50200, "chat-0-abc123")
    assert argv[:4] == [sys.executable, "-m", "anyserve", "replica"]
    parsed = parse_replica(argv[4:])
    assert without_environment(parsed) == without_environment(
        launch.replica_config(topology, group, 50200, "chat-0-abc123")
    )
    assert parsed.max_message_bytes == max_message_bytes(100 * 1024 * 1024)
    assert (parsed.max_in_flight, parsed.grace, parsed.allow_pickle) == (3, 2.5, True)
    assert parsed.api_server == "http://127.0.0.2:18080"
    assert TOKEN not in " ".join(argv)


def test_the_default_body_limit_is_one_definition() -> None:
    topology = loads('[replicas.a]\napp = "m:app"\n', Path("anyserve.toml"))
    assert launch.api_server_config(topology).max_body_size == MAX_BODY_SIZE
    [group] = topology.groups
    replica = launch.replica_config(topology, group, 1, "a-0")
    assert replica.max_message_bytes == max_message_bytes(MAX_BODY_SIZE)
    assert ReplicaConfig(app="m:app", token=None).max_message_bytes == replica.max_message_bytes


@pytest.mark.parametrize("value", ['"lots"', "0", "-5", "true", '"12 parsecs"', '"inf"', '"nan"'])
def test_a_bad_max_body_size_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="max_body_size"):
        loads(f'[api_server]\nmax_body_size = {value}\n[replicas.a]\napp = "m:app"\n', Path("x"))
