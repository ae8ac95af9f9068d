"""Triton's own client library (``tritonclient``) against AnyServe, with no glue code.

The HTTP client talks KServe v2 REST to the API server; the gRPC client talks to the API
server's gRPC ingress and to a replica directly. All of them reach the demo's ``chat``
capability as model ``chat``, version ``demo``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from .conftest import (
    PY,
    ROOT,
    ApiServer,
    Procs,
    Replica,
    free_port,
    start_api_server,
    start_replica,
)

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

CHAT_APP = "examples.mvp_demo.chat_app:app"
EXPECTED = b"[Chat Response] You said: Hello"


class Cluster:
    def __init__(self, api: ApiServer, grpc_port: int, replica: Replica) -> None:
        self.api = api
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.replica = replica

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.api.port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("triton")
    procs = Procs(tmp)
    try:
        grpc_port = free_port()
        api = start_api_server(
            procs, extra=["--object-store", str(tmp / "objects"), "--grpc-port", str(grpc_port)]
        )
        replica = start_replica(
            procs, CHAT_APP, api_server=api, object_store=tmp / "objects", replica_id="chat"
        )
        yield Cluster(api, grpc_port, replica)
    finally:
        procs.stop_all()


def hello(binary: bool = True) -> Any:
    tensor = tritonhttp.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"Hello"], dtype=np.object_), binary_data=binary)
    return tensor


# ---------------------------------------------------------------------- HTTP (KServe v2 REST)


def test_http_health_and_metadata(cluster: Cluster) -> None:
    client = tritonhttp.InferenceServerClient(cluster.http_address)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("chat")
        assert client.is_model_ready("chat", "demo")
        assert not client.is_model_ready("chat", "nope")
        assert client.get_server_metadata()["name"] == "anyserve"
        meta = client.get_model_metadata("chat", "demo")
        assert (meta["name"], meta["versions"], meta["platform"]) == ("chat", ["demo"], "anyserve")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer(cluster: Cluster, binary: bool) -> None:
    client = tritonhttp.InferenceServerClient(cluster.http_address)
    try:
        outputs = [tritonhttp.InferRequestedOutput("text_output", binary_data=binary)]
        result = client.infer("chat", [hello(binary)], model_version="demo", outputs=outputs)
        assert result.as_numpy("text_output").tolist() == [
            EXPECTED if binary else EXPECTED.decode()
        ]
        assert result.get_response()["model_version"] == "demo"
        # Without requested outputs the client asks for every output in binary.
        plain = client.infer("chat", [hello()], model_version="demo")
        assert plain.as_numpy("text_output").tolist() == [EXPECTED]
    finally:
        client.close()


def test_http_errors_reach_the_client(cluster: Cluster) -> None:
    client = tritonhttp.InferenceServerClient(cluster.http_address)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("nope", [hello()])
        assert caught.value.status() == "404"
        assert "no replica serves type=nope" in caught.value.message()
    finally:
        client.close()


# ---------------------------------------------------------------------- gRPC


def grpc_client(address: str) -> dict[str, Any]:
    """What ``tritonclient.grpc`` sees at ``address`` (run in a child process: its protobuf
    messages clash with AnyServe's in one descriptor pool)."""
    done = subprocess.run(
        [PY, "-m", "tests.apps.triton_grpc_client", address],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_grpc_to_the_api_server(cluster: Cluster) -> None:
    seen = grpc_client(cluster.grpc_address)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert not seen["unknown_model_ready"]
    assert seen["server_name"] == "anyserve"
    assert seen["metadata"] == {
        "name": "chat",
        "versions": ["demo", "with-embedding"],
        "platform": "anyserve",
    }
    assert (seen["model_name"], seen["model_version"]) == ("chat", "demo")
    # Raw in, raw out, so as_numpy works.
    assert seen["raw_outputs"] == 1
    assert seen["as_numpy"] == [EXPECTED.decode()]
    assert seen["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no replica serves type=nope" in seen["unknown_model_error"]["message"]


def test_grpc_direct_to_a_replica(cluster: Cluster) -> None:
    seen = grpc_client(cluster.replica.endpoint)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server_name"] == "anyserve"
    assert seen["metadata"]["versions"] == ["demo", "with-embedding"]
    assert (seen["datatype"], seen["shape"]) == ("BYTES", [1])
    # The replica answers a raw request in raw, as Triton does, so as_numpy works.
    assert seen["raw_outputs"] == 1
    assert seen["as_numpy"] == [EXPECTED.decode()]
    assert seen["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
