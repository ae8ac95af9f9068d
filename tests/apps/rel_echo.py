"""Handlers for the hostile-input tests: nothing a request can make fail, block or linger."""

from __future__ import annotations

from anyserve import AnyServe, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import make_response, stream_chunk

app = AnyServe(name="echo")


@app.capability(type="echo")
def echo(request: ModelInferRequest) -> ModelInferResponse:
    """Answer with how many inputs and raw inputs the request had."""
    return make_response(
        request, inputs=str(len(request.inputs)), raw=str(len(request.raw_input_contents))
    )


@app.capability(type="echo", stream=True)
def echo_stream(request: ModelInferRequest, context: object, stream: Stream) -> None:
    """Two small events."""
    stream.send(stream_chunk(request, "one"))
    stream.send(stream_chunk(request, "two", finish_reason="stop"))
