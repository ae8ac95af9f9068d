"""The gRPC ingress under the reliability rules of the HTTP routes: the per-replica limit and
the bounded queue, failover and ejection, the stream idle timeout, the message size limit
and the bearer token.

Real API servers (``--grpc-port``) and replicas; gRPC's own synchronous client.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import grpc_predict_v2_pb2_grpc as pbg
from anyserve.api_server import ApiServerConfig
from anyserve.errors import ConfigError, Unauthorized, trailing_metadata
from anyserve.ingress import HTTP_EQUIVALENT, TokenCheck
from anyserve.registry import NoHealthyReplica, Overloaded, TooManyRegistrations
from anyserve.topology import Topology, loads

from .apps.up_support import api_url, cli, leftovers, registered, up_args, write_app, write_topology
from .conftest import ApiServer, Procs, free_port, start_api_server, start_replica, wait_until
from .reliability import REL_APP, release, state

LIMIT = 1024 * 1024
TOKEN = "s3cret-token-for-grpc"


def text_request(kind: str, text: str = "x") -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` for capability ``type=kind`` with one BYTES input ``text``."""
    request = pb.ModelInferRequest(model_name=kind)
    tensor = request.inputs.add(name="text", datatype="BYTES")
    tensor.shape.append(1)
    tensor.contents.bytes_contents.append(text.encode())
    return request


def output(reply: pb.ModelInferResponse, name: str) -> str:
    """The first value of output ``name`` as text."""
    for tensor in reply.outputs:
        if tensor.name == name:
            return bytes(tensor.contents.bytes_contents[0]).decode()
    raise AssertionError(f"no output {name!r} in {reply}")


def token(reply: pb.ModelStreamInferResponse) -> str:
    """The text of one stream message."""
    return output(reply.infer_response, "text_output")


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())


class Cluster:
    """An API server with the gRPC ingress, and a stub on it."""

    def __init__(self, api: ApiServer, grpc_port: int, tmp: Path) -> None:
        self.api = api
        self.tmp = tmp
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = pbg.GRPCInferenceServiceStub(self.channel)

    def waiting(self) -> int:
        return int(httpx.get(self.api.url + "/stats", timeout=5).json()["waiting"])

    def in_flight(self) -> int:
        return sum(r["in_flight"] for r in self.api.registry())


def start_cluster(procs: Procs, tmp: Path, *flags: str) -> Cluster:
    grpc_port = free_port()
    api = start_api_server(
        procs, lease_ttl=30.0, heartbeat=0.3, extra=["--grpc-port", str(grpc_port), *flags]
    )
    return Cluster(api, grpc_port, tmp)


