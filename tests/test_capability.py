"""One capability query rule on every surface, driven side by side.

Each case is given once, as header pairs; it is fed to the HTTP routes' parser, the KServe v2
REST routes' parser (the path's name/version as ``path``) and the gRPC ingress's (the same
pairs as metadata, the name/version as ``model_name``/``model_version``). The only
differences left are the surfaces' parameters: the v2 path's keys, and the route's
streaming-ness.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from anyserve.api_server import Routing
from anyserve.capability import (
    capability_text,
    format_query,
    header_name,
    headers_for,
    parse_capability,
    value_text,
)
from anyserve.credentials import bearer
from anyserve.errors import BadRequest
from anyserve.ingress import grpc_query
from anyserve.server.routing import REQUEST_ID, request_id_for

Pairs = list[tuple[str, str]]
Surface = Callable[[Pairs, str, str, bool], dict[str, str]]


def http(pairs: Pairs, name: str, version: str, stream: bool) -> dict[str, str]:
    # The seed routes have no path keys: the name/version are headers there.
    extra = [("x-capability-type", name)] if name else []
    extra += [("x-capability-model", version)] if version else []
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in [*extra, *pairs]]
    return Routing.from_headers(raw, "rid", 5.0, stream).query


def v2_rest(pairs: Pairs, name: str, version: str, stream: bool) -> dict[str, str]:
    path = {"type": name, "model": version} if version else {"type": name}
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    return Routing.from_headers(raw, "rid", 5.0, stream, path=path).query


def grpc(pairs: Pairs, name: str, version: str, stream: bool) -> dict[str, str]:
    # gRPC metadata reaches the ingress as a dict: a repeated key keeps its last value.
    return grpc_query(name, version, dict(pairs), stream)


SURFACES: Mapping[str, Surface] = {"http": http, "v2_rest": v2_rest, "grpc": grpc}

# (headers, model name, version, stream) -> the query every surface must build.
SAME: list[tuple[Pairs, str, str, bool, dict[str, str]]] = [
    ([], "chat", "", False, {"type": "chat"}),
    ([], "chat", "demo", False, {"type": "chat", "model": "demo"}),
    ([("x-capability-max-tokens", " 5 ")], "chat", "", False, {"type": "chat", "max_tokens": "5"}),
    ([("x-capability-model", "demo")], "chat", "", False, {"type": "chat", "model": "demo"}),
    # A repeated key counts by its last value.
    ([("x-capability-gpus", "1"), ("x-capability-gpus", "2")], "chat", "", False,
     {"type": "chat", "gpus": "2"}),
    # A bare prefix names no key.
    ([("x-capability-", "x")], "chat", "", False, {"type": "chat"}),
    # `stream` is the route, not a key: accepted when it agrees.
    ([("x-capability-stream", "true")], "chat", "", True, {"type": "chat"}),
    ([("x-capability-stream", "False")], "chat", "", False, {"type": "chat"}),
    # Headers that are not capability keys do not count.
    ([("x-request-id", "abc"), ("content-type", "application/json")], "chat", "", False,
     {"type": "chat"}),
]  # fmt: skip


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(("pairs", "name", "version", "stream", "expected"), SAME)
def test_the_same_request_gives_the_same_query_on_every_surface(
    surface: str, pairs: Pairs, name: str, version: str, stream: bool, expected: dict[str, str]
) -> None:
    query = SURFACES[surface](pairs, name, version, stream)
    assert query == expected
    assert list(query) == list(expected)  # the order shown in logs and errors, too


BAD: list[tuple[Pairs, str, bool, str]] = [
    ([("x-capability-gpus", "  ")], "chat", False, "x-capability-gpus is empty"),
    ([("x-capability-stream", "true")], "chat", False, "does not fit this route"),
    ([("x-capability-stream", "false")], "chat", True, "does not fit this route"),
]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(("pairs", "name", "stream", "message"), BAD)
def test_the_same_mistake_is_a_400_on_every_surface(
    surface: str, pairs: Pairs, name: str, stream: bool, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        SURFACES[surface](pairs, name, "", stream)


def test_the_path_wins_over_headers_where_a_surface_has_a_path() -> None:
    pairs = [("x-capability-type", "other"), ("x-capability-model", "old")]
    # The seed routes have no path: the headers are all there is.
    raw = [(k.encode(), v.encode()) for k, v in pairs]
    assert Routing.from_headers(raw, "rid", 5.0).query == {"type": "other", "model": "old"}
    for surface in (v2_rest, grpc):
        assert surface(pairs, "chat", "demo", False) == {"type": "chat", "model": "demo"}
        assert surface(pairs, "chat", "", False) == {"type": "chat", "model": "old"}


def test_nothing_said_is_a_400_that_names_the_surface_s_way_to_say_it() -> None:
    with pytest.raises(BadRequest, match="X-Capability-Type"):
        Routing.from_headers([], "rid", 5.0)
    with pytest.raises(BadRequest, match="model_name"):
        grpc_query("", "", {})


def test_a_disagreeing_stream_key_names_the_route_to_use() -> None:
    with pytest.raises(BadRequest, match="use /infer/stream"):
        Routing.from_headers([(b"x-capability-stream", b"true")], "rid", 5.0)
    with pytest.raises(BadRequest, match="use ModelStreamInfer"):
        grpc_query("chat", "", {"x-capability-stream": "true"})


def test_header_codec_round_trips_through_the_parser() -> None:
    query = {"type": "chat", "max_tokens": "5", "gpu_count": "2"}
    headers = headers_for(query)
    assert header_name("max_tokens") == "X-Capability-Max-Tokens"
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    assert Routing.from_headers(raw, "rid", 5.0).query == query


def test_values_and_labels_as_text() -> None:
    assert value_text(True) == "true" and value_text(2) == "2"
    assert format_query({"type": "chat", "model": "demo"}) == "type=chat model=demo"
    assert capability_text({"type": "chat", "fast": False}, stream=True) == (
        "type=chat fast=false (stream)"
    )
    assert parse_capability("type=embed, model=x") == {"type": "embed", "model": "x"}
    assert parse_capability({"gpus": 2}) == {"gpus": "2"}


# The other per-request rules the HTTP and gRPC surfaces share.


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123", True), ("  trace:9/x=1  ", True), ("has space", False), ("", False),
     ("é", False), ("x" * 128, True), ("x" * 129, False), (None, False)],
)  # fmt: skip
def test_a_request_id_is_kept_or_replaced_by_one_rule(given: str | None, kept: bool) -> None:
    got = request_id_for(given)
    if kept:
        assert given is not None and got == given.strip()
    else:
        assert got != given and REQUEST_ID.fullmatch(got)


def test_fresh_request_ids_are_unique() -> None:
    assert len({request_id_for(None) for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("header", "token"),
    [(b"Bearer t0k", b"t0k"), (b"bearer   t0k ", b"t0k"), (b"Basic t0k", None), (b"Bearer", None),
     (b"", None), (None, None)],
)  # fmt: skip
def test_one_bearer_parser(header: bytes | None, token: bytes | None) -> None:
    assert bearer(header) == token
