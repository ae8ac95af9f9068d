"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

httpx costs more CPU per request than the API server under test, so the generator would
measure itself. This client sends a request prepared once as bytes and reads the reply
with ``Content-Length`` or chunked framing; nothing more (no redirects, no TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping


class HttpError(Exception):
    """A reply that is not a 2xx, or a broken connection."""


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The full request (head and body) as bytes, to be sent as is, again and again."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def _head(self) -> tuple[int, dict[bytes, bytes]]:
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise HttpError(f"connection lost before the reply: {exc!r}") from None
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _send(self, request: bytes) -> None:
        self.writer.write(request)
        if len(request) > 65536:
            await self.writer.drain()

    async def request(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request``; return the status and the whole body."""
        await self._send(request)
        status, headers = await self._head()
        length = headers.get(b"content-length")
        if length is not None:  # the common case, without the generator below
            try:
                return status, await self.reader.readexactly(int(length))
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise HttpError(f"connection lost inside the body: {exc!r}") from None
        chunks = [chunk async for chunk in self._body(headers)]
        return status, b"".join(chunks)

    async def stream(self, request: bytes) -> AsyncIterator[bytes]:
        """Send ``request``; yield the body as it arrives (chunk by chunk). Raises on non-2xx."""
        await self._send(request)
        status, headers = await self._head()
        if not 200 <= status < 300:
            body = b"".join([chunk async for chunk in self._body(headers)])
            raise HttpError(f"status {status}: {body[:300]!r}")
        async for chunk in self._body(headers):
            yield chunk

    async def _body(self, headers: dict[bytes, bytes]) -> AsyncIterator[bytes]:
        reader = self.reader
        try:
            if b"content-length" in headers:
                left = int(headers[b"content-length"])
                while left > 0:
                    chunk = await reader.read(min(left, 1 << 20))
                    if not chunk:
                        raise HttpError("connection closed inside the body")
                    left -= len(chunk)
                    yield chunk
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        return
                    data = await reader.readexactly(size + 2)
                    yield data[:-2]
            else:
                raise HttpError("reply without Content-Length or chunked framing")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise HttpError(f"connection lost inside the body: {exc!r}") from None
