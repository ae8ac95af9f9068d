"""The API server's per-request shortcuts write and answer exactly what the long way did."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from anyserve import api_server
from anyserve.api_server import LOG_FORMAT, ApiServerConfig, FastInfo, create_app
from anyserve.errors import NotFound
from anyserve.registry import NoHealthyReplica, Registry


@contextlib.contextmanager
def only_handler() -> Iterator[logging.StreamHandler[io.StringIO]]:
    """The root logger as ``run()`` configures it, writing to a string (and, for the
    while, without pytest's capturing handlers)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_fast_info_lines_are_the_lines_logging_writes() -> None:
    log = logging.getLogger("anyserve.api_server")
    fast = FastInfo()
    with only_handler() as handler:
        fast.install(log)
        assert fast.handler is handler
        log.info("request abc POST /infer/json 200 1.0ms")
        fast.write("request abc POST /infer/json 200 1.0ms")
    slow, quick = handler.stream.getvalue().splitlines()
    # Same text but for the milliseconds of the time stamp.
    assert slow.split(" ", 2)[2] == quick.split(" ", 2)[2]
    assert slow[:19] == quick[:19] or slow[:16] == quick[:16]
    assert quick.endswith(" INFO anyserve.api_server: request abc POST /infer/json 200 1.0ms")


def test_fast_info_follows_the_level() -> None:
    fast = FastInfo()
    with only_handler() as handler:
        fast.install(api_server.log)
        assert fast.handler is handler
        logging.getLogger().setLevel(logging.WARNING)
        fast.write("request abc GET /objects 200 1.0ms")
    assert handler.stream.getvalue() == ""


def test_fast_info_stands_aside_for_other_logging_setups() -> None:
    fast = FastInfo()
    with only_handler() as handler:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        fast.install(api_server.log)
        assert fast.handler is None  # another format: lines go through logging
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(logging.NullHandler())
        fast.install(api_server.log)
        assert fast.handler is None  # more than one handler


class BrokenRegistry(Registry):
    """A registry with a bug in it, on the infer routes' way."""

    def candidates(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")


def call(registry: Registry, method: str, path: str, **kwargs: Any) -> httpx.Response:
    app = create_app(ApiServerConfig(), registry)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}


@pytest.mark.parametrize("path", ["/infer/json", "/infer/stream"])
def test_a_bug_on_an_infer_route_is_a_500_logged_once(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="anyserve.api_server"):
        reply = call(
            BrokenRegistry(),
            "POST",
            path,
            json=BODY,
            headers={"X-Request-ID": "bug-2", "X-Capability-Type": "echo"},
        )
    assert reply.status_code == 500
    assert reply.json() == {"detail": "internal error (request id bug-2)"}
    assert reply.headers["X-Request-ID"] == "bug-2"
    [record] = [r for r in caplog.records if r.exc_info]
    assert "bug-2" in record.getMessage() and "[type=echo]" in record.getMessage()


def test_infer_routes_answer_errors_as_before() -> None:
    # Known errors are answered, in JSON, with the request id; other methods still 405.
    reply = call(Registry(), "POST", "/infer/json", json=BODY, headers={"X-Request-ID": "r-1"})
    assert reply.status_code == 400 and "X-Capability-" in reply.json()["detail"]
    assert reply.headers["X-Request-ID"] == "r-1"
    # A body is read once a replica is admitted (never called here: the body is refused).
    serving = Registry()
    serving.register(
        {"replica_id": "r", "endpoint": "127.0.0.1:1", "capabilities": [{"type": "a"}]}
    )
    reply = call(serving, "POST", "/infer", content=b"\xff", headers={"X-Capability-Type": "a"})
    assert reply.status_code == 400 and "ModelInferRequest" in reply.json()["detail"]
    assert serving.snapshot()[0]["in_flight"] == 0  # the refused body gave its slot back
    reply = call(Registry(), "POST", "/infer/json", json=BODY, headers={"X-Capability-Type": "a"})
    assert reply.status_code == 404 and "no replica serves type=a" in reply.json()["detail"]
    reply = call(Registry(), "GET", "/infer/json")
    assert reply.status_code == 405
    assert reply.headers["X-Request-ID"]


def test_try_acquire_is_acquire_with_none_for_saturated() -> None:
    registry = Registry()
    registry.register(
        {
            "replica_id": "r",
            "endpoint": "127.0.0.1:1",
            "capabilities": [{"type": "a"}],
            "max_in_flight": 1,
        }
    )
    first = registry.try_acquire({"type": "a"})
    assert first is not None and first.replica_id == "r"
    assert registry.try_acquire({"type": "a"}) is None  # at its limit: the caller waits
    with pytest.raises(NotFound):
        registry.try_acquire({"type": "b"})
    registry.finish(first, 1.0, True)
    registry.set_health(first.record, False, "no answer")
    with pytest.raises(NoHealthyReplica):  # not a wait: nothing usable would free up
        registry.try_acquire({"type": "a"})
