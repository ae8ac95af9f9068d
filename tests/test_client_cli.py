"""End to end: the installed ``anyserve`` client commands against a real API server and the
demo replicas, started once for the module (chat, embed, heavy, stream) on free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import ApiServer, Procs, free_port, start_api_server, start_replica

BIN = Path(sys.executable).parent / "anyserve"
ANYSERVE = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "anyserve"]
GROUPS = {
    "chat-0": "examples.mvp_demo.chat_app:app",
    "embed-0": "examples.mvp_demo.embed_app:app",
    "heavy-0": "examples.mvp_demo.heavy_app:app",
    "stream-0": "examples.mvp_demo.stream_app:app",
}


@dataclass
class Demo:
    api: ApiServer
    store: Path

    @property
    def url(self) -> str:
        return self.api.url


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("demo")
    store = tmp / "objects"
    procs = Procs(tmp)
    try:
        api = start_api_server(procs, extra=["--object-store", str(store)])
        for rid, app in GROUPS.items():
            # A slower stream makes "tokens arrive one by one" measurable.
            env = {"ANYSERVE_DEMO_TOKEN_DELAY": "0.1"} if rid.startswith("stream") else None
            start_replica(procs, app, api_server=api, object_store=store, replica_id=rid, env=env)
        yield Demo(api, store)
    finally:
        procs.stop_all()


def run(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ANYSERVE_")}
    result = subprocess.run(
        [*ANYSERVE, *args],
        capture_output=True,
        env={**full_env, **(env or {})},
        cwd=str(cwd) if cwd else None,
        input=stdin,
        timeout=timeout,
    )
    out = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out


def ok(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = run(*args, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    return result


# --------------------------------------------------------------------------- call


def test_call_chat_prints_the_text(demo: Demo) -> None:
    result = ok("call", "--api-server", demo.url, "--cap", "type=chat", "Hello")
    assert result.stdout == "[Chat Response] You said: Hello\n"


def test_call_json_and_explain(demo: Demo) -> None:
    result = ok(
        "call",
        "--api-server",
        demo.url,
        "-c",
        "type=chat",
        "-c",
        "model=demo",
        "--json",
        "--explain",
        "Hi there",
    )
    reply = json.loads(result.stdout)
    assert reply["outputs"][0]["contents"]["bytes_contents"] == [
        "[Chat Response] You said: Hi there"
    ]
    assert "answered by: chat-0" in result.stderr
    assert "chat-0 (0 in flight)" in result.stderr


def test_call_with_a_body_file(demo: Demo, tmp_path: Path) -> None:
    body = tmp_path / "req.json"
    body.write_text(
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [1],
                        "contents": {"bytes_contents": ["from a file"]},
                    }
                ]
            }
        )
    )
    result = ok("call", "--api-server", demo.url, "--cap", "type=echo", "--body", f"@{body}")
    assert result.stdout == "Echo: from a file\n"
    result = ok(
        "call",
        "--api-server",
        demo.url,
        "--cap",
        "type=echo",
        "--body",
        "@-",
        stdin=body.read_bytes(),
    )
    assert result.stdout == "Echo: from a file\n"


def test_stream_prints_tokens_as_they_arrive(demo: Demo) -> None:
    args = [*ANYSERVE, "call", "--api-server", demo.url, "--cap", "type=chat", "--stream", "Hi"]
    start = time.monotonic()
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read1(1024)  # type: ignore[attr-defined]
        first_at = time.monotonic()
        rest = proc.stdout.read()
        done_at = time.monotonic()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == 0, err
    assert (first + rest).decode() == "Hello world! This is streaming.\n"
    assert first.decode().startswith("Hello")
    # 11 tokens 0.1 s apart: the first must be on screen long before the last.
    assert done_at - first_at > 0.5, (first_at - start, done_at - start, first)


def test_stream_raw_prints_each_event(demo: Demo) -> None:
    result = ok("call", "--api-server", demo.url, "--cap", "type=chat", "--stream", "--raw", "Hi")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 11
    tokens = [
        o["contents"]["bytes_contents"][0]
        for e in events
        for o in e["outputs"]
        if o["name"] == "text_output"
    ]
    assert "".join(tokens) == "Hello world! This is streaming."
    # --json with --stream is the same JSON Lines output.
    result = ok("call", "--api-server", demo.url, "--cap", "type=chat", "--stream", "--json", "Hi")
    assert len([json.loads(line) for line in result.stdout.splitlines()]) == 11


def test_heavy_result_ref_is_fetched_with_objects_get(demo: Demo, tmp_path: Path) -> None:
    result = ok(
        "call",
        "--api-server",
        demo.url,
        "--cap",
        "type=heavy",
        "--cap",
        "gpus=2",
        "--input",
        "data=x",
    )
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["status"] == "completed"
    fetched = ok("objects", "get", lines["result_ref"], "--api-server", demo.url)
    assert json.loads(fetched.stdout)["processed"] == "X"
    # The path form of the ref works too, and -o writes a file.
    out = tmp_path / "result.json"
    ok("objects", "get", lines["result_path"], "-o", str(out), "--api-server", demo.url)
    assert json.loads(out.read_text())["input"] == "x"


def test_object_passed_by_reference(demo: Demo, tmp_path: Path) -> None:
    data = tmp_path / "doc.txt"
    data.write_text("sixteen chars!!!")
    key = ok("objects", "put", str(data), "--api-server", demo.url).stdout.strip()
    assert key
    result = ok(
        "call", "--api-server", demo.url, "--cap", "type=embed", "--object", f"obj_ref={key}"
    )
    # Computed from the object's 16 characters, not from the key's length.
    assert result.stdout == "embedding: [16.0, 6.0, 0.5]\n"
    typed = ok("call", "--api-server", demo.url, "-c", "type=embed", "--input", "text=abc")
    assert typed.stdout == "embedding: [3.0, 3.0, 0.5]\n"


# --------------------------------------------------------------------------- registry


def test_registry_ls_lists_every_group(demo: Demo) -> None:
    result = ok("registry", "ls", "--api-server", demo.url)
    for rid in GROUPS:
        assert rid in result.stdout
    assert "type=chat (stream)" in result.stdout  # labels as every other table shows them
    data = json.loads(ok("registry", "ls", "--json", "--api-server", demo.url).stdout)
    assert data["total"] == len(GROUPS)
    assert {r["replica_id"] for r in data["replicas"]} == set(GROUPS)
    chat = json.loads(
        ok("registry", "ls", "--cap", "type=chat", "--json", "--api-server", demo.url).stdout
    )
    assert {r["replica_id"] for r in chat["replicas"]} == {"chat-0", "stream-0"}


def test_registry_rm(demo: Demo) -> None:
    reply = httpx.post(
        demo.url + "/register",
        json={"replica_id": "ghost", "endpoint": "127.0.0.1:1", "capabilities": [{"type": "x"}]},
        timeout=5,
    )
    assert reply.status_code == 200, reply.text
    assert ok("registry", "rm", "ghost", "--api-server", demo.url).stdout == "removed ghost\n"
    assert "ghost" not in ok("registry", "ls", "--api-server", demo.url).stdout
    missing = run("registry", "rm", "ghost", "--api-server", demo.url)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and "ghost" in missing.stderr


# --------------------------------------------------------------------------- objects


def test_objects_through_the_api_server(demo: Demo, tmp_path: Path) -> None:
    src = tmp_path / "data.json"
    src.write_text('{"a": 1}')
    ref = json.loads(
        ok(
            "objects",
            "put",
            str(src),
            "--key",
            "cli-obj",
            "--type",
            "json",
            "--json",
            "--api-server",
            demo.url,
        ).stdout
    )
    assert ref["key"] == "cli-obj" and ref["content_type"] == "json" and ref["size"] == 8
    listed = json.loads(ok("objects", "ls", "--json", "--api-server", demo.url).stdout)
    assert "cli-obj" in {o["key"] for o in listed["objects"]}
    assert "cli-obj" in ok("objects", "ls", "--api-server", demo.url).stdout
    piped = ok(
        "objects", "put", "-", "--key", "from-stdin", "--api-server", demo.url, stdin=b"piped bytes"
    )
    assert piped.stdout == "from-stdin\n"
    assert ok("objects", "get", "from-stdin", "--api-server", demo.url).stdout == "piped bytes"
    assert ok("objects", "rm", "cli-obj", "--api-server", demo.url).stdout == "removed cli-obj\n"
    gone = run("objects", "get", "cli-obj", "-o", str(tmp_path / "x"), "--api-server", demo.url)
    assert gone.returncode == 1 and "cli-obj" in gone.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.part-*"))
    bad_json = run(
        "objects", "put", "-", "--type", "json", "--api-server", demo.url, stdin=b"{nope"
    )
    assert bad_json.returncode == 1 and "JSON" in bad_json.stderr
    kept = json.loads(
        ok("objects", "gc", "--older-than", "1h", "--json", "--api-server", demo.url).stdout
    )
    assert "from-stdin" not in kept["removed"]
    swept = json.loads(
        ok("objects", "gc", "--older-than", "0s", "--json", "--api-server", demo.url).stdout
    )
    assert "from-stdin" in swept["removed"]


def test_objects_directly_on_a_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    key = ok("objects", "put", str(src), "--object-store", str(store)).stdout.strip()
    listed = json.loads(ok("objects", "ls", "--json", "--object-store", str(store)).stdout)
    assert [o["key"] for o in listed["objects"]] == [key]
    out = tmp_path / "copy.bin"
    ok("objects", "get", key, "-o", str(out), "--object-store", str(store))
    assert out.read_bytes() == src.read_bytes()
    result = ok("objects", "gc", "--older-than", "1h", "--object-store", str(store))
    assert result.stdout == "removed 0 object(s) older than 1h\n"
    ok("objects", "rm", key, "--object-store", str(store))
    assert (
        json.loads(ok("objects", "ls", "--json", "--object-store", str(store)).stdout)["total"] == 0
    )
    both = run("objects", "ls", "--object-store", str(store), "--api-server", "http://x:1")
    assert both.returncode == 2


# --------------------------------------------------------------------------- failures


def test_server_down_is_one_line_and_exit_1() -> None:
    port = free_port()
    for args in (["call", "--cap", "type=chat", "Hello"], ["registry", "ls"], ["objects", "ls"]):
        result = run(*args, "--api-server", f"http://127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr == f"error: API server not reachable at http://127.0.0.1:{port}\n"
        assert result.stdout == ""


def test_unknown_capability_shows_the_404_message(demo: Demo) -> None:
    result = run("call", "--api-server", demo.url, "--cap", "type=nope", "Hello")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no replica serves")
    assert "type=nope" in result.stderr and "type=chat" in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["call", "--cap", "type", "Hello"],
        ["call", "--cap", "=chat", "Hello"],
        ["call", "Hello"],
        ["call", "--cap", "type=chat", "--input", "x:FP32=a"],
        ["registry", "ls", "--cap", "nokey"],
        ["objects", "gc", "--older-than", "soon"],
    ],
)
def test_malformed_arguments_are_usage_errors(args: list[str]) -> None:
    result = run(*args, "--api-server", "http://127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run("objects", "put", str(tmp_path / "nope.bin"), "--api-server", "http://x:1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot read") and len(result.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- where the server is


def test_api_server_from_env_and_anyserve_toml(demo: Demo, tmp_path: Path) -> None:
    # No --api-server: the environment variable names the server.
    result = ok("call", "-c", "type=chat", "env", env={"ANYSERVE_API_SERVER": demo.url})
    assert result.stdout == "[Chat Response] You said: env\n"
    # Else anyserve.toml in the current folder; a wildcard host means this machine.
    (tmp_path / "anyserve.toml").write_text(
        f'[api_server]\nhost = "0.0.0.0"\nport = {demo.api.port}\n'
    )
    result = ok("call", "-c", "type=chat", "toml", cwd=tmp_path)
    assert result.stdout == "[Chat Response] You said: toml\n"
    # The environment comes before the file.
    dead = f"http://127.0.0.1:{free_port()}"
    result = run("registry", "ls", cwd=tmp_path, env={"ANYSERVE_API_SERVER": dead})
    assert result.returncode == 1 and dead in result.stderr
    # And the option before both.
    ok("registry", "ls", "--api-server", demo.url, cwd=tmp_path, env={"ANYSERVE_API_SERVER": dead})
    # With neither, the default address (nothing listens there in tests, or something does).
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("registry", "ls", "--json", cwd=empty)
    assert result.returncode == 0 or "http://127.0.0.1:8080" in result.stderr


# --------------------------------------------------------------------------- large objects


# Runs a command and reports its peak RSS. The measuring parent must be small: Linux keeps
# the pre-exec high-water mark of the forking process in ru_maxrss, so measuring straight
# from pytest would count pytest's own memory.
_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nMAXRSS {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}\\n")
"""


