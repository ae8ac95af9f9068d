"""Heavy replica of the MVP demo: ``type=heavy, gpus=2`` stores its result as an object."""

from __future__ import annotations

import time

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse
from anyserve.tensors import input_text, make_response

app = AnyServe(name="heavy")


@app.capability(type="heavy", gpus=2)
def heavy_handler(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    data = input_text(request, "data", default="")
    result = {"input": data, "processed": (data or "").upper(), "finished_at": time.time()}
    ref = context.objects.create(result)
    # result_ref is the object's key: `anyserve objects get KEY` fetches it.
    return make_response(request, result_ref=ref.key, result_path=ref.path, status="completed")
