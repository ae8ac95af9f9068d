"""Start-up: ``anyserve --help``, ``anyserve up`` of the demo, and file save → new code answering.

``anyserve up`` runs a copy of the demo topology (``anyserve.toml`` at the repository root)
in a temp directory: the same four replica groups, their apps copied into a temp package
so that editing one does not touch the repository, the API server on a free port and the
replicas on free ports. The reload figure edits the copied ``stream_app.py`` (its echo
handler's answer) and polls ``/infer/json`` until the new answer comes back.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.servers import ROOT, Child, Children, anyserve_command, free_port, wait_until
from benchmarks.settings import Settings
from benchmarks.unary import JSON_BODY

DEMO = ROOT / "examples" / "mvp_demo"
PACKAGE = "benchdemo"
GROUPS = {
    "chat": "chat_app",
    "embed": "embed_app",
    "heavy": "heavy_app",
    "stream": "stream_app",
}
#: The text of the echo handler's answer that a reload changes.
ECHO_MARK = 'f"Echo: {'
UP_TIMEOUT = 60.0
RELOAD_TIMEOUT = 30.0


def help_time(settings: Settings) -> dict[str, Any]:
    """Wall time of ``anyserve --help`` (median of ``help_reps`` runs)."""
    runs = []
    for _ in range(settings.help_reps):
        t0 = time.perf_counter()
        subprocess.run(
            [*anyserve_command(), "--help"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        runs.append(time.perf_counter() - t0)
    settings.progress(f"anyserve --help {statistics.median(runs):.3f} s")
    return {"median_s": round(statistics.median(runs), 4), "runs_s": [round(r, 4) for r in runs]}


def up_available() -> str | None:
    """None when ``anyserve up`` exists, else why not."""
    done = subprocess.run(
        [*anyserve_command(), "up", "--help"], capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        return None
    text = (done.stderr or done.stdout).strip()
    return text.splitlines()[-1] if text else f"anyserve up --help exited {done.returncode}"


def write_topology(work: Path) -> tuple[Path, str]:
    """The demo topology under ``work`` on free ports; returns the file and the API URL."""
    package = work / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for module in GROUPS.values():
        shutil.copy(DEMO / f"{module}.py", package / f"{module}.py")
    port = free_port()
    lines = [
        "[api_server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "",
        "[objects]",
        f'path = "{work / "objects"}"',
        'ttl = "1h"',
    ]
    for group, module in GROUPS.items():
        lines += ["", f"[replicas.{group}]", f'app = "{PACKAGE}.{module}:app"']
    file = work / "anyserve.toml"
    file.write_text("\n".join(lines) + "\n")
    return file, f"http://127.0.0.1:{port}"


def _registered(url: str) -> int:
    return int(httpx.get(url + "/registry", timeout=1).json()["total"])


def _replicas(child: Child) -> int:
    """How many replica processes ``anyserve up`` runs now."""
    try:
        procs = psutil.Process(child.pid).children(recursive=True)
    except psutil.Error:
        return -1
    count = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if "replica" in proc.cmdline():
                count += 1
    return count


def _echo(client: httpx.Client, url: str) -> str:
    reply = client.post(
        url + "/infer/json",
        content=JSON_BODY,
        headers={"Content-Type": "application/json", "X-Capability-Type": "echo"},
        timeout=5,
    )
    if reply.status_code != 200:
        raise RuntimeError(f"status {reply.status_code}: {reply.text[:200]}")
    return str(reply.json()["outputs"][0]["contents"]["bytes_contents"][0])


def up_and_reload(children: Children, settings: Settings) -> dict[str, Any]:
    """``{"up": {...}, "reload": {...}}``; each with ``status`` ok, unavailable or failed."""
    reason = up_available()
    if reason is not None:
        settings.progress(f"anyserve up unavailable: {reason}")
        unavailable = {"status": "unavailable", "reason": reason}
        return {"up": unavailable, "reload": dict(unavailable)}
    work = children.dir / "up"
    file, url = write_topology(work)
    t0 = time.perf_counter()
    argv = [*anyserve_command(), "up", "--no-tui", "-c", str(file)]
    child = children.start("anyserve-up", argv, cwd=work)
    # When the API server first answered and when the first replica showed up: where the
    # start-up time goes.
    seen: dict[str, float] = {}

    def all_registered() -> bool:
        child.check()
        count = _registered(url)
        now = time.perf_counter() - t0
        seen.setdefault("api_server_s", now)
        if count:
            seen.setdefault("first_replica_s", now)
        return count >= len(GROUPS)

    try:
        try:
            wait_until(all_registered, UP_TIMEOUT, "every demo replica in /registry", 0.01)
        except RuntimeError as exc:
            failed = {"status": "failed", "reason": f"{exc}\n{child.output(1500)}"}
            return {"up": failed, "reload": {"status": "failed", "reason": "anyserve up failed"}}
        up_s = time.perf_counter() - t0
        settings.progress(f"anyserve up: {len(GROUPS)} replicas registered in {up_s:.2f} s")
        up = {"status": "ok", "registered_s": round(up_s, 3), "replicas": len(GROUPS)}
        up.update({key: round(value, 3) for key, value in seen.items()})
        # A save while a replica is still starting (registered, but not yet seen ready by
        # the supervisor) kills and restarts it rather than reloading it in turn: that is
        # start-up, not the reload this figure is about. Wait until up says every slot is
        # ready (bounded: if the message changes, the reloads still run).
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: _ready_slots(child) >= len(GROUPS), 10.0, "every slot ready")
        return {"up": up, "reload": _reloads(child, work, url, settings)}
    finally:
        children.stop(child, signal.SIGINT, grace=20)


def _ready_slots(child: Child) -> int:
    """How many replica slots ``anyserve up`` has said are ready (``<group>.0 | ... ready``)."""
    child.check()
    lines = child.log.read_text(errors="replace").splitlines()
    return len({line.split("|", 1)[0] for line in lines if "] ready (registered)" in line})


def _reloads(child: Child, work: Path, url: str, settings: Settings) -> dict[str, Any]:
    source = work / PACKAGE / "stream_app.py"
    original = source.read_text()
    if ECHO_MARK not in original:
        return {"status": "unavailable", "reason": f"{ECHO_MARK} not found in stream_app.py"}
    runs: list[float] = []
    failures = 0
    reasons: list[str] = []
    with httpx.Client() as client:
        for n in range(1, settings.reloads + 1):
            wanted = f"Echo v{n}: hi"
            source.write_text(original.replace(ECHO_MARK, f'f"Echo v{n}: {{'))
            t0 = time.perf_counter()
            deadline = t0 + RELOAD_TIMEOUT
            while True:
                try:
                    if _echo(client, url) == wanted:
                        break
                except (RuntimeError, httpx.HTTPError) as exc:
                    failures += 1  # a reload should never fail a request (SPEC §7)
                    reason = f"reload {n}: {type(exc).__name__}: {exc}"[:300]
                    if len(reasons) < 5 and reason not in reasons:
                        reasons.append(reason)
                if time.perf_counter() > deadline:
                    return {
                        "status": "failed",
                        "reason": f"no {wanted!r} within {RELOAD_TIMEOUT:g}s\n{child.output(1500)}",
                    }
                time.sleep(0.01)
            runs.append(time.perf_counter() - t0)
            settings.progress(f"reload {n}: new code answering after {runs[-1]:.2f} s")
            # Let the old replica leave and exit before the next save, so that each figure
            # is one reload and not the tail of the previous one.
            wait_until(
                lambda: _registered(url) == len(GROUPS) and _replicas(child) == len(GROUPS),
                RELOAD_TIMEOUT,
                "the old replica to exit",
            )
    return {
        "status": "ok",
        "median_s": round(statistics.median(runs), 3),
        "runs_s": [round(r, 3) for r in runs],
        "failed_requests": failures,
        "failures": reasons,
    }
