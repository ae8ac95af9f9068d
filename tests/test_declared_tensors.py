"""Declared tensors: a request that does not fit is refused before the handler runs, on every
surface (the replica's gRPC, the gRPC ingress, v2 REST, ``/infer/json``); outputs that break
the declaration are a server error; the replica's metadata lists the declarations.

One API server (with the gRPC ingress) and one replica of Triton's ``simple`` models.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from anyserve import AnyServe, Tensor
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.errors import BadRequest
from anyserve.signature import Signature

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

APP = "tests.apps.triton_simple:app"


class Cluster:
    def __init__(self, api: ApiServer, replica: Replica, grpc_port: int) -> None:
        self.api = api
        self.replica = replica
        self.ingress = f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("declared")
    procs = Procs(tmp)
    try:
        grpc_port = free_port()
        api = start_api_server(procs, extra=["--grpc-port", str(grpc_port)])
        replica = start_replica(procs, APP, api_server=api, replica_id="simple")
        yield Cluster(api, replica, grpc_port)
    finally:
        procs.stop_all()


def simple_request(model: str = "simple") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, values in (("INPUT0", range(16)), ("INPUT1", [1] * 16)):
        tensor = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(values)
    return req


def _drop_input1(r: pb.ModelInferRequest) -> None:
    del r.inputs[1]


def _fp32_input0(r: pb.ModelInferRequest) -> None:
    r.inputs[0].datatype = "FP32"
    r.inputs[0].contents.Clear()
    r.inputs[0].contents.fp32_contents.extend([0.5] * 16)


def _shape_input1(r: pb.ModelInferRequest) -> None:
    del r.inputs[1].shape[:]
    r.inputs[1].shape.extend([2, 8])


def _short_input0(r: pb.ModelInferRequest) -> None:
    del r.inputs[0].contents.int_contents[3:]


def _raw_short(r: pb.ModelInferRequest) -> None:
    for t in r.inputs:
        t.contents.Clear()
    r.raw_input_contents.append(np.arange(16, dtype="<i4").tobytes())
    r.raw_input_contents.append(np.arange(15, dtype="<i4").tobytes())


# (how the request is broken, what the error must say)
BROKEN: list[tuple[Callable[[pb.ModelInferRequest], None], str]] = [
    (_drop_input1, "input INPUT1 is missing: expected INT32 [1, 16]"),
    (_fp32_input0, "input INPUT0: expected datatype INT32, got FP32"),
    (_shape_input1, "input INPUT1: expected shape [1, 16], got [2, 8]"),
    (_short_input0, "input INPUT0: expected 16 elements for shape [1, 16], got 3"),
    (_raw_short, "input INPUT1: expected 16 elements for shape [1, 16], got 15"),
]


def broken(fault: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    req = simple_request()
    fault(req)
    return req


@pytest.mark.parametrize("where", ["replica", "ingress"])
def test_grpc_refuses_what_breaks_the_declaration(cluster: Cluster, where: str) -> None:
    target = cluster.replica.endpoint if where == "replica" else cluster.ingress
    with grpc.insecure_channel(target) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        ok = stub.ModelInfer(simple_request(), timeout=30)
        assert [o.name for o in ok.outputs] == ["OUTPUT0", "OUTPUT1"]
        assert list(ok.outputs[0].contents.int_contents) == [i + 1 for i in range(16)]
        for fault, message in BROKEN:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(broken(fault), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fault.__name__
            assert message in (err.value.details() or ""), fault.__name__


def as_json(req: pb.ModelInferRequest) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                "data": list(t.contents.int_contents or t.contents.fp32_contents),
            }
            for t in req.inputs
        ]
    }


def test_http_surfaces_answer_400_naming_the_tensor(cluster: Cluster) -> None:
    for fault, message in BROKEN[:4]:  # JSON carries no raw contents
        body = as_json(broken(fault))
        v2 = httpx.post(cluster.api.url + "/v2/models/simple/infer", json=body, timeout=30)
        assert v2.status_code == 400, v2.text
        # The JSON parser already refuses data that does not fill its own shape.
        if fault is _short_input0:
            message = "inputs[0].shape: [1, 16] holds 16 element(s) but data has 3"
        assert message in v2.text
        seed = httpx.post(
            cluster.api.url + "/infer/json",
            json=body,
            headers={"X-Capability-Type": "simple"},
            timeout=30,
        )
        assert seed.status_code == 400, seed.text
        assert message in seed.text
    ok = httpx.post(cluster.api.url + "/v2/models/simple/infer", json=as_json(simple_request()))
    assert ok.status_code == 200, ok.text
    assert ok.json()["outputs"][1]["data"] == [i - 1 for i in range(16)]


def test_outputs_against_the_declaration_are_a_server_error_logged(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.replica.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name="liar"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "output OUTPUT0: declared datatype INT32, got FP32" in (err.value.details() or "")
    assert "broke its declared outputs" in cluster.replica.proc.output()


def test_replica_metadata_lists_the_declared_tensors(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.replica.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="simple_string"), timeout=30)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "BYTES", [1, 16]),
        ("INPUT1", "BYTES", [1, 16]),
    ]
    assert [t.name for t in meta.outputs] == ["OUTPUT0", "OUTPUT1"]


def test_tritonclient_http_infers_simple_and_sees_the_refusal(cluster: Cluster) -> None:
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    client = thttp.InferenceServerClient(cluster.api.url.removeprefix("http://"))
    try:
        inputs = [thttp.InferInput("INPUT0", [1, 16], "INT32")]
        inputs.append(thttp.InferInput("INPUT1", [1, 16], "INT32"))
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("simple", inputs)
        assert (result.as_numpy("OUTPUT0") == a + b).all()
        assert (result.as_numpy("OUTPUT1") == a - b).all()
        wrong = thttp.InferInput("INPUT0", [1, 8], "INT32")
        wrong.set_data_from_numpy(a[:, :8])
        with pytest.raises(InferenceServerException, match=r"INPUT0: expected shape \[1, 16\]"):
            client.infer("simple", [wrong, inputs[1]])
    finally:
        client.close()


def test_tritonclient_grpc_infers_simple_through_the_ingress(cluster: Cluster) -> None:
    done = subprocess.run(
        [PY, "-m", "tests.apps.triton_simple_client", cluster.ingress],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["sum"] == [[i + 1 for i in range(16)]]
    assert seen["difference"] == [[i - 1 for i in range(16)]]
    assert seen["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0: expected shape [1, 16], got [1, 8]" in seen["error"]["message"]


def test_declarations_are_checked_when_declared() -> None:
    with pytest.raises(ValueError, match="datatype 'INT33'"):
        Tensor("x", "INT33", [1])
    with pytest.raises(ValueError, match="shape"):
        Tensor("x", "INT32", [-2])
    with pytest.raises(ValueError, match="printable"):
        Tensor("a\nb", "INT32", [1])
    with pytest.raises(ValueError, match="declared twice"):
        Signature([Tensor("x", "INT32", [1]), Tensor("x", "FP32", [1])])
    app = AnyServe()

    @app.capability(type="plain")
    def plain(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return pb.ModelInferResponse()

    assert app.handlers[0].signature is None  # undeclared: nothing is checked on the hot path
    sig = Signature([Tensor("x", "FP32", [-1])])
    req = pb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1, 2, 3])
    sig.check_request(req)  # -1 fits any size
    req.inputs[0].shape[0] = 4
    with pytest.raises(BadRequest, match="4 elements"):
        sig.check_request(req)


SIMPLE_INPUTS = [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16]},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16]},
]


def test_api_server_metadata_lists_the_declarations_over_http_and_the_ingress(
    cluster: Cluster,
) -> None:
    meta = httpx.get(cluster.api.url + "/v2/models/simple", timeout=30)
    assert meta.status_code == 200, meta.text
    assert meta.json()["inputs"] == SIMPLE_INPUTS
    assert [o["name"] for o in meta.json()["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    with grpc.insecure_channel(cluster.ingress) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        reply = stub.ModelMetadata(pb.ModelMetadataRequest(name="simple_string"), timeout=30)
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [
        ("OUTPUT0", "BYTES", [1, 16]),
        ("OUTPUT1", "BYTES", [1, 16]),
    ]
    # The declarations are not attributes: the registry matches on type alone.
    (record,) = cluster.api.registry()
    simple = next(c for c in record["capabilities"] if c.get("type") == "simple")
    assert simple["inputs"] == SIMPLE_INPUTS


@pytest.mark.parametrize(
    "inputs",
    [
        "INPUT0",
        [{"name": "x", "datatype": "INT33", "shape": [1]}],
        [{"name": "x", "datatype": "INT32", "shape": [-2]}],
        [{"name": "x", "datatype": "INT32", "shape": [1] * 9}],
        [{"name": "x" * 65, "datatype": "INT32", "shape": [1]}],
        [{"name": "x", "datatype": "INT32"}],
        [{"name": "x", "datatype": "INT32", "shape": [1]}] * 2,
        [{"name": f"x{i}", "datatype": "INT32", "shape": [1]} for i in range(65)],
    ],
)
def test_registration_declarations_are_bounded(inputs: object) -> None:
    from anyserve.registry import Capability

    with pytest.raises(BadRequest, match="capability inputs"):
        Capability.parse({"type": "m", "inputs": inputs})
    ok = Capability.parse({"type": "m", "inputs": SIMPLE_INPUTS, "outputs": []})
    assert ok.attrs == {"type": "m"} and [t.name for t in ok.inputs] == ["INPUT0", "INPUT1"]


def test_unknown_model_errors_start_with_the_standard_words(cluster: Cluster) -> None:
    words = "Request for unknown model: 'nope' is not found"
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        reply = httpx.get(cluster.api.url + path, timeout=30)
        assert reply.status_code == 404
        if path.endswith("nope"):
            assert reply.json()["error"].startswith(words)
            assert "simple" in reply.json()["error"]  # what is registered still follows
    reply = httpx.post(
        cluster.api.url + "/v2/models/nope/infer", json=as_json(simple_request()), timeout=30
    )
    assert reply.status_code == 404 and reply.json()["error"].startswith(words)
    with grpc.insecure_channel(cluster.ingress) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        for call in (
            lambda: stub.ModelInfer(simple_request("nope"), timeout=30),
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert (err.value.details() or "").startswith(words)
            assert "simple" in (err.value.details() or "")
    # The seed's route keeps its own wording.
    seed = httpx.post(
        cluster.api.url + "/infer/json",
        json=as_json(simple_request()),
        headers={"X-Capability-Type": "nope"},
        timeout=30,
    )
    assert seed.status_code == 404 and "Request for unknown model" not in seed.text


def test_model_config_is_tritons_shape_from_the_declarations(cluster: Cluster) -> None:
    import tritonclient.http as thttp

    reply = httpx.get(cluster.api.url + "/v2/models/simple_string/config", timeout=30)
    assert reply.status_code == 200, reply.text
    config = reply.json()
    assert config["max_batch_size"] == 0
    assert config["input"] == [
        {"name": "INPUT0", "data_type": "TYPE_STRING", "dims": [1, 16]},
        {"name": "INPUT1", "data_type": "TYPE_STRING", "dims": [1, 16]},
    ]
    client = thttp.InferenceServerClient(cluster.api.url.removeprefix("http://"))
    try:
        seen = client.get_model_config("simple")
        assert [(i["name"], i["data_type"], i["dims"]) for i in seen["input"]] == [
            ("INPUT0", "TYPE_INT32", [1, 16]),
            ("INPUT1", "TYPE_INT32", [1, 16]),
        ]
        meta = client.get_model_metadata("simple")
        assert meta["inputs"] == SIMPLE_INPUTS
    finally:
        client.close()
    missing = httpx.get(cluster.api.url + "/v2/models/nope/config", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"].startswith("Request for unknown model: 'nope' is not found")


def test_declared_stream_inputs_are_checked_before_the_handler_starts(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.replica.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        good = simple_request("simple_stream")
        assert len(list(stub.ModelStreamInfer(good, timeout=30))) == 16
        bad = broken(_shape_input1)
        bad.model_name = "simple_stream"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input INPUT1: expected shape [1, 16], got [2, 8]" in (err.value.details() or "")
