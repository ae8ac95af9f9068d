"""Helpers for the `anyserve up` tests: a topology and an app in a temp dir, CLI runs,
and a psutil check that nothing was left running."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import ROOT, free_port

PY = sys.executable

ECHO_APP = """\
import time

from anyserve import AnyServe
from anyserve.tensors import make_response, stream_chunk

app = AnyServe(name="echo")
VERSION = "{version}"
TOKENS = 20


@app.capability(type="echo")
def echo(request):
    return make_response(request, text_output=VERSION)


@app.capability(type="echo", stream=True)
def tokens(request, context, stream):
    for i in range(TOKENS):
        stream.send(stream_chunk(request, f"t{{i}}", "stop" if i == TOKENS - 1 else ""))
        time.sleep(0.3)
"""

BROKEN_APP = """\
import sys

print("broken app: about to fail", file=sys.stderr)
raise RuntimeError("boom: this app always fails at import")
"""


def write_app(root: Path, version: str = "v1") -> Path:
    """``upapp/echo.py`` answering ``version``; ``upapp/broken.py`` that never imports."""
    pkg = root / "upapp"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text(BROKEN_APP)
    handler = pkg / "echo.py"
    handler.write_text(ECHO_APP.format(version=version))
    return handler


def write_topology(root: Path, groups: str, *, api_port: int | None = None) -> Path:
    """An anyserve.toml with a fast-lease API server on a free port plus ``groups``."""
    port = api_port or free_port()
    text = textwrap.dedent(
        f"""\
        [api_server]
        host = "127.0.0.1"
        port = {port}
        lease_ttl = 3
        heartbeat_interval = 0.5

        [objects]
        path = "{root / "objects"}"
        ttl = "1h"
        """
    ) + textwrap.dedent(groups)
    path = root / "anyserve.toml"
    path.write_text(text)
    return path


def api_url(topology: Path) -> str:
    for line in topology.read_text().splitlines():
        if line.startswith("port ="):
            return f"http://127.0.0.1:{line.split('=')[1].strip()}"
    raise AssertionError("no port in topology")


def cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the ``anyserve`` command line the way a user would."""
    return subprocess.run(
        [PY, "-m", "anyserve", *args],
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, Any]:
    """What `anyserve ps --json` sees, straight from the control socket (cheap to poll)."""
    from anyserve.control import request

    result: dict[str, Any] = request(root / ".anyserve", "ps")
    return result


def process(root: Path, name: str, role_ok: bool = True) -> dict[str, Any] | None:
    """The serving process row called ``name`` (the newest if a reload shows two)."""
    rows = [p for p in snapshot(root)["processes"] if p["name"] == name]
    return rows[-1] if rows else None


def registered(url: str, prefix: str) -> list[dict[str, Any]]:
    replicas = httpx.get(url + "/registry", timeout=2).json()["replicas"]
    return [r for r in replicas if str(r["replica_id"]).startswith(prefix)]


def infer(client: httpx.Client, url: str, cap: str = "echo") -> str:
    reply = client.post(
        url + "/infer/json",
        headers={"X-Capability-Type": cap},
        json={
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "contents": {"bytes_contents": ["hi"]},
                }
            ]
        },
        timeout=10,
    )
    reply.raise_for_status()
    return str(reply.json()["outputs"][0]["contents"]["bytes_contents"][0])


@dataclass
class Traffic:
    """A client sending requests back to back; every answer and failure is kept."""

    url: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                try:
                    self.answers.append((time.monotonic(), infer(client, self.url)))
                except Exception as exc:
                    self.failures.append(repr(exc))

    @contextmanager
    def running(self) -> Iterator[Traffic]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(15)

    def latest(self) -> str | None:
        return self.answers[-1][1] if self.answers else None


def stream_tokens(url: str, cap: str = "echo") -> list[str]:
    """Read a whole /infer/stream answer: each chunk's text, ``ERROR: ...`` for an error."""
    body = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["s"]},
            }
        ]
    }
    got: list[str] = []
    with httpx.stream(
        "POST", url + "/infer/stream", json=body, headers={"X-Capability-Type": cap}, timeout=30
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[len("data: ") :])
            if "error" in data:
                got.append(f"ERROR: {data['error']}")
                continue
            outputs = {o["name"]: o["contents"]["bytes_contents"][0] for o in data["outputs"]}
            got.append(str(outputs["text_output"]))
    return got


def leftovers(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``marker`` (the test's temp dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def up_args(topology: Path, *extra: str) -> list[str]:
    return [PY, "-m", "anyserve", "up", "--no-tui", "-c", str(topology), *extra]


__all__ = ["ROOT"]