def _peak_rss_mb(args: list[str]) -> float:
    """Run a command to completion; its peak resident memory in MiB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYSERVE_")}
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, env=env, timeout=300
    )
    last = result.stderr.decode().strip().splitlines()[-1]
    _, kib, code = last.split()
    assert code == "0", result.stderr.decode()
    return int(kib) / 1024  # Linux reports KiB


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_200mb_round_trip_keeps_memory_flat(procs: Procs, tmp_path: Path) -> None:
    api = start_api_server(procs, extra=["--object-store", str(tmp_path / "store")])
    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with src.open("wb") as f:
        for i in range(200):
            f.write(block[i:] + block[:i])  # no two MiB alike
    out = tmp_path / "back.bin"
    put_mb = _peak_rss_mb(
        [*ANYSERVE, "objects", "put", str(src), "--key", "big", "--api-server", api.url]
    )
    get_mb = _peak_rss_mb(
        [*ANYSERVE, "objects", "get", "big", "-o", str(out), "--api-server", api.url]
    )
    print(f"peak RSS: put {put_mb:.0f} MiB, get {get_mb:.0f} MiB")
    assert out.stat().st_size == 200 << 20
    assert _sha256(out) == _sha256(src)
    assert put_mb < 100 and get_mb < 100


def test_progress_bar_on_a_terminal(procs: Procs, tmp_path: Path) -> None:
    import pty

    api = start_api_server(procs, extra=["--object-store", str(tmp_path / "store")])
    src = tmp_path / "five.bin"
    src.write_bytes(os.urandom(5 << 20))
    primary, secondary = pty.openpty()
    args = [*ANYSERVE, "objects", "put", str(src), "--key", "five", "--api-server", api.url]
    # Read the terminal while the command runs, so it never blocks on a full pty buffer.
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=secondary) as proc:
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: every writer of the terminal has exited
                break
            if not chunk:
                break
            seen += chunk
        os.close(primary)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        returncode = proc.wait(timeout=60)
    assert returncode == 0
    assert stdout == b"five\n"  # stdout stays clean for scripts
    assert b"put five.bin" in seen and b"MB" in seen


def test_stream_timeout_ends_with_one_error_line(demo: Demo) -> None:
    result = run(
        "call", "--api-server", demo.url, "-c", "type=chat", "--stream", "--timeout", "0.3", "Hi"
    )
    assert result.returncode == 1
    assert result.stdout.startswith("Hello") and result.stdout.endswith("\n")
    assert result.stdout != "Hello world! This is streaming.\n"
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_registry_rm_keeps_a_live_replica_out(procs: Procs) -> None:
    # A replica's lease belongs to its process: removing it takes the API server's token.
    token = {"ANYSERVE_TOKEN": "rm-token"}
    api = start_api_server(procs, extra=["--token", "rm-token"])
    start_replica(procs, GROUPS["chat-0"], api_server=api, replica_id="doomed", env=token)
    refused = run("registry", "rm", "doomed", "--api-server", api.url)
    assert refused.returncode == 1 and "token" in refused.stderr
    removed = ok("registry", "rm", "doomed", "--api-server", api.url, env=token)
    assert removed.stdout == "removed doomed\n"
    time.sleep(1.5)  # three heartbeat intervals: they must not re-register it
    assert "doomed" not in ok("registry", "ls", "--api-server", api.url, env=token).stdout
    gone = run("call", "-c", "type=chat", "Hello", "--api-server", api.url, env=token)
    assert gone.returncode == 1 and gone.stderr.startswith("error: no replica serves")


def test_registry_rm_of_a_live_replica_is_refused_without_the_token(procs: Procs) -> None:
    api = start_api_server(procs)
    start_replica(procs, GROUPS["chat-0"], api_server=api, replica_id="doomed")
    # Without the API server's token a live replica's lease belongs to its process: a
    # stranger's `rm` is refused with what to do, and the replica keeps serving.
    refused = run("registry", "rm", "doomed", "--api-server", api.url)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith("error: unregister refused: replica id 'doomed'")
    assert "Traceback" not in refused.stderr
    assert "doomed" in ok("registry", "ls", "--api-server", api.url).stdout
    assert ok("call", "-c", "type=chat", "Hello", "--api-server", api.url).stdout.strip()