# ---------------------------------------------------------------------- one limited replica


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One replica taking one request at a time, a queue of one, small limits."""
    tmp = tmp_path_factory.mktemp("ingress")
    procs = Procs(tmp)
    try:
        cluster = start_cluster(
            procs,
            tmp,
            "--max-queue", "1",
            "--queue-timeout", "20",
            "--max-body-size", str(LIMIT),
            "--stream-idle-timeout", "1",
        )  # fmt: skip
        start_replica(
            procs,
            REL_APP,
            api_server=cluster.api,
            replica_id="a",
            extra=["--max-in-flight", "1"],
            env={"ANYSERVE_TEST_DIR": str(tmp)},
        )
        yield cluster
        cluster.channel.close()
    finally:
        procs.stop_all()


def test_beyond_the_limit_and_the_queue_the_ingress_sheds_fast(limited: Cluster) -> None:
    stub, tmp = limited.stub, limited.tmp
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(stub.ModelInfer, text_request("hold", "q1"), timeout=30)
        wait_until(lambda: (tmp / "started-q1").exists(), what="q1 running")
        queued = pool.submit(stub.ModelInfer, text_request("whoami"), timeout=30)
        wait_until(lambda: limited.waiting() == 1, what="one waiting")
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as shed:
            stub.ModelInfer(text_request("whoami"), timeout=30)
        assert time.monotonic() - began < 0.1
        assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "1 requests are already waiting" in (shed.value.details() or "")
        assert trailing(shed.value)["retry-after"] == "1"
        release(tmp, "q1")
        assert output(held.result(timeout=15), "replica") == "a"
        assert output(queued.result(timeout=15), "replica") == "a"
    assert limited.waiting() == 0


def test_a_stream_waits_for_a_slot_and_holds_it(limited: Cluster) -> None:
    stub, tmp = limited.stub, limited.tmp
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(stub.ModelInfer, text_request("hold", "q2"), timeout=30)
        wait_until(lambda: (tmp / "started-q2").exists(), what="q2 running")
        stream = stub.ModelStreamInfer(text_request("tick", "s2"), timeout=30)
        first = pool.submit(next, stream)
        wait_until(lambda: limited.waiting() == 1, what="the stream waiting")
        assert not (tmp / "started-s2").exists()
        release(tmp, "q2")
        assert token(first.result(timeout=15)) == "t0"
        assert dict(stream.initial_metadata())["x-anyserve-replica"] == "a"
        held.result(timeout=15)
        # The open stream holds the replica's only slot: a unary request waits for it.
        queued = pool.submit(stub.ModelInfer, text_request("whoami"), timeout=30)
        wait_until(lambda: limited.waiting() == 1, what="the unary request waiting")
        stream.cancel()
        assert output(queued.result(timeout=15), "replica") == "a"
    wait_until(lambda: (tmp / "ended-s2").exists(), what="the handler told of the cancel")
    wait_until(lambda: limited.in_flight() == 0, what="the slot given back")


def test_an_idle_stream_ends_with_an_error(limited: Cluster) -> None:
    stream = limited.stub.ModelStreamInfer(text_request("stall", "s3"), timeout=30)
    assert token(next(stream)) == "first"
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    # --stream-idle-timeout 1, swept twice a second.
    assert 0.8 < time.monotonic() - began < 3.0
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "sent nothing for 1s" in (ended.value.details() or "")
    # The handler was cancelled, and its slot is free again.
    ended_file = limited.tmp / "ended-s3"
    wait_until(ended_file.exists, what="the handler cancelled")
    assert ended_file.read_text() != "sent"
    assert output(limited.stub.ModelInfer(text_request("whoami"), timeout=10), "replica") == "a"


def test_a_message_over_the_body_limit_is_resource_exhausted(limited: Cluster) -> None:
    small = limited.stub.ModelInfer(text_request("size", "x" * (LIMIT - 1024)), timeout=30)
    assert output(small, "size") == str(LIMIT - 1024)
    with pytest.raises(grpc.RpcError) as refused:
        limited.stub.ModelInfer(text_request("size", "x" * (LIMIT + 128 * 1024)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (refused.value.details() or "")
    # One limit: the same message is a 413 over HTTP.
    over_http = httpx.post(
        limited.api.url + "/infer",
        content=text_request("size", "x" * (LIMIT + 128 * 1024)).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf", "X-Capability-Type": "size"},
        timeout=30,
    )
    assert over_http.status_code == 413
    # The ingress keeps serving.
    assert output(limited.stub.ModelInfer(text_request("whoami"), timeout=10), "replica") == "a"


# ---------------------------------------------------------------------- failover


def test_a_killed_replica_under_ingress_load_loses_no_request(procs: Procs, tmp_path: Path) -> None:
    cluster = start_cluster(procs, tmp_path)
    env = {"ANYSERVE_TEST_DIR": str(tmp_path)}
    replicas = {
        rid: start_replica(procs, REL_APP, api_server=cluster.api, replica_id=rid, env=env)
        for rid in ("a", "b")
    }
    stub = cluster.stub
    stop = threading.Event()
    answered: list[str] = []
    failed: list[str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                reply = stub.ModelInfer(text_request("whoami"), timeout=10)
                answered.append(output(reply, "replica"))
            except grpc.RpcError as exc:
                failed.append(f"{exc.code()}: {exc.details()}")

    started = tmp_path / "started-k1"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        held = pool.submit(stub.ModelInfer.with_call, text_request("hold", "k1"), timeout=30)
        victim = wait_until(lambda: started.exists() and started.read_text(), what="k1 held")
        survivor = "b" if victim == "a" else "a"
        clients = [pool.submit(load) for _ in range(3)]
        wait_until(lambda: {"a", "b"} <= set(answered), what="load on both replicas")
        replicas[victim].proc.stop(signal.SIGKILL)
        before = len(answered)
        # The held request is sent again, to the survivor.
        wait_until(lambda: started.read_text() == survivor, what="k1 retried on the survivor")
        release(tmp_path, "k1")
        reply, call = held.result(timeout=15)
        wait_until(lambda: len(answered) > before + 300, timeout=30, what="load after the kill")
        stop.set()
        for client in clients:
            client.result(timeout=15)
    assert failed == []
    assert output(reply, "replica") == survivor
    assert dict(call.initial_metadata())["x-anyserve-replica"] == survivor
    assert set(answered[before + 50 :]) == {survivor}
    assert state(cluster.api, victim) in ("ejected", "unhealthy")
    assert "not reachable, trying another" in cluster.api.proc.output()
    # A stream that relayed a message is never replayed: killing its replica ends it.
    ticks = stub.ModelStreamInfer(text_request("tick", "k2"), timeout=30)
    assert token(next(ticks)) == "t0"
    replicas[survivor].proc.stop(signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as ended:
        for _ in ticks:
            pass
    assert time.monotonic() - killed < 1.0
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"replica {survivor} at " in (ended.value.details() or "")
    assert trailing(ended.value)["retry-after"] == "1"
    cluster.channel.close()


# ---------------------------------------------------------------------- the token


def test_with_auth_all_every_rpc_but_server_live_needs_the_token(
    procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANYSERVE_TOKEN", raising=False)
    cluster = start_cluster(procs, tmp_path, "--token", TOKEN, "--auth", "all")
    start_replica(
        procs,
        REL_APP,
        api_server=cluster.api,
        replica_id="a",
        env={"ANYSERVE_TEST_DIR": str(tmp_path), "ANYSERVE_TOKEN": TOKEN},
        wait=False,
    )
    wait_until(
        lambda: httpx.get(
            cluster.api.url + "/registry", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()["total"],
        what="a registered",
    )
    stub = cluster.stub
    good = (("authorization", f"Bearer {TOKEN}"),)
    wrong = (("authorization", "Bearer guess"),)
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # liveness probes carry no credentials
    calls = {
        "ServerReady": lambda md: stub.ServerReady(pb.ServerReadyRequest(), metadata=md),
        "ModelReady": lambda md: stub.ModelReady(pb.ModelReadyRequest(name="whoami"), metadata=md),
        "ModelMetadata": lambda md: stub.ModelMetadata(
            pb.ModelMetadataRequest(name="whoami"), metadata=md
        ),
        "ModelInfer": lambda md: stub.ModelInfer(text_request("whoami"), metadata=md),
        "ModelStreamInfer": lambda md: list(
            stub.ModelStreamInfer(text_request("tick", "t"), metadata=md, timeout=0.5)
        ),
    }
    for rpc, send in calls.items():
        with pytest.raises(grpc.RpcError) as missing:
            send(())
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
        assert "authorization: Bearer <token>" in (missing.value.details() or ""), rpc
        assert trailing(missing.value)["www-authenticate"] == 'Bearer realm="anyserve"'
        with pytest.raises(grpc.RpcError) as guessed:
            send(wrong)
        assert guessed.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
        assert "not this API server's" in (guessed.value.details() or ""), rpc
    assert stub.ServerReady(pb.ServerReadyRequest(), metadata=good).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="whoami"), metadata=good).ready
    assert output(stub.ModelInfer(text_request("whoami"), metadata=good), "replica") == "a"
    ticks = stub.ModelStreamInfer(text_request("tick", "t2"), metadata=good, timeout=30)
    assert token(next(ticks)) == "t0"
    ticks.cancel()
    cluster.channel.close()


def test_each_rpc_needs_the_token_when_its_http_route_does() -> None:
    writes = TokenCheck(ApiServerConfig(token=TOKEN, auth="writes"))
    every = TokenCheck(ApiServerConfig(token=TOKEN, auth="all"))
    none = TokenCheck(ApiServerConfig(token=None, auth="all"))
    # Inference is open unless --auth all, as over HTTP; liveness is always open.
    assert not any(writes.needs_token(rpc) for rpc in HTTP_EQUIVALENT)
    assert {rpc for rpc in HTTP_EQUIVALENT if every.needs_token(rpc)} == set(HTTP_EQUIVALENT) - {
        "ServerLive"
    }
    assert not any(none.needs_token(rpc) for rpc in HTTP_EQUIVALENT)
    every.check("ModelInfer", {"authorization": f"bearer {TOKEN}"})  # the scheme in any case
    for metadata in ({}, {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"}):
        with pytest.raises(Unauthorized, match="needs the API server's token"):
            every.check("ModelInfer", metadata)
    with pytest.raises(Unauthorized, match="not this API server's"):
        every.check("ModelInfer", {"authorization": f"Bearer {TOKEN}x"})


def test_errors_carry_when_to_retry_as_trailing_metadata() -> None:
    assert trailing_metadata(Overloaded("full")) == (("retry-after", "1"),)
    assert trailing_metadata(NoHealthyReplica("all out")) == (("retry-after", "1"),)
    assert trailing_metadata(TooManyRegistrations("slow down", retry_after=2.2)) == (
        ("retry-after", "3"),
    )
    assert trailing_metadata(Unauthorized("x")) == (
        ("www-authenticate", 'Bearer realm="anyserve"'),
    )


# ---------------------------------------------------------------------- [api_server] grpc_port


def _topology(text: str) -> Topology:
    return loads(textwrap.dedent(text), Path("/srv/anyserve.toml"))


def test_grpc_port_in_anyserve_toml() -> None:
    assert _topology("[api_server]\nport = 8080\n").api_server.grpc_port is None
    assert _topology("[api_server]\ngrpc_port = 8081\n").api_server.grpc_port == 8081
    for text, message in [
        (
            "[api_server]\ngrpc_port = 70000\n",
            "anyserve.toml:2: api_server.grpc_port: expected a port number 1-65535, got 70000",
        ),
        (
            '[api_server]\ngrpc_port = "8081"\n',
            "anyserve.toml:2: api_server.grpc_port: expected a port number 1-65535",
        ),
        (
            "[api_server]\nport = 9000\ngrpc_port = 9000\n",
            "anyserve.toml:3: api_server.grpc_port: port 9000 is already used by api_server.port",
        ),
        (
            '[api_server]\ngrpc_port = 9001\n[replicas.chat]\napp = "a:b"\nport = 9001\n',
            "anyserve.toml:5: replicas.chat.port: port 9001 is already used by "
            "api_server.grpc_port",
        ),
    ]:
        with pytest.raises(ConfigError) as caught:
            _topology(text)
        assert message in caught.value.message


def test_up_refuses_a_grpc_port_in_use(tmp_path: Path) -> None:
    write_app(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        topology = write_topology(tmp_path, '[replicas.echo]\napp = "upapp.echo:app"\n')
        topology.write_text(
            topology.read_text().replace("lease_ttl", f"grpc_port = {port}\nlease_ttl")
        )
        result = cli("up", "--no-tui", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"api_server.grpc_port: port {port} on 127.0.0.1 is already in use" in result.stderr
    assert leftovers(str(tmp_path)) == []


def test_up_serves_the_ingress_on_grpc_port(procs: Procs, tmp_path: Path) -> None:
    write_app(tmp_path)
    grpc_port = free_port()
    topology = write_topology(tmp_path, '[replicas.echo]\napp = "upapp.echo:app"\n')
    topology.write_text(
        topology.read_text().replace("lease_ttl", f"grpc_port = {grpc_port}\nlease_ttl")
    )
    up = procs.start(up_args(topology, "--no-reload"), name="up", cwd=tmp_path)
    url = api_url(topology)
    try:
        wait_until(lambda: registered(url, "echo-"), timeout=60, what="echo registered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- anyserve up output:\n{up.output()[-4000:]}") from None
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = pbg.GRPCInferenceServiceStub(channel).ModelInfer(text_request("echo"), timeout=10)
    assert output(reply, "text_output") == "v1"
    up.stop()
    wait_until(lambda: leftovers(str(tmp_path)) == [], what="every child gone")
