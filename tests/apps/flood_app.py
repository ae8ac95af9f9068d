"""Handlers that answer more than a client may read (the API server's write timeout
tests), and one that says how much it was sent (its request head limit tests)."""

from __future__ import annotations

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import input_text, make_response, stream_chunk

app = AnyServe(name="flood")

#: One chunk's text (~64 KiB), and how many a stream sends unless told: enough to fill
#: any socket buffers many times over, yet a stream nobody stops ends by itself.
CHUNK = "x" * (64 * 1024)
CHUNKS = 2000


def _number(request: ModelInferRequest, default: int) -> int:
    text = input_text(request)
    return int(text) if text.isdigit() else default


@app.capability(type="flood", stream=True)
def flood(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Send as many chunks of :data:`CHUNK` as the input says (:data:`CHUNKS`), fast."""
    count = max(1, _number(request, CHUNKS))
    for _ in range(count - 1):
        stream.send(stream_chunk(request, CHUNK))
    stream.send(stream_chunk(request, CHUNK, finish_reason="stop"))


@app.capability(type="big")
def big(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """A reply of as many bytes of text as the input says (8 MiB)."""
    return make_response(request, text="y" * _number(request, 8 * 1024 * 1024))


@app.capability(type="count")
def count(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """The length of the input text."""
    return make_response(request, length=[len(input_text(request))])
