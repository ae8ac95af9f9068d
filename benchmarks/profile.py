"""``--profile DIR``: py-spy samples the API server and the replica under load.

Two more phases run while py-spy records both processes: ``/infer/json`` at concurrency 16
and ``/infer/stream`` with 16 streams. Stacks are sampled with native frames, so a sample
whose innermost frame is a wait (``epoll_wait`` and the like) is recognised as idle and
left out: the shares are of the samples where the process was doing work, which is what
CPU per request is made of. The collapsed stacks go to ``DIR/<process>-<phase>.folded``
(speedscope and flamegraph.pl read them as is); the results keep, per process and phase,
the share of work by component and the top frames (self and inclusive).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.load import Phase
from benchmarks.servers import ApiServer, Replica
from benchmarks.settings import Settings
from benchmarks.streaming import stream_phase
from benchmarks.unary import EXPECT, http_phase, http_request

TOP = 25
RATE = 150
#: Seconds each profiled phase runs: enough samples for shares of a few percent.
PROFILE_SECONDS = 8.0
#: Frames every sample of a thread sits under (entry points, the loop itself): no news.
_ROOTS = re.compile(
    r"<frozen runpy>|<module>|\((typer|click)/|\(asyncio/runners\.py\)|\(threading\.py\)"
    r"|(^|\.)(run_forever|run_until_complete|_run_once) \(asyncio/base_events\.py\)"
    r"|^(main|run|replica) \(anyserve/(cli|replica|api_server)\.py\)"
    r"|^(Server\.run|asyncio_run) \(uvicorn/"
)
#: Innermost native frames that mean "waiting", not working.
IDLE = {
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect",
    "futex_wait",
    "__futex_abstimed_wait_common",
    "__futex_abstimed_wait_common64",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
    "nanosleep",
    "clock_nanosleep",
    "accept",
    "accept4",
    # Waiting for a lock (a worker thread with nothing to do) or for the GIL.
    "PyThread_acquire_lock_timed",
    "PyThread_acquire_lock",
    "take_gil",
}
#: Components, checked in order against each frame from the innermost outwards; the first
#: frame that matches one owns the sample.
COMPONENTS = (
    ("gc", re.compile(r"^gc_collect|^collect_with_callback|^_PyObject_GC|^gc_")),
    (
        "socket syscalls",
        re.compile(r"^(write|writev|sendmsg|sendto|send|read|readv|recv|recvmsg|recvfrom) \("),
    ),
    ("anyserve tensors (JSON <-> protobuf)", re.compile(r"\(anyserve/tensors\.py\)")),
    ("anyserve registry", re.compile(r"\(anyserve/registry\.py\)")),
    ("anyserve api_server", re.compile(r"\(anyserve/api_server\.py\)")),
    ("anyserve replica/SDK", re.compile(r"\(anyserve/(replica|app|context)\.py\)")),
    ("anyserve other", re.compile(r"\(anyserve/")),
    ("demo handler", re.compile(r"\(examples/")),
    ("starlette", re.compile(r"\(starlette/")),
    ("uvicorn/httptools", re.compile(r"\((uvicorn|httptools)/")),
    ("grpc", re.compile(r"\(grpc/|cygrpc|libgrpc|grpc_")),
    ("protobuf", re.compile(r"\(google/protobuf|_message|upb")),
    ("json", re.compile(r"\(json/|orjson")),
    (
        "event loop (uvloop/asyncio)",
        re.compile(r"\(asyncio/|loop\.c|uvloop|_asynciomodule|libuv|\(\w+\.c\)"),
    ),
    ("threads/concurrency", re.compile(r"\((threading|concurrent/futures/\w+|queue)\.py\)")),
)


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


_LINE = re.compile(r":\d+\)$")
_PATH = re.compile(r"\(/.*?(site-packages/|/work/[^/]+/|lib/python3\.\d+/)")


def _frame(raw: str) -> str:
    """``handle (/…/anyserve/api_server.py:123)`` → ``handle (anyserve/api_server.py)``."""
    return _PATH.sub("(", _LINE.sub(")", raw))


def _name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _waiting(frames: list[str]) -> bool:
    """Whether the native frames below the innermost Python frame are a wait."""
    for frame in reversed(frames):
        if ".py)" in frame:
            return False
        if _name(frame) in IDLE:
            return True
    return False


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in COMPONENTS:
            if pattern.search(frame):
                return name
    return "other (interpreter, libc)"


def summarize(folded: str) -> dict[str, Any]:
    """Shares of the working samples by component, and the top frames."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = idle = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        if _waiting(frames):
            idle += count
            continue
        own[frames[-1]] += count
        parts[_component(frames)] += count
        for frame in set(frames):
            if ".py)" in frame:
                under[frame] += count
    work = total - idle

    def top(counter: Counter[str], skip_roots: bool) -> list[dict[str, Any]]:
        rows = []
        for frame, n in counter.most_common():
            # Frames under which nearly every sample sits (main, Runner.run) say nothing.
            if skip_roots and (n >= 0.9 * work or _ROOTS.search(frame)):
                continue
            rows.append({"frame": frame, "share": round(n / work, 3)})
            if len(rows) == TOP:
                break
        return rows

    if not work:
        return {"samples": total, "working": 0, "components": {}, "self": [], "inclusive": []}
    return {
        "samples": total,
        "working": work,
        "components": {name: round(n / work, 3) for name, n in parts.most_common()},
        "self": top(own, skip_roots=False),
        "inclusive": top(under, skip_roots=True),
    }


class Recorder:
    """``py-spy record --native`` of one process until stopped."""

    def __init__(self, spy: str, pid: int, out: Path) -> None:
        self.out = out
        argv = [spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw"]
        argv += ["-r", str(RATE), "--native"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        try:
            text = self.out.read_text()
        except OSError:
            return {"status": "failed", "reason": err.decode(errors="replace")[-500:]}
        return {"status": "ok", "file": str(self.out), **summarize(text)}


async def profile(
    api: ApiServer, replica: Replica, settings: Settings, out_dir: Path
) -> dict[str, Any]:
    """``{"infer_json": {"phase", "api", "replica"}, "infer_stream": {...}}``."""
    spy = py_spy()
    if spy is None:
        return {"status": "unavailable", "reason": "py-spy is not installed (pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    duration = max(settings.duration, PROFILE_SECONDS)
    settings = dataclasses.replace(settings, max_requests=None)  # enough samples, even --quick
    pids = {"api": api.child.pid, "replica": replica.child.pid}
    out: dict[str, Any] = {"status": "ok"}
    for name in ("infer_json", "infer_stream"):
        recorders = {
            process: Recorder(spy, pid, out_dir / f"{process}-{name.replace('_', '-')}.folded")
            for process, pid in pids.items()
        }
        time.sleep(0.5)  # attached before the load starts
        phase: Phase
        if name == "infer_json":
            request = http_request(api.port, "json")
            phase = await http_phase(api.port, request, EXPECT, 16, duration, settings, pids)
            figures = phase.unary()
        else:
            phase = await stream_phase("sse", 16, api, replica, settings, duration)
            figures = phase.streaming()
        out[name] = {"phase": figures}
        for process, recorder in recorders.items():
            out[name][process] = recorder.stop()
        settings.progress(f"profile {name}: stacks in {out_dir}")
    return out
