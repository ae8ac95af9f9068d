"""Streaming replica of the MVP demo: ``type=chat`` streams tokens; ``type=echo`` echoes."""

from __future__ import annotations

import os
import time

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import input_text, make_response, stream_chunk

app = AnyServe(name="stream")

TOKENS = ["Hello", " ", "world", "!", " ", "This", " ", "is", " ", "streaming", "."]
# Seconds between tokens, so a person watching sees them arrive one by one.
DELAY = float(os.environ.get("ANYSERVE_DEMO_TOKEN_DELAY", "0.05"))


@app.capability(type="chat", stream=True)
def stream_handler(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for i, token in enumerate(TOKENS):
        is_last = i == len(TOKENS) - 1
        stream.send(stream_chunk(request, token, finish_reason="stop" if is_last else ""))
        if DELAY and not is_last:
            time.sleep(DELAY)


@app.capability(type="echo")
def echo_handler(request: ModelInferRequest) -> ModelInferResponse:
    return make_response(request, text_output=f"Echo: {input_text(request, 'text', '')}")
