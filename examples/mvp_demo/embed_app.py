"""Embedding replica of the MVP demo: ``type=embed`` → FP32 ``[len, len % 10, 0.5]``.

The text comes from the input ``text``, or from the stored object named by the input
``obj_ref`` (its key or its path in the object store).
"""

from __future__ import annotations

from typing import Any

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse
from anyserve.tensors import input_text, list_output, make_response

app = AnyServe(name="embed")


def _object_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("text", value))
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@app.capability(type="embed")
def embed_handler(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    ref = input_text(request, "obj_ref")
    text = _object_text(context.objects.get(ref)) if ref else input_text(request, "text", "")
    assert text is not None
    vector = [float(len(text)), float(len(text) % 10), 0.5]
    return make_response(request, list_output("embedding", vector, "FP32"))
