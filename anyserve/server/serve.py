"""The API server process: start uvicorn, the background loops and the gRPC ingress."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

from anyserve.server.config import ApiServerConfig, parse_args
from anyserve.server.frontdoor import (
    LOG_FORMAT,
    create_app,
    fast_info,
    protocol_class,
    server_class,
)

log = logging.getLogger("anyserve.api_server")


def run(config: ApiServerConfig) -> None:
    """Serve until SIGINT/SIGTERM (the sync shell around uvicorn)."""
    import uvicorn

    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    fast_info.install(log)
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="auto",
        http=protocol_class(config.max_header_size),
        # The same head limit if uvicorn runs on h11 (no httptools): h11 enforces it itself.
        h11_max_incomplete_event_size=config.max_header_size,
        lifespan="on",
        access_log=False,  # RequestLog writes one line per request with its id
        # No X-Forwarded-For rewriting: nothing sits in front of the API server by default,
        # and the registration rate limit must key on the real peer, not on a header
        # any local client can set (uvicorn trusts it from 127.0.0.1).
        proxy_headers=False,
        # No "server: uvicorn" on every reply (the Date header stays: HTTP requires it).
        server_header=False,
        log_config=None,  # keep the logging set up above
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=max(1, math.ceil(config.shutdown_timeout)),
    )
    server = server_class()(uv_config)
    server.gateway = app.gateway
    log.info(
        "API server on http://%s:%d (lease %gs, heartbeat %gs, objects in %s; %s)",
        config.host,
        config.port,
        config.lease_ttl,
        config.heartbeat_interval,
        config.object_store,
        f"token required for {'every route' if config.auth == 'all' else 'registration and writes'}"
        if config.token
        else "no token: only replicas on this machine may register",
    )
    server.run()
    if not server.started:
        # uvicorn logged why (usually: the port is taken); exit non-zero for the supervisor.
        sys.exit(1)


def main(argv: Sequence[str] | None = None, prog: str = "python -m anyserve.api_server") -> None:
    """``python -m anyserve.api_server [--host H] [--port P] ...``."""
    run(parse_args(argv, prog))
