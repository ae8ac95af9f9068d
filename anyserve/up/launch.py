"""The command lines and environments of ``up``'s children: the only place they are built.

The token travels in the environment (``$ANYSERVE_TOKEN``), set here once for every
child, after the group's own ``env`` so that a group cannot choose it. So do a replica's
auth mode (``$ANYSERVE_AUTH``, the API server's) and its registration secret
(``$ANYSERVE_INSTANCE``, which lets the supervisor unregister it as its owner): secrets
never go on a command line, where ``ps`` would show them.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from dataclasses import replace

from anyserve.client import ENV_TOKEN
from anyserve.defaults import max_message_bytes
from anyserve.replica import ENV_AUTH, ENV_INSTANCE, ReplicaConfig
from anyserve.server.config import ApiServerConfig
from anyserve.topology import GroupSpec, Topology


def child_env(
    base: Mapping[str, str],
    token: str | None,
    extra: Mapping[str, str] | None = None,
    *,
    auth: str | None = None,
    instance: str | None = None,
) -> dict[str, str]:
    """``base`` plus ``extra`` (a group's ``env``), unbuffered, with exactly ``token``,
    ``auth`` and ``instance`` (each left out when None, whatever ``base`` or ``extra`` said)."""
    env = {**base, "PYTHONUNBUFFERED": "1", **(extra or {})}
    for name, value in ((ENV_TOKEN, token), (ENV_AUTH, auth), (ENV_INSTANCE, instance)):
        env.pop(name, None)
        if value:
            env[name] = value
    return env


def new_instance() -> str:
    """A replica's registration secret (128 bits): only its holder may unregister it."""
    return secrets.token_hex(16)


def api_server_config(topology: Topology) -> ApiServerConfig:
    """The API server's configuration from ``[api_server]`` and ``[objects]``; its token is
    left out (it travels in the environment, see :func:`child_env`)."""
    api = topology.api_server
    defaults = ApiServerConfig(token=None)
    return replace(
        defaults,
        host=api.host,
        port=api.port,
        object_store=topology.objects.path,
        lease_ttl=api.lease_ttl if api.lease_ttl is not None else defaults.lease_ttl,
        heartbeat_interval=(
            api.heartbeat_interval
            if api.heartbeat_interval is not None
            else defaults.heartbeat_interval
        ),
        auth=api.auth,
        grpc_port=api.grpc_port,
        max_body_size=api.max_body_size,
    )


def api_server_argv(topology: Topology) -> list[str]:
    """``python -m anyserve.api_server`` with :func:`api_server_config`'s command line."""
    config = api_server_config(topology)
    return [sys.executable, "-m", "anyserve.api_server", *config.to_argv(with_token=False)]


def new_replica_id(group: GroupSpec, slot: int) -> str:
    """A fresh id per process (``chat-0-1a2b3c``): during a reload the old and the new
    process of one slot are registered side by side."""
    return f"{group.name}-{slot}-{secrets.token_hex(3)}"


def replica_config(
    topology: Topology, group: GroupSpec, port: int, replica_id: str
) -> ReplicaConfig:
    """One replica's configuration; what travels in the environment (token, auth mode,
    instance) is left to :func:`child_env`."""
    return ReplicaConfig(
        app=group.app,
        host=group.host,
        port=port,
        api_server=topology.api_server.url,
        object_store=topology.objects.path,
        replica_id=replica_id,
        allow_pickle=topology.objects.allow_pickle,
        grace=group.drain_timeout,
        max_in_flight=group.max_in_flight,
        # What the API server accepts, a replica accepts: one body limit for both.
        max_message_bytes=max_message_bytes(topology.api_server.max_body_size),
        token=None,
        instance="",
    )


def replica_argv(topology: Topology, group: GroupSpec, port: int, replica_id: str) -> list[str]:
    """``anyserve replica`` with :func:`replica_config`'s command line."""
    config = replica_config(topology, group, port, replica_id)
    return [sys.executable, "-m", "anyserve", "replica", *config.to_argv()]
