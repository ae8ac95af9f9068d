"""Load for the chaos scenarios: a small HTTP/1.1 client on raw asyncio streams.

A general client (httpx) costs about a millisecond of CPU per request; on a two-core
machine that shares the cores with the servers under test, that cost would be measured
as their latency. This one parses just what the API server sends (``Content-Length`` or
chunked bodies), keeps one connection per simulated client and hides nothing: no pool
limits, no retries. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any


def infer_body(text: str = "") -> bytes:
    """The seed's JSON request with one BYTES input ``text`` (the chaos app reads it)."""
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "contents": {"bytes_contents": [text]},
                }
            ]
        }
    ).encode()


@dataclass(frozen=True)
class Reply:
    """One answer: status, lower-cased headers, body, and seconds from send to last byte."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)

    def output(self, name: str) -> str:
        """The first value of the JSON reply's output ``name`` (as text)."""
        for out in self.json()["outputs"]:
            if out["name"] == name:
                return str(next(iter(out["contents"].values()))[0])
        raise AssertionError(f"no output {name!r} in {self.body[:300]!r}")


class Conn:
    """One keep-alive HTTP/1.1 connection to ``127.0.0.1:port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.reused = False
        else:
            self.reused = True
        return self._reader, self._writer

    reused = False
    """Whether the last request went out on a connection that had served one before."""

    async def send(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> tuple[asyncio.StreamReader, int, dict[str, str]]:
        """Send a request; return the reader positioned at the body, status and headers."""
        reader, writer = await self._open()
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        self._before_reply = False
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ConnectionError(f"not an HTTP reply: {status_line!r}")
        found: dict[str, str] = {}
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            found[name.strip().lower()] = value.strip()
        return reader, int(parts[1]), found

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> Reply:
        """Send a request and read the whole reply.

        A kept-alive connection the server closed while it was idle fails before a single
        byte of the reply; like any HTTP client, send again once on a new connection then.
        """
        try:
            return await self._request(method, path, body, headers)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            stale = not isinstance(exc, asyncio.IncompleteReadError) or exc.partial == b""
            if not (self.reused and stale and self._before_reply):
                raise
        return await self._request(method, path, body, headers)

    _before_reply = False

    async def _request(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None
    ) -> Reply:
        started = time.monotonic()
        self._before_reply = True
        try:
            reader, status, found = await self.send(method, path, body, headers)
            if "content-length" in found:
                data = await reader.readexactly(int(found["content-length"]))
            elif found.get("transfer-encoding") == "chunked":
                data = b"".join([chunk async for chunk in _chunks(reader)])
            else:
                data = await reader.read()
                self.close()
            if found.get("connection", "").lower() == "close":
                self.close()
        except BaseException:
            self.close()  # the next request starts on a fresh connection
            raise
        return Reply(status, found, data, time.monotonic() - started)

    async def events(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request and yield each SSE ``data:`` event as JSON."""
        reader, status, found = await self.send("POST", path, body, headers)
        if status != 200:
            raise ConnectionError(f"stream answered {status}")
        buffer = b""
        chunks = (
            _chunks(reader) if found.get("transfer-encoding") == "chunked" else _until_eof(reader)
        )
        async for chunk in chunks:
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        yield json.loads(line[5:])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def abort(self) -> None:
        """Drop the connection at once (RST), as a client that vanishes would."""
        if self._writer is not None:
            self._writer.transport.abort()
        self._reader = self._writer = None


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while chunk := await reader.read(65536):
        yield chunk


@dataclass
class Tally:
    """What a load run saw: answers by status, failures by reason, latencies by status."""

    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    answers: list[tuple[float, Reply]] = field(default_factory=list)
    keep_answers: bool = False

    def add(self, reply: Reply) -> None:
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
        self.latencies.setdefault(reply.status, []).append(reply.elapsed)
        if self.keep_answers:
            self.answers.append((time.monotonic(), reply))

    def fail(self, why: str) -> None:
        self.failures.append(why)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.failures)

    @property
    def not_ok(self) -> int:
        """Requests that got no answer or an answer other than 200."""
        return len(self.failures) + sum(n for s, n in self.statuses.items() if s != 200)

    def count(self, *statuses: int) -> int:
        return sum(self.statuses.get(s, 0) for s in statuses)

    def all_latencies(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def closed_loop(
    port: int,
    clients: int,
    seconds: float,
    headers: Mapping[str, str],
    body: bytes,
    tally: Tally,
    *,
    timeout: float = 30.0,
    path: str = "/infer/json",
) -> None:
    """``clients`` connections sending requests back to back for ``seconds``."""
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        conn = Conn(port)
        try:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    reply = await asyncio.wait_for(
                        conn.request("POST", path, body, headers), timeout
                    )
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                    waited = time.monotonic() - started
                    tally.fail(f"{type(exc).__name__} after {waited:.2f}s: {exc}")
                    await asyncio.sleep(0.01)
                    continue
                tally.add(reply)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))


async def open_loop(
    port: int,
    rate: float,
    seconds: float,
    headers: Mapping[str, str],
    body: bytes,
    tally: Tally,
    *,
    timeout: float = 30.0,
) -> None:
    """Requests arriving at ``rate`` a second for ``seconds``, whatever the answers take.

    Each arrival takes an idle connection (or opens one), so a slow server does not slow
    the offered load down, as real independent users would not.
    """
    idle: list[Conn] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        conn = idle.pop() if idle else Conn(port)
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(
                conn.request("POST", "/infer/json", body, headers), timeout
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            tally.fail(f"{type(exc).__name__} after {time.monotonic() - started:.2f}s: {exc}")
            conn.close()
            return
        tally.add(reply)
        idle.append(conn)

    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) < start + seconds:
        due = int((now - start) * rate) + 1
        for _ in range(due - sent):
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent = due
        await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    if tasks:
        await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    with contextlib.suppress(Exception):
        await asyncio.sleep(0)
