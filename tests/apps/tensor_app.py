"""Handlers for the KServe v2 tests: tensors of every datatype echoed, raw outputs, errors."""

from __future__ import annotations

import struct

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse, Stream
from anyserve.tensors import input_list, list_output, make_response, stream_chunk

app = AnyServe(name="tensors")


@app.capability(type="echo", model="v1")
def echo(request: ModelInferRequest) -> ModelInferResponse:
    """Each input back as ``<name>_out`` with its datatype and shape (raw inputs decoded)."""
    outputs = [
        list_output(f"{t.name}_out", input_list(request, t.name), t.datatype, list(t.shape))
        for t in request.inputs
    ]
    response = make_response(request, *outputs)
    for key, param in request.parameters.items():
        response.parameters[key].CopyFrom(param)
    return response


@app.capability(type="echo", model="v2")
def echo_v2(request: ModelInferRequest) -> ModelInferResponse:
    """A second version, so that metadata lists two."""
    return make_response(request, version="v2")


@app.capability(type="raw")
def raw_outputs(request: ModelInferRequest) -> ModelInferResponse:
    """Outputs given in ``raw_output_contents`` by the handler itself."""
    response = make_response(request)
    floats = response.outputs.add(name="floats", datatype="FP32")
    floats.shape.extend([2, 2])
    words = response.outputs.add(name="words", datatype="BYTES")
    words.shape.append(2)
    response.raw_output_contents.append(struct.pack("<4f", 1.5, -2.0, 0.25, 8.0))
    response.raw_output_contents.append(
        struct.pack("<I", 2) + b"hi" + struct.pack("<I", 3) + b"you"
    )
    return response


@app.capability(type="boom")
def boom(request: ModelInferRequest) -> ModelInferResponse:
    raise ValueError("the model exploded")


@app.capability(type="talk", stream=True)
def talk(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for word in ("a", "b"):
        stream.send(stream_chunk(request, word))
