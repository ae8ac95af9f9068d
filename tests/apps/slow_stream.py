"""Handlers for the API server tests: slow streams, tickers, and "who answered" replies.

Handlers report what happened to them as files in ``$ANYSERVE_TEST_DIR`` (the tests'
tmp dir), since they run in another process; each request names its files by its input
``text`` (the "tag").
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import input_text, make_response, stream_chunk

app = AnyServe(name="slow")

# Handlers never wait longer than this for the test to release them.
PATIENCE = 30.0


def _dir() -> Path:
    return Path(os.environ.get("ANYSERVE_TEST_DIR", "."))


def _tag(request: ModelInferRequest) -> str:
    return input_text(request) or "untagged"


@app.capability(type="slow", stream=True)
def slow(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Send ``first``, wait until the file ``release-<tag>`` exists, then send ``second``."""
    tag = _tag(request)
    stream.send(stream_chunk(request, "first"))
    release = _dir() / f"release-{tag}"
    deadline = time.monotonic() + PATIENCE
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    stream.send(stream_chunk(request, "second", finish_reason="stop"))
    (_dir() / f"done-{tag}").write_text("done")


@app.capability(type="ticker", stream=True)
def ticker(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Send a token every 20 ms for up to 30 s; write how it ended to ``ended-<tag>``."""
    tick_until_cancelled(request, stream)


def tick_until_cancelled(request: ModelInferRequest, stream: Stream) -> None:
    """The ticker's loop, shared with the reliability test app."""
    tag = _tag(request)
    sent = 0
    try:
        while sent * 0.02 < PATIENCE:
            stream.send(stream_chunk(request, f"t{sent}"))
            sent += 1
            time.sleep(0.02)
    except Exception as exc:
        (_dir() / f"ended-{tag}").write_text(f"{type(exc).__name__} after {sent}")
        raise
    (_dir() / f"ended-{tag}").write_text(f"finished after {sent}")


@app.capability(type="late-start", stream=True)
def late_start(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Wait before the first token until cancelled (or 30 s); record how the send went."""
    tag = _tag(request)
    deadline = time.monotonic() + PATIENCE
    while not stream.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        stream.send(stream_chunk(request, "late"))
    except Exception as exc:
        (_dir() / f"ended-{tag}").write_text(type(exc).__name__)
        raise
    (_dir() / f"ended-{tag}").write_text("sent")


@app.capability(type="fail-first", stream=True)
def fail_first(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Raise before sending anything."""
    raise RuntimeError("no tokens today")


@app.capability(type="fail-later", stream=True)
def fail_later(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Send one token, then raise."""
    stream.send(stream_chunk(request, "first"))
    raise RuntimeError("broke mid-stream")


@app.capability(type="whoami")
def whoami(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Answer with the replica id and the request id the replica saw."""
    return make_response(request, replica=context.replica_id, request_id=context.request_id or "")


@app.capability(type="flags", fp16=True, gpus=2)
def flags(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """A capability with non-text attributes, matched as text."""
    return make_response(request, replica=context.replica_id)


@app.capability(type="sleep")
def sleep(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Sleep for ``text`` seconds, then answer with the replica id."""
    time.sleep(float(input_text(request) or "0.1"))
    return make_response(request, replica=context.replica_id)


@app.capability(type="boom")
def boom(request: ModelInferRequest) -> ModelInferResponse:
    """Raise, as a buggy handler would."""
    raise ValueError("the model exploded")
