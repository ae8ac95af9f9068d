"""Chat replica of the MVP demo: ``type=chat`` with ``model=demo`` and ``model=with-embedding``."""

from __future__ import annotations

from anyserve import AnyServe, Context, ModelInferRequest, ModelInferResponse
from anyserve.tensors import input_text, make_response

app = AnyServe(name="chat")


@app.capability(type="chat", model="demo")
def chat_handler(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    text = input_text(request, "text", default="")
    return make_response(request, text_output=f"[Chat Response] You said: {text}")


@app.capability(type="chat", model="with-embedding")
def chat_with_embedding(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Store the text as an object, ask the embed capability for its vector by reference."""
    text = input_text(request, "text", default="")
    ref = context.objects.create({"text": text})
    outputs: dict[str, object] = {
        "text_output": f"[Chat+Embed Response] Processed: {text}",
        "obj_ref": ref.key,
    }
    if context.api_server:
        embedding = context.call({"type": "embed"}, {"obj_ref": ref})
        outputs["embedding"] = list(embedding.outputs[0].contents.fp32_contents)
    return make_response(request, **outputs)
