"""The client commands against `anyserve up` serving the MVP demo, run the way a user does:
from the folder of `anyserve.toml`, with no `--api-server` (the address comes from the file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import ROOT, Procs, free_port, wait_until

BIN = Path(sys.executable).parent / "anyserve"
ANYSERVE = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "anyserve"]
GROUPS = ("chat", "embed", "heavy", "stream")


def test_demo_under_up(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    groups = "".join(f'\n[replicas.{g}]\napp = "examples.mvp_demo.{g}_app:app"\n' for g in GROUPS)
    (tmp_path / "anyserve.toml").write_text(
        f'[api_server]\nhost = "127.0.0.1"\nport = {port}\n'
        "lease_ttl = 3\nheartbeat_interval = 0.5\n"
        f'\n[objects]\npath = "{tmp_path / "objects"}"\nttl = "1h"\n' + groups
    )
    up = procs.start(
        [*ANYSERVE, "up", "--no-tui", "--no-reload"],
        name="up",
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},  # the demo apps live in the repository's examples/
    )
    url = f"http://127.0.0.1:{port}"

    def all_registered() -> bool:
        replicas = httpx.get(url + "/registry", timeout=2).json()["replicas"]
        return len(replicas) >= len(GROUPS)

    try:
        wait_until(all_registered, timeout=60, what="the four demo groups registered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- anyserve up output:\n{up.output()[-4000:]}") from None

    def anyserve(*args: str, stdin: bytes | None = None) -> str:
        result = subprocess.run(
            [*ANYSERVE, *args], cwd=tmp_path, capture_output=True, input=stdin, timeout=60
        )
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    assert anyserve("call", "--cap", "type=chat", "Hello") == "[Chat Response] You said: Hello\n"
    assert anyserve("call", "--cap", "type=chat", "--stream", "Hi") == (
        "Hello world! This is streaming.\n"
    )
    heavy = anyserve("call", "--cap", "type=heavy", "--cap", "gpus=2", "--input", "data=x")
    fields = dict(line.split(": ", 1) for line in heavy.splitlines())
    assert fields["status"] == "completed"
    assert json.loads(anyserve("objects", "get", fields["result_ref"]))["input"] == "x"

    key = anyserve("objects", "put", "-", stdin=b"twelve chars").strip()
    embed = anyserve("call", "--cap", "type=embed", "--object", f"obj_ref={key}")
    assert embed == "embedding: [12.0, 2.0, 0.5]\n"

    table = anyserve("registry", "ls")
    for group in GROUPS:
        assert f"{group}-0" in table
    listed = json.loads(anyserve("registry", "ls", "--json"))
    assert {r["replica_id"].rsplit("-", 1)[0] for r in listed["replicas"]} >= {
        f"{g}-0" for g in GROUPS
    }
    assert key in {o["key"] for o in json.loads(anyserve("objects", "ls", "--json"))["objects"]}
    reply = json.loads(anyserve("call", "--cap", "type=chat", "--json", "Hello"))
    assert reply["outputs"][0]["contents"]["bytes_contents"] == ["[Chat Response] You said: Hello"]
