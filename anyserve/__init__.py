"""AnyServe: route inference requests by capability to replicas of your Python handlers.

The public SDK::

    from anyserve import AnyServe, Context, Stream, ModelInferRequest, ModelInferResponse

    app = AnyServe()

    @app.capability(type="chat", model="demo")
    def chat(request: ModelInferRequest, context: Context) -> ModelInferResponse:
        return make_response(request, text="You said: " + input_text(request))

Names are imported on first use so that ``anyserve --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AnyServe",
    "Capability",
    "Context",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelStreamInferResponse",
    "ObjRef",
    "ObjectStore",
    "Stream",
    "StreamCancelled",
    "StreamClosed",
    "Tensor",
    "__version__",
    "input_list",
    "input_text",
    "input_texts",
    "list_output",
    "make_response",
    "stream_chunk",
    "text_output",
]

_LAZY = {
    "AnyServe": "anyserve.app",
    "Capability": "anyserve.app",
    "Context": "anyserve.context",
    "Stream": "anyserve.context",
    "StreamCancelled": "anyserve.errors",
    "StreamClosed": "anyserve.errors",
    "ObjRef": "anyserve.objects",
    "ObjectStore": "anyserve.objects",
    "Tensor": "anyserve.signature",
    "input_list": "anyserve.tensors",
    "input_text": "anyserve.tensors",
    "input_texts": "anyserve.tensors",
    "list_output": "anyserve.tensors",
    "make_response": "anyserve.tensors",
    "stream_chunk": "anyserve.tensors",
    "text_output": "anyserve.tensors",
    "InferParameter": "anyserve._proto.grpc_predict_v2_pb2",
    "InferTensorContents": "anyserve._proto.grpc_predict_v2_pb2",
    "ModelInferRequest": "anyserve._proto.grpc_predict_v2_pb2",
    "ModelInferResponse": "anyserve._proto.grpc_predict_v2_pb2",
    "ModelStreamInferResponse": "anyserve._proto.grpc_predict_v2_pb2",
}

if TYPE_CHECKING:
    from anyserve._proto.grpc_predict_v2_pb2 import (
        InferParameter,
        InferTensorContents,
        ModelInferRequest,
        ModelInferResponse,
        ModelStreamInferResponse,
    )
    from anyserve.app import AnyServe, Capability
    from anyserve.context import Context, Stream
    from anyserve.errors import StreamCancelled, StreamClosed
    from anyserve.objects import ObjectStore, ObjRef
    from anyserve.signature import Tensor
    from anyserve.tensors import (
        input_list,
        input_text,
        input_texts,
        list_output,
        make_response,
        stream_chunk,
        text_output,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anyserve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
