"""One body limit for the API server and its replicas, end to end under ``anyserve up``.

``[api_server] max_body_size = "100MiB"`` raises what the API server accepts and, through
the command line ``up`` builds for each replica, what the replicas accept over gRPC: an
80 MiB body (over the 64 MiB default of both) reaches the handler whole.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.apps.up_support import leftovers, registered, up_args
from tests.conftest import ROOT, Procs, free_port, wait_until

MIB = 1024 * 1024


def text_body(size: int) -> bytes:
    """A /infer/json body whose one BYTES input is ``size`` characters long."""
    head = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
    return head + b'"contents": {"bytes_contents": ["' + b"x" * size + b'"]}}]}'


@pytest.mark.slow
def test_raising_max_body_size_raises_what_replicas_accept(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # the test app, importable from here
    (tmp_path / "anyserve.toml").write_text(
        f"""
[api_server]
host = "127.0.0.1"
port = {port}
max_body_size = "100MiB"

[objects]
path = "{tmp_path / "objects"}"

[replicas.count]
app = "tests.apps.flood_app:app"
"""
    )
    url = f"http://127.0.0.1:{port}"
    up = procs.start(up_args(tmp_path / "anyserve.toml"), name="up", cwd=tmp_path)
    wait_until(lambda: registered(url, "count-"), timeout=30, what="the count replica")
    headers = {"Content-Type": "application/json", "X-Capability-Type": "count"}
    with httpx.Client(timeout=120) as client:
        size = 80 * MIB
        reply = client.post(url + "/infer/json", content=text_body(size), headers=headers)
        assert reply.status_code == 200, reply.text[:500]
        [length] = reply.json()["outputs"]
        assert length["contents"]["int64_contents"] == [size]
        # Past the raised limit: 413 from the API server, before the body is read.
        over = client.post(url + "/infer/json", content=text_body(110 * MIB), headers=headers)
        assert over.status_code == 413, over.text[:500]
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(timeout=30) == 130
    assert leftovers(str(tmp_path)) == []
