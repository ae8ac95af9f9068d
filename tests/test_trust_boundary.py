"""Attacks on the API server's registry and request parsing, performed for real.

A real API server and a real replica; the attacker is another local user: a child process
that dropped to uid 65534 (``nobody``) before it sends anything. Without root the
cross-user tests are skipped, since the attacker would be the owner itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import httpx
import pytest

from tests.conftest import ApiServer, Procs, free_port, start_api_server, start_replica

CHAT = "examples.mvp_demo.chat_app:app"
HELLO = {
    "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": ["hi"]}}
    ]
}

# The attacker's interpreter: one whose standard library uid 65534 can read (a virtualenv's
# may live in root's home, which that user cannot enter once the child has dropped to it).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")

as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or SYSTEM_PYTHON is None,
    reason="performing the attack as another local user needs root (to drop to uid 65534) "
    "and a system python3",
)

# Runs as uid 65534: sends each request and prints the statuses as JSON.
ATTACKER = """
import json, os, sys, urllib.error, urllib.request
os.setgroups([]); os.setgid(65534); os.setuid(65534)
url, steps = sys.argv[1], json.loads(sys.argv[2])
statuses = []
for method, path, body in steps:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            statuses.append(reply.status)
    except urllib.error.HTTPError as err:
        statuses.append(err.code)
print(json.dumps(statuses))
"""


def attack(url: str, steps: list[tuple[str, str, dict[str, Any]]]) -> list[int]:
    """Send ``steps`` as uid 65534 from a child process; the HTTP statuses they got."""
    done = subprocess.run(
        [str(SYSTEM_PYTHON), "-I", "-c", ATTACKER, url, json.dumps(steps)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    statuses: list[int] = json.loads(done.stdout)
    return statuses


def chat(api: ApiServer) -> httpx.Response:
    return httpx.post(
        api.url + "/infer/json", json=HELLO, headers={"X-Capability-Type": "chat"}, timeout=10
    )


@as_root
def test_another_user_cannot_take_over_or_remove_a_replica(procs: Procs) -> None:
    api = start_api_server(procs)
    owner = start_replica(procs, CHAT, api_server=api, replica_id="chat-replica")
    trap = f"127.0.0.1:{free_port()}"  # where the attacker wants the next user's requests
    caps = [{"type": "chat"}]
    statuses = attack(
        api.url,
        [
            # Re-register the id with the attacker's endpoint, without and with a made-up
            # instance; heartbeat it over; unregister it with no instance or a wrong one.
            ("POST", "/register", {"replica_id": "chat-replica", "endpoint": trap,
                                   "capabilities": caps}),
            ("POST", "/register", {"replica_id": "chat-replica", "endpoint": trap,
                                   "capabilities": caps, "instance": "guess"}),
            ("POST", "/heartbeat", {"replica_id": "chat-replica", "endpoint": trap,
                                    "capabilities": caps}),
            ("DELETE", "/unregister", {"replica_id": "chat-replica"}),
            ("DELETE", "/unregister", {"replica_id": "chat-replica", "instance": "guess"}),
        ],
    )  # fmt: skip
    assert statuses == [403, 409, 403, 403, 409]
    [record] = api.registry()
    assert (record["replica_id"], record["endpoint"]) == ("chat-replica", owner.endpoint)
    assert "instance" not in record  # the lease's secret is never shown
    reply = chat(api)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-anyserve-replica"] == "chat-replica"


def test_hand_registrations_keep_the_seed_behaviour(api_server: ApiServer) -> None:
    # The seed's curl lines: register an id by hand, replace it, DELETE it by id.
    body = {"replica_id": "manual", "endpoint": "127.0.0.1:50099", "capabilities": [{"x": 1}]}
    assert httpx.post(api_server.url + "/register", json=body).json()["success"] is True
    body["endpoint"] = "127.0.0.1:50098"
    assert httpx.post(api_server.url + "/register", json=body).status_code == 200
    gone = httpx.request("DELETE", api_server.url + "/unregister", json={"replica_id": "manual"})
    assert gone.status_code == 200 and api_server.registry() == []


def test_the_token_holder_may_remove_any_replica(procs: Procs) -> None:
    token = "t0ken-for-the-owner"
    env = {"ANYSERVE_TOKEN": token}
    api = start_api_server(procs, extra=["--token", token])
    start_replica(procs, CHAT, api_server=api, replica_id="chat-replica", env=env)
    bearer = {"Authorization": f"Bearer {token}"}
    gone = httpx.request(
        "DELETE", api.url + "/unregister", json={"replica_id": "chat-replica"}, headers=bearer
    )
    assert gone.status_code == 200, gone.text
    assert httpx.get(api.url + "/registry", headers=bearer).json()["total"] == 0


@pytest.mark.parametrize("depth", ["\u00b2", "\u0663", "99999999999999999999", "-1", "1e3"])
def test_odd_delegation_depths_are_400(api_server: ApiServer, depth: str) -> None:
    # As the bytes a client would send: "²" is one latin-1 byte that str.isdigit() accepts.
    try:
        raw = depth.encode("latin-1")
    except UnicodeEncodeError:
        raw = depth.encode("utf-8")
    reply = httpx.post(
        api_server.url + "/infer/json",
        json=HELLO,
        headers={"X-Capability-Type": "chat", "X-Delegation-Depth": raw},
    )
    assert reply.status_code == 400, reply.text
    assert "X-Delegation-Depth" in reply.json()["detail"]


def test_registrations_from_all_of_loopback_share_one_rate_limit(procs: Procs) -> None:
    api = start_api_server(procs, extra=["--register-rate", "1", "--register-burst", "2"])
    statuses = []
    for n, source in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]):
        body = {"replica_id": f"r{n}", "endpoint": "127.0.0.1:50001", "capabilities": [{"x": 1}]}
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
            statuses.append(client.post(api.url + "/register", json=body).status_code)
    # A burst of 2: a new 127.x.y.z address does not buy a new bucket.
    assert statuses[:2] == [200, 200]
    assert 429 in statuses[2:]


def test_a_registration_of_40k_capabilities_is_refused(api_server: ApiServer) -> None:
    # Under the 1 MiB registration limit, 40,000 capabilities once made every 404 take
    # seconds of the event loop; now the registration is refused and 404s stay cheap.
    body = {
        "replica_id": "flood",
        "endpoint": "127.0.0.1:50097",
        "capabilities": [{"t": str(n)} for n in range(40_000)],
    }
    assert len(json.dumps(body)) < 1024 * 1024
    reply = httpx.post(api_server.url + "/register", json=body, timeout=30)
    assert reply.status_code == 400 and "at most 256 capabilities" in reply.json()["detail"]
    assert api_server.registry() == []
    miss = httpx.post(api_server.url + "/infer/json", json=HELLO, headers={"X-Capability-T": "x"})
    assert miss.status_code == 404
