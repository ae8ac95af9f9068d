"""The API server: registry, capability routing, JSON/SSE ⇄ gRPC, objects over HTTP.

The process lives in :mod:`anyserve.server`, in layers (see docs/architecture.md); this
module keeps the names callers have always imported from here, and the entry point.

Run it with ``python -m anyserve.api_server --port 8080`` or ``anyserve api-server``.
"""

from __future__ import annotations

import logging

from anyserve.server.auth import Guard
from anyserve.server.config import ApiServerConfig, parse_args, parse_size
from anyserve.server.frontdoor import LOG_FORMAT, FastInfo, create_app
from anyserve.server.gateway import Gateway
from anyserve.server.replies import error_response
from anyserve.server.routes import ROUTES
from anyserve.server.routing import Routing
from anyserve.server.serve import main, run

__all__ = [
    "LOG_FORMAT",
    "ROUTES",
    "ApiServerConfig",
    "FastInfo",
    "Gateway",
    "Guard",
    "Routing",
    "create_app",
    "error_response",
    "log",
    "main",
    "parse_args",
    "parse_size",
    "run",
]

#: The request log and the server's messages (every anyserve.server module logs here).
log = logging.getLogger("anyserve.api_server")

if __name__ == "__main__":
    main()
