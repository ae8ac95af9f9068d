"""Delegation: a replica forwards what it cannot serve through the API server, never in a loop."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg

from .conftest import ApiServer, Procs, Replica, start_api_server, start_replica


def text_request(model: str, text: str, version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        text.encode()
    )
    return req


def json_body(text: str) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [text]},
            }
        ]
    }


@pytest.fixture
def demo(procs: Procs, tmp_path: Path) -> tuple[ApiServer, Replica, Replica]:
    api = start_api_server(procs, extra=["--object-store", str(tmp_path / "objects")])
    chat = start_replica(
        procs,
        "examples.mvp_demo.chat_app:app",
        api_server=api,
        object_store=tmp_path / "objects",
        replica_id="chat-1",
    )
    embed = start_replica(
        procs,
        "examples.mvp_demo.embed_app:app",
        api_server=api,
        object_store=tmp_path / "objects",
        replica_id="embed-1",
    )
    return api, chat, embed


def test_request_sent_to_the_wrong_replica_is_delegated(demo) -> None:  # type: ignore[no-untyped-def]
    _, chat, _ = demo
    with grpc.insecure_channel(chat.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        resp = stub.ModelInfer(text_request("embed", "Sample text"))
    assert list(resp.outputs[0].contents.fp32_contents) == [11.0, 1.0, 0.5]
    assert "delegating" in chat.proc.output()


def test_context_call_passes_an_object_by_reference(demo) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = demo
    reply = httpx.post(
        api.url + "/infer/json",
        json=json_body("Hi"),
        headers={"X-Capability-Type": "chat", "X-Capability-Model": "with-embedding"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o["contents"] for o in reply.json()["outputs"]}
    assert outputs["text_output"]["bytes_contents"] == ["[Chat+Embed Response] Processed: Hi"]
    assert outputs["embedding"]["fp32_contents"] == [2.0, 2.0, 0.5]


def test_delegation_loop_ends_in_a_clear_error(demo) -> None:  # type: ignore[no-untyped-def]
    api, chat, embed = demo
    # Two records claim a capability that the replicas behind them do not have: each
    # replica delegates, the API server picks the other record, and so on.
    for ghost, target in (("ghost-a", chat), ("ghost-b", embed)):
        reply = httpx.post(
            api.url + "/register",
            json={
                "replica_id": ghost,
                "endpoint": target.endpoint,
                "capabilities": [{"type": "ghost"}],
            },
            timeout=5,
        )
        assert reply.status_code == 200, reply.text
    reply = httpx.post(
        api.url + "/infer/json",
        json=json_body("x"),
        headers={"X-Capability-Type": "ghost"},
        timeout=30,
    )
    assert reply.status_code == 508, reply.text
    detail = reply.json()["detail"]
    assert "delegat" in detail and "type=ghost" in detail
    assert "Traceback" not in reply.text
    # Real traffic is unharmed.
    reply = httpx.post(
        api.url + "/infer/json",
        json=json_body("ok"),
        headers={"X-Capability-Type": "chat"},
        timeout=30,
    )
    assert reply.status_code == 200
