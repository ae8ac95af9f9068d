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

from anyserve.client import ENV_TOKEN
from anyserve.defaults import AUTH_MODE
from anyserve.replica import ENV_AUTH, ENV_INSTANCE
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


def api_server_argv(topology: Topology) -> list[str]:
    api = topology.api_server
    argv = [
        sys.executable,
        "-m",
        "anyserve.api_server",
        "--host",
        api.host,
        "--port",
        str(api.port),
        "--object-store",
        str(topology.objects.path),
    ]
    if api.lease_ttl is not None:
        argv += ["--lease-ttl", str(api.lease_ttl)]
    if api.heartbeat_interval is not None:
        argv += ["--heartbeat-interval", str(api.heartbeat_interval)]
    if api.auth != AUTH_MODE:
        argv += ["--auth", api.auth]
    if api.grpc_port is not None:
        argv += ["--grpc-port", str(api.grpc_port)]
    return argv


def new_replica_id(group: GroupSpec, slot: int) -> str:
    """A fresh id per process (``chat-0-1a2b3c``): during a reload the old and the new
    process of one slot are registered side by side."""
    return f"{group.name}-{slot}-{secrets.token_hex(3)}"


def replica_argv(topology: Topology, group: GroupSpec, port: int, replica_id: str) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "anyserve",
        "replica",
        group.app,
        "--host",
        group.host,
        "--port",
        str(port),
        "--api-server",
        topology.api_server.url,
        "--object-store",
        str(topology.objects.path),
        "--replica-id",
        replica_id,
        "--grace",
        str(group.drain_timeout),
        "--max-in-flight",
        str(group.max_in_flight),
    ]
    if topology.objects.allow_pickle:
        argv.append("--allow-pickle")
    return argv
