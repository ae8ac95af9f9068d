"""Fixtures of the chaos suite: processes that are always cleaned up, and the one line.

Every process a scenario starts (directly or through ``anyserve up``) names the
scenario's temp dir on its command line (``--object-store``), so the teardown can check
with psutil that none is left, after resuming any process the scenario stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.apps.up_support import leftovers, up_args
from tests.conftest import (
    ROOT,
    ApiServer,
    Proc,
    Procs,
    Replica,
    free_port,
    start_api_server,
    start_replica,
    wait_until,
)

LONG = os.environ.get("ANYSERVE_CHAOS", "").strip().lower() == "long"
#: Per-scenario limit (pytest-timeout): the short ones take seconds, the long ones minutes.
TIMEOUT = 300 if LONG else 120
CHAOS_APP = "tests.apps.chaos_app:app"
BROKEN_APP = "tests.apps.chaos_broken:app"


def seconds(short: float, long: float) -> float:
    """How long a phase lasts: ``short`` in the normal run, ``long`` with ANYSERVE_CHAOS=long."""
    return long if LONG else short


class Chaos:
    """One scenario's processes, temp dir and report line."""

    def __init__(self, tmp: Path, procs: Procs, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp
        self.procs = procs
        self.objects = tmp / "objects"
        self._capsys = capsys
        self._stopped: list[int] = []
        self.reported: list[str] = []

    def report(self, line: str) -> None:
        """Print the scenario's summary line, visible in the normal pytest output."""
        self.reported.append(line)
        with self._capsys.disabled():
            sys.stdout.write(f"\n{line}\n")
            sys.stdout.flush()

    # -- processes

    def api_server(self, *extra: str, port: int | None = None) -> ApiServer:
        return start_api_server(
            self.procs,
            port=port,
            extra=["--object-store", str(self.objects), "--log-level", "warning", *extra],
        )

    def replica(self, api: ApiServer, *extra: str, app: str = CHAOS_APP, **kw: str) -> Replica:
        return start_replica(
            self.procs,
            app,
            api_server=api,
            object_store=self.objects,
            extra=list(extra),
            env={"ANYSERVE_LOG_LEVEL": "WARNING"},
            **kw,  # type: ignore[arg-type]
        )

    def topology(self, groups: str, *, api_port: int | None = None, api: str = "") -> Path:
        """``anyserve.toml`` in the temp dir: a fast-lease API server plus ``groups``."""
        text = textwrap.dedent(
            f"""\
            [api_server]
            host = "127.0.0.1"
            port = {api_port or free_port()}
            lease_ttl = 3
            heartbeat_interval = 0.5
            {api}

            [objects]
            path = "{self.objects}"
            """
        ) + textwrap.dedent(groups)
        path = self.tmp / "anyserve.toml"
        path.write_text(text)
        return path

    def up(self, topology: Path) -> Proc:
        """``anyserve up --no-tui`` for ``topology``; the chaos apps importable from the repo."""
        return self.procs.start(
            up_args(topology),
            name="up",
            cwd=self.tmp,
            env={"PYTHONPATH": str(ROOT), "ANYSERVE_LOG_LEVEL": "WARNING"},
        )

    def stop(self, pid: int) -> None:
        """SIGSTOP ``pid``; the teardown resumes it if it is still there."""
        self._stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)

    def kill_group(self, pid: int) -> None:
        """SIGKILL the process group ``pid`` leads (a replica or API server we started)."""
        os.killpg(pid, signal.SIGKILL)

    # -- teardown

    def cleanup(self) -> list[str]:
        """Resume stopped processes, stop everything, and list what would not go away."""
        for pid in self._stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.procs.stop_all()
        marker = str(self.tmp)
        try:
            wait_until(lambda: not leftovers(marker), timeout=5, what="no process left")
            return []
        except AssertionError:
            left = leftovers(marker)
            names = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left]
            for proc in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            return names


@pytest.fixture
def chaos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Chaos]:
    scenario = Chaos(tmp_path, Procs(tmp_path), capsys)
    try:
        yield scenario
    finally:
        left = scenario.cleanup()
    assert left == [], f"processes left behind: {left}"
