"""Capabilities as text: values, labels, the ``X-Capability-*`` codec and the query parser.

A request names the capability it wants by a *query*, ``{key: text}``. Every surface that
takes one (the HTTP routes, the KServe v2 REST routes, the gRPC ingress) builds it here, by
one rule, so the same headers, metadata and model name route alike everywhere:

- a key comes from a header or metadata key ``x-capability-<key>``, lowercased, ``-`` → ``_``;
- a repeated key counts by its last value; an empty value is a 400 (a typo'd value must not
  silently widen the match);
- ``stream`` is not an attribute but the route: it is accepted when it agrees with the route;
- keys the surface takes from elsewhere (the v2 model name and version) override headers.

What differs between surfaces is what they pass: the route's ``stream``, the ``path`` keys
the message when nothing was said and the routes to suggest (see :func:`finish_query`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from anyserve.errors import BadRequest

__all__ = [
    "HEADER_PREFIX",
    "add_query_key",
    "capability_text",
    "finish_query",
    "format_query",
    "header_name",
    "headers_for",
    "parse_capability",
    "query_from_metadata",
    "value_text",
]

#: The (lowercase) prefix of a capability header or gRPC metadata key.
HEADER_PREFIX = "x-capability-"

_WORD_BREAK = re.compile(r"[-_]")


def value_text(value: Any) -> str:
    """A capability value as the text it is compared by (``True`` → ``"true"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_query(query: Mapping[str, str]) -> str:
    """``{"type": "chat", "model": "demo"}`` → ``"type=chat model=demo"``."""
    return " ".join(f"{k}={v}" for k, v in query.items())


def capability_text(attrs: Mapping[str, Any], stream: bool = False) -> str:
    """How a capability is shown in messages and tables: ``type=chat model=demo``."""
    text = format_query({k: value_text(v) for k, v in attrs.items()})
    return f"{text} (stream)" if stream else text


def registration_label(capability: Any) -> str:
    """:func:`capability_text` of a capability in its registration form (``/registry``
    lists them so: attributes plus ``"stream": true``); anything else as ``str``."""
    if not isinstance(capability, Mapping):
        return str(capability)
    attrs = {k: v for k, v in capability.items() if k != "stream"}
    return capability_text(attrs, capability.get("stream") is True)


def parse_capability(capability: Mapping[str, Any] | str) -> dict[str, str]:
    """``{"type": "embed"}`` or ``"type=embed,model=x"`` → a text query."""
    if isinstance(capability, str):
        out: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in capability.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise BadRequest(f"capability {capability!r}: expected key=value[,key=value]")
            out[key.strip()] = value.strip()
        return out
    return {str(k): value_text(v) for k, v in capability.items()}


# --------------------------------------------------------------------------- the header codec


def header_name(key: str) -> str:
    """``max_tokens`` → ``X-Capability-Max-Tokens``; the parser maps it back to the key."""
    return "X-Capability-" + "-".join(w.capitalize() for w in _WORD_BREAK.split(key))


def headers_for(query: Mapping[str, Any]) -> dict[str, str]:
    """The ``X-Capability-*`` headers that ask for ``query``."""
    return {header_name(key): value_text(value) for key, value in query.items()}


def add_query_key(query: dict[str, str], suffix: str, value: str) -> None:
    """Add the header ``x-capability-<suffix>: value`` to ``query`` (the last one wins).

    ``suffix`` is the lowercase name after the prefix; a bare ``x-capability-`` is ignored.
    Callers scan their headers themselves (the HTTP routes read all routing headers in one
    pass) and hand each capability header here.
    """
    if not suffix:
        return
    value = value.strip()
    if not value:
        raise BadRequest(f"header {HEADER_PREFIX}{suffix} is empty; give the capability's value")
    query[suffix.replace("-", "_")] = value


def finish_query(
    query: dict[str, str],
    *,
    stream: bool,
    missing: str,
    path: Mapping[str, str] | None = None,
    routes: tuple[str, str] | None = None,
) -> dict[str, str]:
    """The query a request routes by, from the keys :func:`add_query_key` collected.

    The per-surface differences are these parameters: ``stream`` is whether the route
    streams; ``path`` holds keys the surface takes from outside the headers (they win over
    headers, and come first); ``missing`` is the 400 when no key was given at all;
    ``routes`` (unary, streaming) names the route to use when ``X-Capability-Stream``
    disagrees with this one.
    """
    said = query.pop("stream", None)
    if said is not None and said.lower() != ("true" if stream else "false"):
        hint = f"; use {routes[said.lower() == 'true']}" if routes else ""
        raise BadRequest(f"X-Capability-Stream: {said} does not fit this route{hint}")
    if path:
        query = {**path, **{k: v for k, v in query.items() if k not in path}}
    if not query:
        raise BadRequest(missing)
    return query


def query_from_metadata(
    metadata: Iterable[tuple[str, str]],
    *,
    stream: bool,
    missing: str,
    path: Mapping[str, str] | None = None,
    routes: tuple[str, str] | None = None,
) -> dict[str, str]:
    """:func:`finish_query` over the ``x-capability-*`` keys of ``(name, value)`` pairs
    (gRPC metadata: lowercase names)."""
    query: dict[str, str] = {}
    start = len(HEADER_PREFIX)
    for name, value in metadata:
        if name.startswith(HEADER_PREFIX):
            add_query_key(query, name[start:], value)
    return finish_query(query, stream=stream, missing=missing, path=path, routes=routes)
