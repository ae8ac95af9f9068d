"""A trivial HTTP/1.1 server: every request gets a fixed ``200 ok``, keep-alive.

``python -m benchmarks.trivial PORT``. It does as little as a server can, so the load
generator pointed at it shows its own ceiling: the most requests per second the Python
client can make, whoever answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _Http(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = 0
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = _content_length(bytes(self.buffer[:end]))
            if len(self.buffer) < end + 4 + length:
                break  # the body is still coming
            del self.buffer[: end + 4 + length]
            replies += 1
        if replies and self.transport is not None:
            self.transport.write(_REPLY * replies)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(port))
        else:
            uvloop.run(serve(port))


if __name__ == "__main__":
    main()
