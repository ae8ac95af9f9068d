"""The API server's token: where ``up`` takes it from, and the file it creates.

``up`` always runs its API server with a token, as Jupyter does, even on loopback:
another local user then cannot register replicas, write objects, or unregister or take
over a replica's id. It is ``[api_server] token``, else ``$ANYSERVE_TOKEN``, else one
created (or reused) in ``.anyserve/token``, where the client commands find it. Only
``token = false`` runs without one (beyond loopback also ``--insecure``). It reaches every
child as ``$ANYSERVE_TOKEN`` (see :mod:`anyserve.up.launch`), never on a command line,
where ``ps`` would show it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from anyserve.client import ENV_TOKEN
from anyserve.errors import ConfigError
from anyserve.topology import Topology, config_error

TOKEN_FILE = "token"
"""Created in the state directory when ``up`` makes a token up."""


def token_plan(
    topology: Topology, *, insecure: bool, env: dict[str, str] | None = None
) -> tuple[str | None, bool]:
    """``(token, create)``: the API server's token and whether ``up`` must create one.

    ``[api_server] token`` wins, then ``$ANYSERVE_TOKEN``; with neither ``up`` creates one
    (or reuses the one it created before), on loopback too. ``token = false`` runs without
    a token: on loopback as asked, on a non-loopback address only with ``--insecure``.
    """
    api = topology.api_server
    env = dict(os.environ) if env is None else env
    if api.token:
        return api.token, False
    if not api.token_off:
        if env.get(ENV_TOKEN):
            return env[ENV_TOKEN], False
        return None, True
    if api.loopback or insecure:
        return None, False
    raise config_error(
        topology,
        ("api_server", "token"),
        f"false leaves the API server on {api.host} open to anyone who can reach it; "
        "remove the line (up then creates a token) or pass --insecure",
    )


def token_file(state_dir: Path) -> str:
    """The token in ``state_dir/token``, created (0600) if there is none yet.

    Reused across runs, so clients that read it keep working after `up` restarts.
    """
    path = state_dir / TOKEN_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    try:
        info = path.lstat()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return token
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{path} is not a private file of yours (expected mode 0600); remove it and "
            "`anyserve up` creates a new token"
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"{path} is empty; remove it and `anyserve up` creates a new token")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    """The headers of ``up``'s own requests to the API server."""
    return {"Authorization": f"Bearer {token}"} if token else {}
