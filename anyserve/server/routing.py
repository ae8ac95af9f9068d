"""Per-request routing: the capability query, deadline and delegation trail of a request."""

from __future__ import annotations

import itertools
import math
import re
import secrets
from collections.abc import (
    Iterable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass
from typing import Any, Protocol

from anyserve.capability import HEADER_PREFIX, add_query_key, finish_query, format_query
from anyserve.defaults import MAX_DELEGATION_DEPTH
from anyserve.errors import (
    BadRequest,
    DelegationLoop,
)
from anyserve.registry import Choice


class Request(Protocol):
    """What routing reads of an HTTP request: its ASGI scope (Starlette's ``Request`` is
    one; routing imports no web framework, so the gateway below it does not either)."""

    @property
    def scope(self) -> MutableMapping[str, Any]: ...


_CAPABILITY_PREFIX_LEN = len(HEADER_PREFIX)
_NO_CAPABILITY = (
    "no X-Capability-* header: say which capability to call, e.g. -H 'X-Capability-Type: chat'"
)
# The routes to suggest when X-Capability-Stream disagrees with the route: (unary, stream).
_ROUTES = ("/infer/json or /infer", "/infer/stream")


# --------------------------------------------------------------------------- per-request routing


@dataclass
class Routing:
    """What the headers of one infer request say about where it may go."""

    query: dict[str, str]
    request_id: str
    timeout: float
    visited: list[str]
    depth: int
    #: Whether the client set the timeout (X-Request-Timeout): only then does a stream have
    #: a deadline; otherwise it runs as long as it keeps sending (see the idle timeout).
    timeout_given: bool = False

    @classmethod
    def from_request(
        cls, request: Request, default_timeout: float, stream: bool = False
    ) -> Routing:
        """Parse the ``X-Capability-*``, delegation and timeout headers; 400/508 when wrong."""
        scope = request.scope
        return cls.from_headers(
            scope["headers"], scope["state"]["request_id"], default_timeout, stream
        )

    @classmethod
    def from_headers(
        cls,
        headers: Iterable[tuple[bytes, bytes]],
        request_id: str,
        default_timeout: float,
        stream: bool = False,
        path: Mapping[str, str] | None = None,
    ) -> Routing:
        """:meth:`from_request` from the raw ASGI headers (lowercase names), in one pass.

        Starlette's ``request.headers`` would decode every header for the capability scan
        and scan again for each of the three others; this reads the raw pairs once. The
        query follows :mod:`anyserve.capability` (``path``: keys the route's path gives,
        as on the v2 REST routes); the other headers count by their first value.
        """
        query: dict[str, str] = {}
        raw_timeout = raw_visited = raw_depth = None
        for name, raw in headers:
            if not name.startswith(b"x-"):
                continue
            if name.startswith(b"x-capability-"):
                add_query_key(
                    query, name[_CAPABILITY_PREFIX_LEN:].decode("latin-1"), raw.decode("latin-1")
                )
            elif name == b"x-request-timeout":
                if raw_timeout is None:
                    raw_timeout = raw.decode("latin-1")
            elif name == b"x-delegated-from":
                if raw_visited is None:
                    raw_visited = raw.decode("latin-1")
            elif name == b"x-delegation-depth" and raw_depth is None:
                raw_depth = raw.decode("latin-1")
        query = finish_query(
            query, stream=stream, missing=_NO_CAPABILITY, path=path, routes=_ROUTES
        )
        timeout = default_timeout
        if raw_timeout is not None:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and timeout > 0):
                raise BadRequest(
                    f"X-Request-Timeout must be a positive number of seconds, not {raw_timeout!r}"
                )
        visited: list[str] = []
        if raw_visited:
            visited = [v for v in (v.strip() for v in raw_visited.split(",")) if v]
            if any(not (v.isascii() and v.isprintable()) for v in visited):
                raise BadRequest("X-Delegated-From must be a comma-separated list of replica ids")
        depth = 0
        if raw_depth is not None:
            raw_depth = raw_depth.strip() or "0"
            # isascii: str.isdigit() also accepts "²", which int() then refuses (a 500).
            if not (raw_depth.isascii() and raw_depth.isdigit() and len(raw_depth) < 10):
                raise BadRequest(f"X-Delegation-Depth must be a whole number, not {raw_depth!r}")
            depth = int(raw_depth)
        if depth > MAX_DELEGATION_DEPTH:
            trail = f" (visited: {', '.join(visited)})" if visited else ""
            raise DelegationLoop(
                f"request for {format_query(query)} was delegated {depth} times, past the "
                f"limit of {MAX_DELEGATION_DEPTH}{trail}: replicas keep forwarding a request "
                "none of them serves; check the capabilities in /registry"
            )
        return cls(
            query=query,
            request_id=request_id,
            timeout=timeout,
            visited=visited,
            depth=depth,
            timeout_given=raw_timeout is not None,
        )

    def metadata(
        self, choice: Choice, auth: tuple[tuple[str, str], ...] = ()
    ) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata of docs/protocol.md for a call to ``choice``, plus ``auth``
        (the API server's own credentials for the replica, when it has a token)."""
        items = [
            *auth,
            ("x-request-id", self.request_id),
            ("anyserve-capability", choice.capability.metadata),
            ("x-delegation-depth", str(self.depth)),
        ]
        if self.visited:
            items.append(("x-delegated-from", ",".join(self.visited)))
        return tuple(items)


def routing_headers(choice: Choice) -> dict[str, str]:
    """Reply headers that say which replica answered and what the alternatives were."""
    return {
        "X-AnyServe-Replica": choice.replica_id,
        "X-AnyServe-Candidates": candidates_text(choice),
    }


def candidates_text(choice: Choice) -> str:
    return ",".join(f"{rid}={n}" for rid, n in choice.candidates)


def note(request: Request, routing: Routing, choice: Choice | None = None) -> None:
    """Record what the request-log line should say about routing (the query's text is
    made once, the first time: a route notes before and after choosing a replica)."""
    state = request.scope["state"]
    if "capability" not in state:
        state["capability"] = format_query(routing.query)
    if choice is not None:
        state["replica"] = choice.replica_id


# --------------------------------------------------------------------------- request ids

#: A client's ``X-Request-ID`` (HTTP header or gRPC metadata) is kept when it matches this;
#: otherwise the request gets a fresh id. The characters are safe in a log line and a header.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class RequestIds:
    """Request ids for requests that came without one: ``<prefix><counter>`` in hex.

    The prefix is 8 random hex digits drawn once per process, the counter counts from a
    random start; ids are unique within a process (the counter only grows, past 8 digits
    if need be) and, with near certainty, across processes and restarts. They name log
    lines, not secrets: ids of one process are sequential, and whoever sees one can
    guess its neighbours. ``secrets.token_hex`` per request cost a ``getrandom`` system
    call each (2 % of the API server's CPU at concurrency 16).
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = itertools.count(secrets.randbelow(1 << 28)).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():08x}"


#: A fresh request id (for a request that came without a valid one).
new_request_id = RequestIds()


def request_id_for(given: str | None) -> str:
    """The id of a request that says ``given`` (None: said nothing): it, or a fresh one."""
    if given is not None:
        given = given.strip()
        if REQUEST_ID.fullmatch(given):
            return given
    return new_request_id()
