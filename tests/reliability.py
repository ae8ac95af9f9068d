"""Helpers shared by the reliability tests (failover, backpressure, limits, auth)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from anyserve.client import sse_data
from anyserve.registry import Choice, Registry

from .conftest import ApiServer, Replica

REL_APP = "tests.apps.rel_app:app"


def text_body(text: str) -> dict[str, Any]:
    """The seed's JSON request with one BYTES input ``text``."""
    return {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [text]},
            }
        ]
    }


def output(body: dict[str, Any], name: str) -> Any:
    """The first value of output ``name`` of a JSON reply."""
    for out in body["outputs"]:
        if out["name"] == name:
            return next(iter(out["contents"].values()))[0]
    raise AssertionError(f"no output {name!r} in {body}")


def call(
    api: ApiServer, kind: str, tag: str = "x", timeout: float = 30, **headers: str
) -> httpx.Response:
    """``POST /infer/json`` to capability ``type=kind`` with input ``tag``."""
    return httpx.post(
        api.url + "/infer/json",
        json=text_body(tag),
        headers={"X-Capability-Type": kind, **headers},
        timeout=timeout,
    )


def events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE reply."""
    for data in sse_data(lines):
        yield json.loads(data)


def state(api: ApiServer, replica_id: str) -> str | None:
    """A replica's ``state`` in ``/registry`` (None when it is not listed)."""
    for entry in api.registry():
        if entry["replica_id"] == replica_id:
            return str(entry["state"])
    return None


@contextlib.contextmanager
def stopped(replica: Replica) -> Iterator[None]:
    """SIGSTOP the replica; SIGCONT it however the block ends."""
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(replica.proc.pid, signal.SIGCONT)


def release(tmp: Path, tag: str = "all") -> None:
    """Let held requests (``hold``) with ``tag`` (or all of them) finish."""
    (tmp / f"release-{tag}").write_text("go")


class FakeClock:
    """A clock that only moves when told to (for the registry's ``clock``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def registration(
    replica_id: str,
    port: int = 50051,
    kind: str = "chat",
    host: str = "127.0.0.1",
    **extra: Any,
) -> dict[str, Any]:
    """A ``/register`` body for one capability ``type=kind``."""
    return {
        "replica_id": replica_id,
        "endpoint": f"{host}:{port}",
        "capabilities": [{"type": kind}],
        "instance": f"i-{replica_id}",
        **extra,
    }


def take(
    registry: Registry, query: Mapping[str, str], stream: bool = False, exclude: Iterable[str] = ()
) -> Choice:
    """The request path's ``try_acquire``, for a test that expects a free slot: the choice,
    counted in flight."""
    choice = registry.try_acquire(query, stream, tuple(exclude))
    assert choice is not None, f"every replica serving {query} is at its limit"
    return choice


def pick(
    registry: Registry, query: Mapping[str, str], stream: bool = False, exclude: Iterable[str] = ()
) -> Choice:
    """Which replica the request path would choose, without keeping its slot."""
    choice = take(registry, query, stream, exclude)
    registry.release(choice)
    return choice
