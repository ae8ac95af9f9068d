"""The API server against real replica processes: routing, errors, streams, the registry.

One API server with a set of replicas is shared by the routing tests of this module
(starting processes is the slow part); tests that kill or restart something start
their own.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.client import sse_data

from .conftest import (
    PY,
    ApiServer,
    Procs,
    free_port,
    start_api_server,
    start_replica,
    wait_until,
)

SLOW_APP = "tests.apps.slow_stream:app"


def text_body(text: str, name: str = "text") -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [text]},
            }
        ]
    }


def output(body: dict[str, Any], name: str = "text_output") -> Any:
    for out in body["outputs"]:
        if out["name"] == name:
            values = next(iter(out["contents"].values()))
            return values[0] if len(values) == 1 else values
    raise AssertionError(f"no output {name!r} in {body}")


def post(
    server: ApiServer,
    path: str,
    body: Any = None,
    caps: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    all_headers = {f"X-Capability-{k}": v for k, v in (caps or {}).items()}
    all_headers.update(headers or {})
    if body is not None and "content" not in kwargs:
        kwargs["json"] = body
    kwargs.setdefault("timeout", 30)
    return httpx.post(server.url + path, headers=all_headers, **kwargs)


class Cluster:
    """The shared API server and its replicas."""

    def __init__(self, api: ApiServer, tmp: Path) -> None:
        self.api = api
        self.tmp = tmp


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    procs = Procs(tmp)
    try:
        api = start_api_server(procs, extra=["--object-store", str(tmp / "objects")])
        env = {"ANYSERVE_TEST_DIR": str(tmp), "ANYSERVE_DEMO_TOKEN_DELAY": "0"}
        store = tmp / "objects"
        for app, rid in [
            ("examples.mvp_demo.chat_app:app", "chat"),
            ("examples.mvp_demo.heavy_app:app", "heavy"),
            ("examples.mvp_demo.stream_app:app", "stream"),
            (SLOW_APP, "slow-a"),
            (SLOW_APP, "slow-b"),
        ]:
            start_replica(
                procs, app, api_server=api, object_store=store, replica_id=rid, env=env, wait=False
            )
        api.wait_registered(5, timeout=30)
        yield Cluster(api, tmp)
    finally:
        procs.stop_all()


# ---------------------------------------------------------------------- plain routes


def test_health(cluster: Cluster) -> None:
    reply = httpx.get(cluster.api.url + "/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "healthy"}


def test_registry_shape(cluster: Cluster) -> None:
    data = httpx.get(cluster.api.url + "/registry").json()
    assert data["total"] == len(data["replicas"]) == 5
    heavy = next(r for r in data["replicas"] if r["replica_id"] == "heavy")
    assert heavy["capabilities"] == [{"type": "heavy", "gpus": 2}]
    stream = next(r for r in data["replicas"] if r["replica_id"] == "stream")
    assert {"type": "chat", "stream": True} in stream["capabilities"]
    for key in (
        "endpoint",
        "registered_at",
        "last_heartbeat",
        "state",
        "in_flight",
        "requests",
        "errors",
        "p50_ms",
        "p99_ms",
    ):
        assert key in heavy
    assert heavy["state"] == "ready"


def test_stats_and_metrics(cluster: Cluster) -> None:
    post(cluster.api, "/infer/json", text_body("x"), {"Type": "whoami"})
    stats = httpx.get(cluster.api.url + "/stats").json()
    assert stats["requests"] >= 1
    assert {r["replica_id"] for r in stats["replicas"]} >= {"slow-a", "slow-b"}
    metrics = httpx.get(cluster.api.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE anyserve_replica_requests_total counter" in metrics.text
    assert 'anyserve_replica_requests_total{replica="chat"}' in metrics.text
    assert "anyserve_replicas 5" in metrics.text


def test_unknown_route_and_method(cluster: Cluster) -> None:
    reply = httpx.get(cluster.api.url + "/nope")
    assert reply.status_code == 404
    assert reply.json() == {"detail": "Not Found"}
    assert httpx.get(cluster.api.url + "/infer/json").status_code == 405


# ---------------------------------------------------------------------- routing


def test_seed_chat_request(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/json", text_body("Hello World"), {"Type": "chat"})
    assert reply.status_code == 200, reply.text
    assert output(reply.json()) == "[Chat Response] You said: Hello World"
    assert reply.headers["X-AnyServe-Replica"] == "chat"
    assert reply.headers["X-AnyServe-Candidates"] == "chat=0"
    assert reply.headers["X-Request-ID"]


def test_numeric_capability_header_reaches_heavy(cluster: Cluster) -> None:
    reply = post(
        cluster.api, "/infer/json", text_body("Heavy task", "data"), {"Type": "heavy", "Gpus": "2"}
    )
    assert reply.status_code == 200, reply.text
    assert output(reply.json(), "status") == "completed"
    assert reply.headers["X-AnyServe-Replica"] == "heavy"
    miss = post(cluster.api, "/infer/json", text_body("x", "data"), {"Type": "heavy", "Gpus": "4"})
    assert miss.status_code == 404


def test_boolean_and_number_attributes_match_as_text(cluster: Cluster) -> None:
    caps = {"Type": "flags", "Fp16": "true", "Gpus": "2"}
    reply = post(cluster.api, "/infer/json", text_body("x"), caps)
    assert reply.status_code == 200, reply.text
    assert output(reply.json(), "replica") in ("slow-a", "slow-b")


def test_missing_capability_headers_is_400(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/json", text_body("x"))
    assert reply.status_code == 400
    assert "X-Capability-" in reply.json()["detail"]
    assert post(cluster.api, "/infer/stream", text_body("x")).status_code == 400
    assert post(cluster.api, "/infer", content=b"").status_code == 400


def test_invalid_json_is_400(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/json", caps={"Type": "chat"}, content=b"{not json")
    assert reply.status_code == 400
    assert "invalid JSON" in reply.json()["detail"]
    empty = post(cluster.api, "/infer/json", caps={"Type": "chat"}, content=b"")
    assert empty.status_code == 400


def test_unknown_capability_is_404_naming_what_exists(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/json", text_body("x"), {"Type": "chat2"})
    assert reply.status_code == 404
    detail = reply.json()["detail"]
    assert detail.startswith("no replica serves type=chat2; registered: ")
    assert "type=chat model=demo" in detail
    assert "type=heavy gpus=2" in detail


def test_stream_route_never_reaches_unary_handlers(cluster: Cluster) -> None:
    # type=echo is unary only (stream_app); type=chat is unary on chat, stream on stream.
    reply = post(cluster.api, "/infer/stream", text_body("x"), {"Type": "echo"})
    assert reply.status_code == 404
    assert "use /infer/json" in reply.json()["detail"]
    for _ in range(4):
        unary = post(cluster.api, "/infer/json", text_body("Hi"), {"Type": "chat"})
        assert unary.headers["X-AnyServe-Replica"] == "chat"
        streamed = post(cluster.api, "/infer/stream", text_body("Hi"), {"Type": "chat"})
        assert streamed.headers["X-AnyServe-Replica"] == "stream"
    explicit = post(
        cluster.api, "/infer/stream", text_body("Hi"), {"Type": "chat", "Stream": "true"}
    )
    assert explicit.headers["X-AnyServe-Replica"] == "stream"
    wrong = post(cluster.api, "/infer/json", text_body("Hi"), {"Type": "chat", "Stream": "true"})
    assert wrong.status_code == 400
    assert "use /infer/stream" in wrong.json()["detail"]
    unary_only = post(cluster.api, "/infer/json", text_body("x"), {"Type": "ticker"})
    assert unary_only.status_code == 404
    assert "use /infer/stream" in unary_only.json()["detail"]


def test_handler_error_is_500_with_message_only(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/json", text_body("x"), {"Type": "boom"})
    assert reply.status_code == 500
    detail = reply.json()["detail"]
    assert "the model exploded" in detail
    assert "Traceback" not in reply.text


def test_request_id_is_echoed_and_passed_on(cluster: Cluster) -> None:
    reply = post(
        cluster.api,
        "/infer/json",
        text_body("x"),
        {"Type": "whoami"},
        headers={"X-Request-ID": "trace-123"},
    )
    assert reply.headers["X-Request-ID"] == "trace-123"
    assert output(reply.json(), "request_id") == "trace-123"
    generated = post(cluster.api, "/infer/json", text_body("x"), {"Type": "whoami"})
    assert generated.headers["X-Request-ID"] == output(generated.json(), "request_id")
    assert len(generated.headers["X-Request-ID"]) >= 8
    error = post(
        cluster.api,
        "/infer/json",
        text_body("x"),
        {"Type": "nope"},
        headers={"X-Request-ID": "trace-404"},
    )
    assert error.headers["X-Request-ID"] == "trace-404"


def test_request_timeout_header(cluster: Cluster) -> None:
    reply = post(
        cluster.api,
        "/infer/json",
        text_body("2"),
        {"Type": "sleep"},
        headers={"X-Request-Timeout": "0.3"},
    )
    assert reply.status_code == 504
    assert "0.3s" in reply.json()["detail"]
    bad = post(
        cluster.api,
        "/infer/json",
        text_body("0"),
        {"Type": "sleep"},
        headers={"X-Request-Timeout": "soon"},
    )
    assert bad.status_code == 400


def test_delegation_headers(cluster: Cluster) -> None:
    # The visited replica is skipped...
    for _ in range(3):
        reply = post(
            cluster.api,
            "/infer/json",
            text_body("x"),
            {"Type": "whoami"},
            headers={"X-Delegated-From": "slow-a", "X-Delegation-Depth": "1"},
        )
        assert reply.status_code == 200
        assert reply.headers["X-AnyServe-Replica"] == "slow-b"
    # ...and when every candidate was visited, the 404 says so.
    reply = post(
        cluster.api,
        "/infer/json",
        text_body("x"),
        {"Type": "whoami"},
        headers={"X-Delegated-From": "slow-a,slow-b", "X-Delegation-Depth": "2"},
    )
    assert reply.status_code == 404
    assert "delegated from" in reply.json()["detail"]
    # Past the depth limit: a clear 508, never another hop.
    loop = post(
        cluster.api,
        "/infer/json",
        text_body("x"),
        {"Type": "whoami"},
        headers={"X-Delegated-From": "a,b,c,d", "X-Delegation-Depth": "4"},
    )
    assert loop.status_code == 508
    assert "past the limit of 3" in loop.json()["detail"]


def test_ties_spread_and_both_replicas_serve_under_load(cluster: Cluster) -> None:
    sequential = {
        post(cluster.api, "/infer/json", text_body("x"), {"Type": "whoami"}).headers[
            "X-AnyServe-Replica"
        ]
        for _ in range(4)
    }
    assert sequential == {"slow-a", "slow-b"}

    def call(_: int) -> str:
        reply = post(cluster.api, "/infer/json", text_body("0.2"), {"Type": "sleep"})
        assert reply.status_code == 200, reply.text
        return str(output(reply.json(), "replica"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(call, range(16)))
    assert set(served) == {"slow-a", "slow-b"}
    assert min(served.count("slow-a"), served.count("slow-b")) >= 4


def test_protobuf_route_round_trips(cluster: Cluster) -> None:
    request = pb.ModelInferRequest(model_name="chat", id="pb-1")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append("héllo".encode())
    reply = post(
        cluster.api,
        "/infer",
        caps={"Type": "chat", "Model": "demo"},
        headers={"Content-Type": "application/x-protobuf"},
        content=request.SerializeToString(),
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/x-protobuf"
    response = pb.ModelInferResponse.FromString(reply.content)
    assert response.id == "pb-1"
    assert response.outputs[0].contents.bytes_contents[0].decode() == (
        "[Chat Response] You said: héllo"
    )
    garbage = post(cluster.api, "/infer", caps={"Type": "chat"}, content=b"\xff\xff\xff")
    assert garbage.status_code == 400


# ---------------------------------------------------------------------- SSE


def events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for data in sse_data(lines):
        yield json.loads(data)


def test_seed_stream(cluster: Cluster) -> None:
    with httpx.stream(
        "POST",
        cluster.api.url + "/infer/stream",
        json=text_body("Hello"),
        headers={"X-Capability-Type": "chat"},
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["cache-control"] == "no-cache"
        assert reply.headers["x-accel-buffering"] == "no"
        tokens = [output(e) for e in events(reply.iter_lines())]
    assert "".join(tokens) == "Hello world! This is streaming."


def test_first_event_arrives_before_the_handler_finishes(cluster: Cluster) -> None:
    tag = "first-event"
    with httpx.stream(
        "POST",
        cluster.api.url + "/infer/stream",
        json=text_body(tag),
        headers={"X-Capability-Type": "slow"},
        timeout=30,
    ) as reply:
        received = events(reply.iter_lines())
        assert output(next(received)) == "first"
        # The handler is still blocked waiting for us: nothing was buffered until the end.
        assert not (cluster.tmp / f"done-{tag}").exists()
        (cluster.tmp / f"release-{tag}").write_text("go")
        assert output(next(received)) == "second"
        assert list(received) == []
    wait_until(lambda: (cluster.tmp / f"done-{tag}").exists(), what="handler finished")


def test_client_disconnect_makes_the_next_send_raise(cluster: Cluster) -> None:
    tag = "disconnect"
    with httpx.stream(
        "POST",
        cluster.api.url + "/infer/stream",
        json=text_body(tag),
        headers={"X-Capability-Type": "ticker"},
        timeout=30,
    ) as reply:
        received = events(reply.iter_lines())
        assert output(next(received)) == "t0"
        assert output(next(received)) == "t1"
    ended = cluster.tmp / f"ended-{tag}"
    wait_until(ended.exists, timeout=10, what="the ticker handler to stop")
    text = ended.read_text()
    assert text.startswith("Stream"), text  # StreamCancelled / StreamClosed, not "finished"
    assert int(text.rsplit(" ", 1)[1]) < 200  # stopped within seconds, not after 30 s
    wait_until(
        lambda: not any(r["in_flight"] for r in cluster.api.registry()),
        what="in-flight counters back to 0",
    )


def test_client_leaving_before_the_first_token_cancels_the_stream(cluster: Cluster) -> None:
    tag = "leaves-early"
    with pytest.raises(httpx.ReadTimeout):
        post(
            cluster.api,
            "/infer/stream",
            text_body(tag),
            {"Type": "late-start"},
            timeout=httpx.Timeout(10, read=0.5),
        )
    ended = cluster.tmp / f"ended-{tag}"
    wait_until(ended.exists, timeout=10, what="the handler to notice")
    assert ended.read_text().startswith("Stream")
    wait_until(
        lambda: not any(r["in_flight"] for r in cluster.api.registry()),
        what="in-flight counters back to 0",
    )


def test_stream_that_fails_at_once_is_an_http_error(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/stream", text_body("x"), {"Type": "fail-first"})
    assert reply.status_code == 500
    assert "no tokens today" in reply.json()["detail"]


def test_stream_that_fails_midway_sends_an_error_event(cluster: Cluster) -> None:
    reply = post(cluster.api, "/infer/stream", text_body("x"), {"Type": "fail-later"})
    assert reply.status_code == 200
    first, error = events(iter(reply.text.splitlines()))
    assert output(first) == "first"
    assert "broke mid-stream" in error["error"]


# ---------------------------------------------------------------------- registration


def register_body(rid: str, port: int = 1, instance: str = "i1") -> dict[str, Any]:
    return {
        "replica_id": rid,
        "endpoint": f"127.0.0.1:{port}",
        "capabilities": [{"type": "fake", "n": 1}],
        "instance": instance,
    }


def test_register_malformed_is_4xx_and_registers_nothing(cluster: Cluster) -> None:
    url = cluster.api.url
    before = httpx.get(url + "/registry").json()["total"]
    for bad in [
        b"{nope",
        b"[]",
        json.dumps({"replica_id": "x"}).encode(),
        json.dumps(
            {"replica_id": "x", "endpoint": "h:1", "capabilities": [{"type": "a"}, 5]}
        ).encode(),
    ]:
        reply = httpx.post(url + "/register", content=bad)
        assert 400 <= reply.status_code < 500, reply.text
        assert "detail" in reply.json()
    assert httpx.get(url + "/registry").json()["total"] == before


def test_register_unregister_and_ownership(cluster: Cluster) -> None:
    url = cluster.api.url
    reply = httpx.post(url + "/register", json=register_body("fake-1"))
    assert reply.status_code == 200
    assert reply.json()["success"] is True
    assert reply.json()["heartbeat_interval"] == 0.5
    # Another process claiming the id may neither remove nor renew the record.
    intruder = httpx.request(
        "DELETE", url + "/unregister", json={"replica_id": "fake-1", "instance": "other"}
    )
    assert intruder.status_code == 409
    beat = httpx.post(url + "/heartbeat", json=register_body("fake-1", instance="other"))
    assert beat.status_code == 409
    assert any(r["replica_id"] == "fake-1" for r in cluster.api.registry())
    own = httpx.post(url + "/unregister", json={"replica_id": "fake-1", "instance": "i1"})
    assert own.status_code == 200
    assert not any(r["replica_id"] == "fake-1" for r in cluster.api.registry())
    again = httpx.request("DELETE", url + "/unregister", json={"replica_id": "fake-1"})
    assert again.status_code == 404
    # A drained replica still heartbeating stays out of the registry.
    late = httpx.post(url + "/heartbeat", json=register_body("fake-1"))
    assert late.status_code == 410
    assert not any(r["replica_id"] == "fake-1" for r in cluster.api.registry())


def test_heartbeat_for_unknown_id_registers(cluster: Cluster) -> None:
    url = cluster.api.url
    reply = httpx.post(url + "/heartbeat", json=register_body("fake-2"))
    assert reply.status_code == 200
    assert reply.json()["registered"] is True
    again = httpx.post(url + "/heartbeat", json=register_body("fake-2"))
    assert again.json()["registered"] is False
    httpx.post(url + "/unregister", json={"replica_id": "fake-2"})


# ---------------------------------------------------------------------- processes coming and going


def test_lease_expiry_evicts(procs: Procs) -> None:
    api = start_api_server(procs, lease_ttl=0.5, heartbeat=0.2)
    httpx.post(api.url + "/register", json=register_body("silent"))
    assert len(api.registry()) == 1
    started = time.monotonic()
    wait_until(lambda: api.registry() == [], timeout=5, what="eviction")
    assert time.monotonic() - started < 3
    wait_until(lambda: "evicted replica silent" in api.proc.output(), what="eviction logged")


def test_sigkilled_replica_leaves_while_the_other_keeps_serving(
    procs: Procs, tmp_path: Path
) -> None:
    api = start_api_server(procs, lease_ttl=2.0, heartbeat=0.3)
    env = {"ANYSERVE_TEST_DIR": str(tmp_path)}
    victim = start_replica(procs, SLOW_APP, api_server=api, replica_id="victim", env=env)
    start_replica(procs, SLOW_APP, api_server=api, replica_id="survivor", env=env)
    victim.proc.stop(signal.SIGKILL)
    started = time.monotonic()
    failures = []
    while [r["replica_id"] for r in api.registry()] != ["survivor"]:
        reply = post(api, "/infer/json", text_body("x"), {"Type": "whoami"})
        if reply.status_code != 200:
            failures.append(reply.text)
        assert time.monotonic() - started < 2.0 + 2.0, "victim not evicted within its lease"
    assert failures == []
    # Requests that picked the dead replica were sent to the other one instead.
    assert "replica victim at" in api.proc.output()
    assert "not reachable, trying another" in api.proc.output()


def test_api_server_restart_is_repopulated_by_heartbeats(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    api = start_api_server(procs, port=port, heartbeat=0.3)
    for rid in ("one", "two"):
        start_replica(
            procs,
            SLOW_APP,
            api_server=api,
            replica_id=rid,
            env={"ANYSERVE_TEST_DIR": str(tmp_path)},
        )
    api.proc.stop()
    api = start_api_server(procs, port=port, heartbeat=0.3)
    started = time.monotonic()
    api.wait_registered(2, timeout=5)
    assert time.monotonic() - started < 0.3 * 2 + 1.0  # one heartbeat interval, plus slack
    reply = post(api, "/infer/json", text_body("x"), {"Type": "whoami"})
    assert reply.status_code == 200


def test_restarted_replica_is_reachable_at_once(procs: Procs, tmp_path: Path) -> None:
    api = start_api_server(procs, heartbeat=0.3)
    port = free_port()
    env = {"ANYSERVE_TEST_DIR": str(tmp_path)}
    first = start_replica(procs, SLOW_APP, api_server=api, replica_id="phoenix", port=port, env=env)
    assert post(api, "/infer/json", text_body("x"), {"Type": "whoami"}).status_code == 200
    first.proc.stop(signal.SIGKILL)  # no unregister: the channel to it stays cached
    assert post(api, "/infer/json", text_body("x"), {"Type": "whoami"}).status_code == 503
    start_replica(procs, SLOW_APP, api_server=api, replica_id="phoenix", port=port, env=env)
    started = time.monotonic()
    wait_until(
        lambda: post(api, "/infer/json", text_body("x"), {"Type": "whoami"}).status_code == 200,
        timeout=5,
        interval=0.05,
        what="the restarted replica to answer",
    )
    assert time.monotonic() - started < 1.5


def test_shutdown_ends_open_streams(procs: Procs, tmp_path: Path) -> None:
    api = start_api_server(procs)
    start_replica(
        procs, SLOW_APP, api_server=api, replica_id="s", env={"ANYSERVE_TEST_DIR": str(tmp_path)}
    )
    with httpx.stream(
        "POST",
        api.url + "/infer/stream",
        json=text_body("never"),
        headers={"X-Capability-Type": "slow"},
        timeout=30,
    ) as reply:
        received = events(reply.iter_lines())
        assert output(next(received)) == "first"
        started = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        rest = list(received)
    assert time.monotonic() - started < 5
    assert rest and "shutting down" in rest[-1]["error"]
    assert api.proc.popen.wait(timeout=10) is not None


# ---------------------------------------------------------------------- the command line


def test_anyserve_api_server_command(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    proc = procs.start(
        [
            PY,
            "-m",
            "anyserve",
            "api-server",
            "--port",
            str(port),
            "--lease-ttl",
            "1",
            "--heartbeat-interval",
            "0.25",
            "--object-store",
            str(tmp_path / "objects"),
            "--log-level",
            "debug",
        ],
        name="cli-api",
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/health").status_code == 200, what="api-server up")
    reply = httpx.post(url + "/register", json=register_body("x"))
    assert reply.json()["lease_ttl"] == 1.0
    assert reply.json()["heartbeat_interval"] == 0.25
    proc.stop()
    assert "GET /health 200" in proc.output()  # debug level shows the quiet routes


def test_port_in_use_exits_non_zero(procs: Procs, api_server: ApiServer) -> None:
    proc = procs.start(
        [PY, "-m", "anyserve.api_server", "--port", str(api_server.port)], name="dup"
    )
    assert proc.popen.wait(timeout=15) != 0


def test_anyserve_api_server_takes_the_module_options() -> None:
    import subprocess

    help_text = subprocess.run(
        [PY, "-m", "anyserve", "api-server", "--help"], capture_output=True, text=True, timeout=30
    )
    assert help_text.returncode == 0
    assert help_text.stdout.startswith("usage: anyserve api-server")
    for flag in ("--token", "--grpc-port", "--max-body-size", "--lease-ttl", "--object-store"):
        assert flag in help_text.stdout, flag
    bad = subprocess.run(
        [PY, "-m", "anyserve", "api-server", "--port", "abc"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "invalid int value: 'abc'" in bad.stderr
    assert "Traceback" not in bad.stderr
