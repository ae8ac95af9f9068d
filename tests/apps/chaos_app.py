"""The app of the chaos scenarios: quick work, long streams, and a count of live streams.

Every handler is ``async`` so that hundreds of concurrent requests cost no threads; what
the scenarios measure is then the servers, not a handler's thread pool.
"""

from __future__ import annotations

import asyncio

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import input_text, make_response, stream_chunk

app = AnyServe(name="chaos")

#: Stream handlers running right now (R5 waits for it to fall back to 0).
ACTIVE = 0


def _numbers(request: ModelInferRequest, defaults: tuple[float, ...]) -> list[float]:
    """The input text as comma-separated numbers, missing ones taken from ``defaults``."""
    given = [float(x) for x in (input_text(request) or "").split(",") if x.strip()]
    return given + list(defaults[len(given) :])


@app.capability(type="work")
async def work(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Take ``text`` milliseconds (default 2), then answer with the replica id."""
    (millis,) = _numbers(request, (2.0,))
    await asyncio.sleep(millis / 1000)
    return make_response(request, replica=context.replica_id)


@app.capability(type="tokens", stream=True)
async def tokens(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Send ``count`` tokens (default 1000) ``interval`` ms apart (default 50), each naming
    the replica: ``text`` is ``"interval,count"``."""
    global ACTIVE
    interval, count = _numbers(request, (50.0, 1000.0))
    ACTIVE += 1
    try:
        for i in range(int(count)):
            stream.send(stream_chunk(request, f"{context.replica_id}:{i}"))
            await asyncio.sleep(interval / 1000)
    finally:
        ACTIVE -= 1


@app.capability(type="active")
async def active(request: ModelInferRequest) -> ModelInferResponse:
    """How many ``tokens`` handlers are running."""
    return make_response(request, active=str(ACTIVE))
