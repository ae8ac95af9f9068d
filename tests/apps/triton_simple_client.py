"""Run Triton's gRPC client on the ``simple`` model at an address; print one JSON line.

In a child process for the reason given in ``triton_grpc_client``: ``tritonclient.grpc``'s
protobuf messages clash with AnyServe's in one descriptor pool.

    python -m tests.apps.triton_simple_client HOST:PORT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def tensor(name: str, values: Any) -> Any:
    t = triton.InferInput(name, list(values.shape), "INT32")
    t.set_data_from_numpy(values)
    return t


def check(address: str) -> dict[str, Any]:
    client = triton.InferenceServerClient(address)
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        result = client.infer("simple", [tensor("INPUT0", a), tensor("INPUT1", b)])
        error = None
        try:
            client.infer("simple", [tensor("INPUT0", a[:, :8]), tensor("INPUT1", b)])
        except InferenceServerException as exc:
            error = {"status": str(exc.status()), "message": str(exc.message())}
        return {
            "sum": result.as_numpy("OUTPUT0").tolist(),
            "difference": result.as_numpy("OUTPUT1").tolist(),
            "error": error,
        }
    finally:
        client.close()


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1])))
