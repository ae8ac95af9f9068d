"""Handlers covering the SDK's shapes: one/two arguments, async, raising, generators."""

from __future__ import annotations

import asyncio

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.errors import BadRequest
from anyserve.tensors import input_text, make_response, stream_chunk

app = AnyServe(name="sdk")


@app.capability(type="one")
def one_arg(request: ModelInferRequest) -> ModelInferResponse:
    return make_response(request, text_output="one:" + (input_text(request) or ""))


@app.capability(type="async")
async def async_handler(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    await asyncio.sleep(0)
    return make_response(request, text_output=f"async:{context.replica_id}:{context.request_id}")


@app.capability(type="boom")
def raising(request: ModelInferRequest) -> ModelInferResponse:
    raise ValueError("the model exploded")


@app.capability(type="bad-input")
def bad_input(request: ModelInferRequest) -> ModelInferResponse:
    raise BadRequest("input 'text' is required")


@app.capability(type="wrong-return")
def wrong_return(request: ModelInferRequest) -> ModelInferResponse:
    return "not a response"  # type: ignore[return-value]


@app.capability(type="dict-return")
def dict_return(request: ModelInferRequest) -> dict[str, object]:
    return {"text_output": "from a dict", "scores": [1.0, 2.5]}


@app.capability(type="gen", stream=True)
def generator_stream(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    for word in ["a", "b", "c"]:
        yield stream_chunk(request, word, finish_reason="stop" if word == "c" else "")


@app.capability(type="agen", stream=True)
async def async_stream(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for word in ["x", "y"]:
        stream.send(stream_chunk(request, word))
        await asyncio.sleep(0)


@app.capability(type="stream-boom", stream=True)
def stream_raises(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    stream.send(stream_chunk(request, "first"))
    raise RuntimeError("broke mid-stream")


@app.capability(type="flag", fast=True, gpus=2)
def flagged(request: ModelInferRequest) -> ModelInferResponse:
    return make_response(request, text_output="flagged")
