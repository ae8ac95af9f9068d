"""Triton's ``simple`` and ``simple_string`` models, declared, for the declared-tensor tests."""

from __future__ import annotations

from collections.abc import Iterator

from anyserve import AnyServe, ModelInferRequest, ModelInferResponse, Tensor
from anyserve.tensors import input_list, list_output, make_response, stream_chunk

app = AnyServe(name="triton-simple")

PAIR = [Tensor("INPUT0", "INT32", [1, 16]), Tensor("INPUT1", "INT32", [1, 16])]


@app.capability(
    type="simple",
    inputs=PAIR,
    outputs=[Tensor("OUTPUT0", "INT32", [1, 16]), Tensor("OUTPUT1", "INT32", [1, 16])],
)
def simple(request: ModelInferRequest) -> ModelInferResponse:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    a, b = input_list(request, "INPUT0"), input_list(request, "INPUT1")
    return make_response(
        request,
        list_output("OUTPUT0", [x + y for x, y in zip(a, b, strict=True)], "INT32", [1, 16]),
        list_output("OUTPUT1", [x - y for x, y in zip(a, b, strict=True)], "INT32", [1, 16]),
    )


@app.capability(
    type="simple_string",
    inputs=[Tensor("INPUT0", "BYTES", [1, 16]), Tensor("INPUT1", "BYTES", [1, 16])],
    outputs=[Tensor("OUTPUT0", "BYTES", [1, 16]), Tensor("OUTPUT1", "BYTES", [1, 16])],
)
def simple_string(request: ModelInferRequest) -> ModelInferResponse:
    """Triton's string variant: the inputs are decimal numbers as text."""
    a = [int(x) for x in input_list(request, "INPUT0")]
    b = [int(x) for x in input_list(request, "INPUT1")]
    return make_response(
        request,
        list_output("OUTPUT0", [str(x + y) for x, y in zip(a, b, strict=True)], "BYTES", [1, 16]),
        list_output("OUTPUT1", [str(x - y) for x, y in zip(a, b, strict=True)], "BYTES", [1, 16]),
    )


@app.capability(type="liar", outputs=[Tensor("OUTPUT0", "INT32", [1, -1])])
def liar(request: ModelInferRequest) -> ModelInferResponse:
    """Returns FP32 where INT32 is declared: a server error, not the client's."""
    return make_response(request, list_output("OUTPUT0", [1.5], "FP32", [1, 1]))


@app.capability(type="simple_stream", stream=True, inputs=PAIR)
def simple_stream(request: ModelInferRequest, context: object, stream: object) -> Iterator[object]:
    """One chunk per element of the sum: declared inputs are checked before it starts."""
    for x, y in zip(input_list(request, "INPUT0"), input_list(request, "INPUT1"), strict=True):
        yield stream_chunk(request, str(x + y))
