"""The API server's configuration: one frozen :class:`ApiServerConfig` and its command line."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from anyserve import units
from anyserve.defaults import (
    AUTH_MODE,
    AUTH_MODES,
    MAX_BODY_SIZE,
    OBJECT_STORE_PATH,
)
from anyserve.registry import MAX_QUEUE

#: A request head (request line and headers) must arrive within this many seconds of the
#: connection or the first byte of the request; a client that trickles it (slowloris) is
#: disconnected. 10 s is far beyond any real client and frees a held connection soon.
HEADER_TIMEOUT = 10.0
#: A request body may pause this long between two reads before the connection is closed
#: (nginx's client_body_timeout idea; half its default, as bodies here come from programs).
BODY_TIMEOUT = 30.0
#: A connection whose replies the client has not taken for this long (the server's writes
#: stay paused: its socket buffers are full) is cut off, so that a reader that stopped
#: reading cannot hold a replica slot or buffered replies. Like BODY_TIMEOUT, a pause no
#: working client makes, short enough to free the slot soon.
WRITE_TIMEOUT = 30.0
#: Largest request head (request line and headers) in bytes, and most header fields: 431
#: past either. 64 KiB is the scale of nginx's large_client_header_buffers (4 x 8k) with
#: room for long bearer tokens; 100 fields is uvicorn/h11's and Go's order of magnitude
#: and far past what any client sends.
MAX_HEADER_SIZE = 64 * 1024
MAX_HEADERS = 100
#: A stream that sends nothing for this long is ended with an error event and cancelled
#: (nginx's proxy_read_timeout default): a generation that stalls a minute is stuck.
STREAM_IDLE_TIMEOUT = 60.0
#: Requests waiting for a replica slot give up after this long (503 with Retry-After): past
#: a few seconds a client is better told to come back than kept waiting.
QUEUE_TIMEOUT = 5.0
#: Registrations per client address: a token bucket refilled at this rate, with this burst.
#: A replica registers once and then heartbeats, so 20/s (40 at once) is ample even for
#: `anyserve up` starting many replicas on one host, and bounds what a flood can do.
REGISTER_RATE = 20.0
REGISTER_BURST = 40


@dataclass(frozen=True)
class ApiServerConfig:
    """Everything the API server process needs (from the CLI or the supervisor)."""

    host: str = "127.0.0.1"
    port: int = 8080
    lease_ttl: float = 8.0
    heartbeat_interval: float = 2.0
    object_store: Path = Path(OBJECT_STORE_PATH)
    request_timeout: float = 60.0
    log_level: str = "info"
    #: Largest object accepted by ``POST /objects`` (bytes).
    max_object_size: int = 1024**3
    #: On shutdown, open streams are ended at once; other requests get this long to finish.
    shutdown_timeout: float = 5.0
    #: Also serve the KServe v2 gRPC service on this port (anyserve.ingress); None: off.
    grpc_port: int | None = None
    #: Largest request body of the infer routes (bytes); gRPC messages follow it.
    max_body_size: int = MAX_BODY_SIZE
    #: Requests that may wait for a free replica, per capability asked for.
    max_queue: int = MAX_QUEUE
    #: Seconds a request may wait for a free replica before a 503.
    queue_timeout: float = QUEUE_TIMEOUT
    #: Seconds a stream may go without a message before it is ended.
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    #: Seconds for a request head to arrive; seconds a request body may pause.
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    #: Seconds a client may leave the replies unread (writes paused) before it is cut off.
    write_timeout: float = WRITE_TIMEOUT
    #: Largest request head in bytes (431 past it).
    max_header_size: int = MAX_HEADER_SIZE
    #: The bearer token registration and object writes require (all routes with
    #: ``auth="all"``); None: no token, and only replicas on this machine may register.
    token: str | None = field(default_factory=lambda: os.environ.get("ANYSERVE_TOKEN") or None)
    #: ``"writes"``: the token guards registration and object writes; ``"all"``: every route.
    auth: str = AUTH_MODE
    #: Most replicas registered at once.
    max_replicas: int = 1024
    #: Registrations a second per client address, and the burst allowed.
    register_rate: float = REGISTER_RATE
    register_burst: int = REGISTER_BURST

    def to_argv(self, with_token: bool = True) -> list[str]:
        """The command line :func:`parse_args` reads back as this configuration.

        A process started with it should rather get the token from ``ANYSERVE_TOKEN``
        (``with_token=False``): a command line is visible to other users.
        """
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "token" and not with_token):
                continue  # None is every optional field's default: no flag says it
            # repr: a float comes back bit for bit (str would too, but says so less plainly).
            text = repr(value) if isinstance(value, float) else str(value)
            argv += ["--" + f.name.replace("_", "-"), text]
        return argv


def parse_size(text: str) -> int:
    """:func:`anyserve.units.parse_size` for argparse."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number: {text!r}")
    return value


def parse_args(
    argv: Sequence[str] | None = None, prog: str = "python -m anyserve.api_server"
) -> ApiServerConfig:
    """The command line of ``python -m anyserve.api_server`` (and ``anyserve api-server``)."""
    defaults = ApiServerConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="AnyServe API server: registry, capability routing, objects over HTTP.",
    )
    for flag, kind, help_text in (
        ("--host", str, "address to bind"),
        ("--port", int, "HTTP port"),
        ("--lease-ttl", _positive, "seconds without a heartbeat before a replica is evicted"),
        ("--heartbeat-interval", _positive, "seconds between heartbeats, told to replicas"),
        ("--object-store", Path, "object store directory served at /objects"),
        ("--request-timeout", _positive, "default unary deadline (X-Request-Timeout)"),
        ("--max-object-size", parse_size, "largest upload to POST /objects, e.g. 500M, 2G"),
        ("--max-body-size", parse_size, "largest request body of the other routes (413)"),
        ("--max-queue", _whole, "requests that may wait for a busy capability"),
        ("--queue-timeout", _positive, "seconds a request may wait for a free replica"),
        ("--stream-idle-timeout", _positive, "seconds a stream may send nothing"),
        ("--header-timeout", _positive, "seconds for a request head to arrive"),
        ("--body-timeout", _positive, "seconds a request body may pause"),
        ("--write-timeout", _positive, "seconds a client may leave replies unread"),
        ("--max-header-size", parse_size, "largest request head, e.g. 64k (431)"),
        ("--max-replicas", _whole, "replicas the registry holds at most"),
        ("--shutdown-timeout", _positive, "seconds requests get to finish on shutdown"),
        ("--register-rate", _positive, "registrations a second per client address"),
        ("--register-burst", _whole, "registrations at once per client address"),
    ):
        default = getattr(defaults, flag[2:].replace("-", "_"))
        parser.add_argument(flag, type=kind, default=default, help=f"{help_text} ({default})")
    parser.add_argument(
        "--token",
        default=defaults.token,
        help="bearer token for registration and object writes (default: $ANYSERVE_TOKEN; "
        "prefer the variable: a command line is visible to other users)",
    )
    parser.add_argument(
        "--auth",
        default=defaults.auth,
        choices=list(AUTH_MODES),
        help="what the token guards: registration and object writes, or every route",
    )
    parser.add_argument(
        "--log-level", default=defaults.log_level, choices=list(_LOG_LEVELS), help="verbosity"
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve KServe v2 gRPC (GRPCInferenceService) on this port (off)",
    )
    return ApiServerConfig(**vars(parser.parse_args(argv)))


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
