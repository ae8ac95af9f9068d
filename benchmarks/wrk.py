"""``/infer/json`` once more through ``wrk`` (a C load generator), when it is installed.

A second opinion on the Python client: if wrk gets much more out of the API server, the
Python client was the limit. Optional: nothing else depends on it (``apt-get install wrk``).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.load import cpu_seconds
from benchmarks.servers import ApiServer
from benchmarks.settings import Settings
from benchmarks.unary import JSON_BODY

_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Capability-Type"] = "echo"
"""
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else math.nan


def parse(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 (ms) and non-2xx count from ``wrk --latency`` output."""
    figures: dict[str, Any] = {}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", output):
        figures["rps"] = float(match.group(1))
    if match := re.search(r"(\d+) requests in", output):
        figures["requests"] = int(match.group(1))
    for name, key in (("50%", "p50_ms"), ("99%", "p99_ms")):
        if match := re.search(rf"^\s+{re.escape(name)}\s+(\S+)", output, re.M):
            figures[key] = round(_ms(match.group(1)), 3)
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    figures["errors"] = int(match.group(1)) if match else 0
    return figures


def measure(api: ApiServer, settings: Settings) -> dict[str, Any]:
    """``{"json": {"1": figures, "16": figures, ...}}`` through wrk, one thread."""
    out: dict[str, Any] = {"json": {}}
    seconds = max(1, round(settings.duration))
    with tempfile.TemporaryDirectory(prefix="anyserve-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_SCRIPT.format(body=JSON_BODY.decode()))
        for c in settings.concurrencies:
            before = cpu_seconds({"api": api.child.pid})
            done = subprocess.run(
                [
                    "wrk",
                    "-t1",
                    f"-c{c}",
                    f"-d{seconds}s",
                    "--latency",
                    "-s",
                    str(script),
                    api.url + "/infer/json",
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=seconds + 30,
            )
            after = cpu_seconds({"api": api.child.pid})
            figures = parse(done.stdout)
            if figures.get("requests"):
                cpu = after.get("api", 0.0) - before.get("api", 0.0)
                figures["cpu_ms_per_request"] = round(cpu * 1000 / figures["requests"], 4)
            out["json"][str(c)] = figures
            settings.progress(f"wrk   json  c={c:<3} {figures.get('rps', math.nan):8.0f} req/s")
    return out
