"""The MVP demo as its README runs it: run_demo.sh, the seed curl commands, the test clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .conftest import ROOT, Procs, free_port, wait_until

DEMO = ROOT / "examples" / "mvp_demo"


def curl(*args: str) -> str:
    result = subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="the demo script and README use curl")
def test_run_demo_serves_the_readme_commands(procs: Procs, tmp_path: Path) -> None:
    ports = {name: str(free_port()) for name in ("API", "CHAT", "EMBED", "HEAVY", "STREAM")}
    env = {f"{name}_PORT": port for name, port in ports.items()}
    env["ANYSERVE_OBJECT_STORE"] = str(tmp_path / "objects")
    env["PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    demo = procs.start(["bash", str(DEMO / "run_demo.sh")], name="demo", env=env)
    wait_until(
        lambda: "Press Ctrl-C" in demo.output() or not demo.alive(),
        timeout=60,
        what="the demo to come up",
    )
    assert demo.alive(), demo.output()
    base = f"http://localhost:{ports['API']}"

    registry = json.loads(curl(f"{base}/registry"))
    assert registry["total"] == 4
    body = (
        '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
        '"contents": {"bytes_contents": ["Hello World"]}}]}'
    )
    chat = json.loads(
        curl(
            "-X",
            "POST",
            f"{base}/infer/json",
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Capability-Type: chat",
            "-d",
            body,
        )
    )
    assert chat["outputs"][0]["contents"]["bytes_contents"] == [
        "[Chat Response] You said: Hello World"
    ]
    stream = curl(
        "-N",
        "-X",
        "POST",
        f"{base}/infer/stream",
        "-H",
        "Content-Type: application/json",
        "-H",
        "X-Capability-Type: chat",
        "-d",
        (
            '{"model_name": "chat", "inputs": [{"name": "text", "datatype": "BYTES", '
            '"shape": [1], "contents": {"bytes_contents": ["Hello"]}}]}'
        ),
    )
    events = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:")]
    tokens = [e["outputs"][0]["contents"]["bytes_contents"][0] for e in events]
    assert "".join(tokens) == "Hello world! This is streaming."

    for client in ("test_client.py", "test_stream_client.py"):
        result = subprocess.run(
            [sys.executable, str(DEMO / client), base], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr

    children = psutil.Process(demo.pid).children(recursive=True)
    assert len(children) >= 5
    os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole group
    assert demo.popen.wait(timeout=30) is not None
    wait_until(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
        timeout=15,
        what="the demo's processes to stop",
    )
    assert "Stopped." in demo.output()
