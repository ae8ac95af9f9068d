"""The committed generated code is fresh, and loads cleanly under the installed protobuf."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_generated_code_matches_a_fresh_generation() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_imports_without_warnings() -> None:
    code = (
        "import google.protobuf, grpc;"
        "from anyserve._proto import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as g;"
        "assert hasattr(g, 'GRPCInferenceServiceStub');"
        "r = pb.ModelStreamInferResponse(error_message='x');"
        "assert pb.ModelStreamInferResponse.FromString(r.SerializeToString()).error_message == 'x';"
        "print(google.protobuf.__version__)"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    major = int(result.stdout.strip().split(".")[0])
    assert 5 <= major <= 7, result.stdout


def test_upstream_field_numbers() -> None:
    from anyserve._proto import grpc_predict_v2_pb2 as pb

    fields = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}
    assert fields == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    fields = {f.name: f.number for f in pb.ModelInferResponse.DESCRIPTOR.fields}
    assert fields["raw_output_contents"] == 6 and fields["outputs"] == 5
    fields = {f.name: f.number for f in pb.ModelStreamInferResponse.DESCRIPTOR.fields}
    assert fields == {"error_message": 1, "infer_response": 2}
    contents = [f.name for f in pb.InferTensorContents.DESCRIPTOR.fields]
    assert contents == [
        "bool_contents",
        "int_contents",
        "int64_contents",
        "uint_contents",
        "uint64_contents",
        "fp32_contents",
        "fp64_contents",
        "bytes_contents",
    ]
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
    ]
    assert service.methods_by_name["ModelStreamInfer"].server_streaming
