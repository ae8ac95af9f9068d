"""``ApiServerConfig`` and its command line say the same thing both ways."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from anyserve.server.config import ApiServerConfig, parse_args

# A value unlike the default for every field (floats that are not short decimals, so a
# lossy rendering would show).
EVERYTHING = ApiServerConfig(
    host="0.0.0.0",
    port=18081,
    lease_ttl=7.25,
    heartbeat_interval=0.1 + 0.2,
    object_store=Path("/var/tmp/anyserve objects"),
    request_timeout=12.5,
    log_level="debug",
    max_object_size=3 * 1024**3 + 1,
    shutdown_timeout=1.75,
    grpc_port=18082,
    max_body_size=5 * 1024**2 + 3,
    max_queue=9,
    queue_timeout=2.5,
    stream_idle_timeout=33.3,
    header_timeout=4.5,
    body_timeout=6.5,
    write_timeout=7.75,
    max_header_size=16 * 1024 + 5,
    token="s3cret-token",
    auth="all",
    max_replicas=77,
    register_rate=3.5,
    register_burst=11,
)


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # parse_args takes the token from $ANYSERVE_TOKEN when no flag gives it.
    monkeypatch.delenv("ANYSERVE_TOKEN", raising=False)


def test_every_field_differs_from_its_default_in_the_sample() -> None:
    # Otherwise a field to_argv forgot would round-trip by luck.
    default = ApiServerConfig()
    same = [
        f.name
        for f in dataclasses.fields(ApiServerConfig)
        if getattr(EVERYTHING, f.name) == getattr(default, f.name)
    ]
    assert same == []


def test_the_command_line_round_trips() -> None:
    assert parse_args(EVERYTHING.to_argv()) == EVERYTHING
    assert parse_args(ApiServerConfig().to_argv()) == ApiServerConfig()


def test_the_token_can_be_left_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = EVERYTHING.to_argv(with_token=False)
    assert "s3cret-token" not in argv
    monkeypatch.setenv("ANYSERVE_TOKEN", "s3cret-token")
    assert parse_args(argv) == EVERYTHING
