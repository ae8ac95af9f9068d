"""Handlers for the reliability tests: held requests, stalls, a blocked event loop, tickers.

Handlers report to the test through files in ``$ANYSERVE_TEST_DIR`` (they run in another
process), named by the request's input ``text`` (the "tag"). A held request waits until the
file ``release-<tag>`` (or ``release-all``) exists, so that a test decides when a replica
slot frees without sleeping.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import input_text, make_response, stream_chunk
from tests.apps.slow_stream import tick_until_cancelled

app = AnyServe(name="reliability")

# Handlers never wait longer than this for the test to release them.
PATIENCE = 30.0


def _dir() -> Path:
    return Path(os.environ.get("ANYSERVE_TEST_DIR", "."))


def _tag(request: ModelInferRequest) -> str:
    return input_text(request) or "untagged"


def _released(tag: str) -> bool:
    return (_dir() / f"release-{tag}").exists() or (_dir() / "release-all").exists()


@app.capability(type="whoami")
def whoami(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Answer with the replica id."""
    return make_response(request, replica=context.replica_id)


@app.capability(type="hold")
def hold(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Write ``started-<tag>`` (holding the replica id), wait for the release, answer."""
    tag = _tag(request)
    (_dir() / f"started-{tag}").write_text(context.replica_id)
    deadline = time.monotonic() + PATIENCE
    while not _released(tag) and time.monotonic() < deadline:
        time.sleep(0.01)
    return make_response(request, replica=context.replica_id)


@app.capability(type="block")
async def block(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Block the replica's event loop for ``text`` seconds (a handler that should not be
    async); nothing else on the replica can answer meanwhile."""
    time.sleep(float(_tag(request)))
    return make_response(request, replica=context.replica_id)


@app.capability(type="size")
def size(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Answer with the total size of the request's inputs (bytes of its text)."""
    total = sum(len(item) for t in request.inputs for item in t.contents.bytes_contents)
    return make_response(request, size=str(total))


@app.capability(type="tick", stream=True)
def tick(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """A token every 20 ms until cancelled (or 30 s); ``ended-<tag>`` says how it ended."""
    tag = _tag(request)
    (_dir() / f"started-{tag}").write_text(context.replica_id)
    tick_until_cancelled(request, stream)


@app.capability(type="stall", stream=True)
def stall(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Send one token, then nothing until released; ``ended-<tag>`` says how it ended."""
    tag = _tag(request)
    stream.send(stream_chunk(request, "first"))
    deadline = time.monotonic() + PATIENCE
    while not _released(tag) and not stream.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        stream.send(stream_chunk(request, "late"))
    except Exception as exc:
        (_dir() / f"ended-{tag}").write_text(type(exc).__name__)
        raise
    (_dir() / f"ended-{tag}").write_text("sent")
