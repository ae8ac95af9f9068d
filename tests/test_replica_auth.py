"""A replica's port under ``--auth all``: the token on every RPC but health, and delegation
that forwards the caller's credentials, never the replica's own token.

Real processes: an API server with ``--token --auth all``, the demo's embed replica behind
it, and chat replicas whose ports a caller talks to directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.errors import ConfigError
from anyserve.replica import ReplicaConfig, TokenGate

from .conftest import ApiServer, Procs, Replica, start_api_server, start_replica, wait_until

TOKEN = "replica-s3cret"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
WRONG = (("authorization", "Bearer guess"),)
NONE: tuple[tuple[str, str], ...] = ()

CHAT = "examples.mvp_demo.chat_app:app"
EMBED = "examples.mvp_demo.embed_app:app"


def text_request(model: str, text: str = "hello", version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(text.encode())
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tensor in response.outputs:
        contents = tensor.contents
        out[tensor.name] = (
            [b.decode() for b in contents.bytes_contents]
            if contents.bytes_contents
            else list(contents.fp32_contents)
        )
    return out


def refused(call: Callable[..., Any], *args: Any) -> str:
    """Run ``call(*args)``; it must fail UNAUTHENTICATED. Return the details the client saw."""
    with pytest.raises(grpc.RpcError) as failure:
        call(*args)
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED, failure.value.details()
    details = failure.value.details() or ""
    assert "Traceback" not in details
    return details


@dataclass
class Secured:
    api: ApiServer
    chat: Replica  # follows the API server's mode: ANYSERVE_AUTH=all
    stub: pbg.GRPCInferenceServiceStub


def start_chat(
    procs: Procs, secured_api: ApiServer, tmp: Path, replica_id: str, auth: str
) -> Replica:
    env = {"ANYSERVE_TOKEN": TOKEN, "ANYSERVE_AUTH": auth}
    return start_replica(
        procs,
        CHAT,
        api_server=secured_api,
        object_store=tmp / "objects",
        replica_id=replica_id,
        env=env,
        wait=False,
    )


def wait_registered(api: ApiServer, count: int) -> None:
    def registered() -> bool:
        reply = httpx.get(api.url + "/registry", headers={"Authorization": f"Bearer {TOKEN}"})
        return len(reply.json()["replicas"]) >= count

    wait_until(registered, timeout=30, what=f"{count} replicas registered")


@pytest.fixture
def secured(procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Secured]:
    monkeypatch.delenv("ANYSERVE_TOKEN", raising=False)
    monkeypatch.delenv("ANYSERVE_AUTH", raising=False)
    api = start_api_server(
        procs,
        extra=["--token", TOKEN, "--auth", "all", "--object-store", str(tmp_path / "objects")],
    )
    # The embed replica only answers the API server, which calls replicas without
    # credentials today: it keeps the open "writes" mode.
    start_replica(
        procs,
        EMBED,
        api_server=api,
        object_store=tmp_path / "objects",
        replica_id="embed",
        env={"ANYSERVE_TOKEN": TOKEN, "ANYSERVE_AUTH": "writes"},
        wait=False,
    )
    chat = start_chat(procs, api, tmp_path, "chat", "all")
    wait_registered(api, 2)
    with grpc.insecure_channel(chat.endpoint) as channel:
        yield Secured(api=api, chat=chat, stub=pbg.GRPCInferenceServiceStub(channel))


def test_health_is_open_every_other_rpc_needs_the_token(secured: Secured) -> None:
    stub = secured.stub
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # probes carry no credentials
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    calls: dict[str, Callable[[Any], Any]] = {
        "ServerMetadata": lambda md: stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=md),
        "ModelReady": lambda md: stub.ModelReady(pb.ModelReadyRequest(name="chat"), metadata=md),
        "ModelMetadata": lambda md: stub.ModelMetadata(
            pb.ModelMetadataRequest(name="chat"), metadata=md
        ),
        "ModelInfer": lambda md: stub.ModelInfer(text_request("chat", version="demo"), metadata=md),
        "ModelStreamInfer": lambda md: list(
            stub.ModelStreamInfer(text_request("chat"), metadata=md, timeout=5)
        ),
    }
    for rpc, send in calls.items():
        assert "authorization: Bearer <token>" in refused(send, NONE), rpc
        assert "not this replica's" in refused(send, WRONG), rpc
    assert stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=GOOD).name == "anyserve"
    assert stub.ModelReady(pb.ModelReadyRequest(name="chat"), metadata=GOOD).ready
    reply = stub.ModelInfer(text_request("chat", "hi", "demo"), metadata=GOOD)
    assert outputs(reply)["text_output"] == ["[Chat Response] You said: hi"]
    # A refused caller is answered, not crashed: no traceback in the replica's log either.
    assert "Traceback" not in secured.chat.proc.output()


def test_a_delegated_capability_needs_the_token_and_forwards_it(secured: Secured) -> None:
    stub = secured.stub
    # The chat replica serves no embed: it delegates through the API server (--auth all).
    refused(lambda: stub.ModelInfer(text_request("embed", "abcd"), metadata=NONE))
    refused(lambda: stub.ModelInfer(text_request("embed", "abcd"), metadata=WRONG))
    reply = stub.ModelInfer(text_request("embed", "abcd"), metadata=GOOD)
    assert outputs(reply)["embedding"] == [4.0, 4.0, 0.5]
    # context.call passes the caller's credentials on the same way.
    reply = stub.ModelInfer(text_request("chat", "abc", "with-embedding"), metadata=GOOD)
    assert outputs(reply)["embedding"] == [3.0, 3.0, 0.5]


def test_delegation_never_lends_the_replica_its_own_token(
    procs: Procs, secured: Secured, tmp_path: Path
) -> None:
    # A replica left open ("writes") although it holds the token: a caller without the
    # token reaches its port, but what it delegates carries the caller's (no) credentials,
    # so the API server's --auth all still refuses it.
    open_chat = start_chat(procs, secured.api, tmp_path, "open-chat", "writes")
    wait_registered(secured.api, 3)
    with grpc.insecure_channel(open_chat.endpoint) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(text_request("chat", "hi", "demo"))  # its own: open
        assert outputs(reply)["text_output"] == ["[Chat Response] You said: hi"]
        refused(lambda: stub.ModelInfer(text_request("embed", "abcd")))
        refused(lambda: stub.ModelInfer(text_request("embed", "abcd"), metadata=WRONG))
        refused(lambda: stub.ModelInfer(text_request("chat", "abc", "with-embedding")))
        reply = stub.ModelInfer(text_request("embed", "abcd"), metadata=GOOD)
        assert outputs(reply)["embedding"] == [4.0, 4.0, 0.5]


def test_the_gate_follows_the_auth_mode() -> None:
    every = TokenGate(TOKEN, "all")
    writes = TokenGate(TOKEN, "writes")
    no_token = TokenGate(None, "all")
    for rpc in ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer", "ModelStreamInfer"):
        assert every.needs_token(rpc), rpc
        assert not writes.needs_token(rpc), rpc
        assert not no_token.needs_token(rpc), rpc
    for rpc in ("ServerLive", "ServerReady"):
        assert not every.needs_token(rpc), rpc
    assert every.refusal("ModelInfer", {"authorization": f"bearer  {TOKEN} "}) is None
    assert every.refusal("ModelInfer", {"authorization": f"Basic {TOKEN}"}) is not None
    assert every.refusal("ModelInfer", {"authorization": "Bearer"}) is not None
    assert every.refusal("ModelInfer", {}) is not None
    assert writes.refusal("ModelInfer", {}) is None


def test_the_auth_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYSERVE_AUTH", raising=False)
    assert ReplicaConfig(app="m:app").auth == "writes"
    monkeypatch.setenv("ANYSERVE_AUTH", "all")
    assert ReplicaConfig(app="m:app").auth == "all"
    monkeypatch.setenv("ANYSERVE_AUTH", "everything")
    with pytest.raises(ConfigError, match="expected one of writes, all"):
        ReplicaConfig(app="m:app")
