"""Run Triton's gRPC client against an address and print what it saw as one JSON line.

``tritonclient.grpc`` registers its own copy of the ``inference.*`` protobuf messages in
the default descriptor pool, so it cannot share a process with ``anyserve._proto``: the
tests run it here, in a child process, the way a separate client application would.

    python -m tests.apps.triton_grpc_client HOST:PORT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def hello() -> Any:
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"Hello"], dtype=np.object_))
    return tensor


def error_of(call: Any) -> dict[str, str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


def check(address: str) -> dict[str, Any]:
    client = triton.InferenceServerClient(address)
    try:
        meta = client.get_model_metadata("chat")
        result = client.infer("chat", [hello()], model_version="demo")
        response = result.get_response()
        output = result.get_output("text_output")
        as_numpy: list[str] | str
        try:
            as_numpy = [v.decode() for v in result.as_numpy("text_output").tolist()]
        except ValueError as exc:  # numpy 2 refuses tritonclient's copy=False on typed BYTES
            as_numpy = f"ValueError: {exc}"
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready("chat", "demo"),
            "unknown_model_ready": client.is_model_ready("chat", "nope"),
            "server_name": client.get_server_metadata().name,
            "metadata": {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
            },
            "model_name": response.model_name,
            "model_version": response.model_version,
            "raw_outputs": len(response.raw_output_contents),
            "datatype": output.datatype,
            "shape": list(output.shape),
            "bytes_contents": [v.decode() for v in output.contents.bytes_contents],
            "as_numpy": as_numpy,
            "unknown_model_error": error_of(lambda: client.infer("nope", [hello()])),
        }
    finally:
        client.close()


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1])))
