"""``anyserve up`` itself: preflight, then the supervisor with the live dashboard, or
with prefixed log lines when there is no terminal.

This is the one module that knows both the model (:class:`Supervisor`) and the view
(:class:`Dashboard`): the view pulls a snapshot on the loop's tick.
"""

from __future__ import annotations

import contextlib
import time

from anyserve.logs import SUPERVISOR, Printer
from anyserve.topology import API_NAME, Topology
from anyserve.up.supervisor import Supervisor


def run(topology: Topology, *, tui: bool, reload: bool = True, insecure: bool = False) -> int:
    """``anyserve up``: preflight, then supervise with the dashboard or prefixed lines."""
    if not tui:
        width = max(
            [len(SUPERVISOR), len(f"{API_NAME}.0")]
            + [len(f"{g.name}.{max(g.count - 1, 0)}") for g in topology.groups]
        )
        supervisor = Supervisor(topology, Printer(width=width), reload=reload, insecure=insecure)
        supervisor.preflight()
        return supervisor.run()
    return run_tui(topology, reload=reload, insecure=insecure)


def run_tui(topology: Topology, *, reload: bool, insecure: bool) -> int:
    from rich.console import Console
    from rich.live import Live

    from anyserve.up.dashboard import Dashboard, plain

    supervisor = Supervisor(topology, lambda event: None, reload=reload, insecure=insecure)
    supervisor.preflight()
    console = Console()
    last = 0.0
    with Live(console=console, auto_refresh=False, screen=True, redirect_stderr=False) as live:

        def refresh() -> None:
            nonlocal last
            now = time.monotonic()
            # At most 4 frames a second, and only when something changed (or uptimes tick).
            if now - last < 0.25 or (not supervisor.dirty and now - last < 1.0):
                return
            last = now
            supervisor.dirty = False
            try:
                snapshot = supervisor.snapshot()
                # Give the log lines whatever height the tables leave.
                used = 16 + len(snapshot.processes) + 2 * len(snapshot.replicas)
                lines = max(3, console.height - used)
                live.update(Dashboard(snapshot, log_lines=lines), refresh=True)
            except Exception as exc:
                # The view must never stop the supervisor: an error raised here would
                # leave run() through its cleanup, which stops every process.
                notice = plain(f"anyserve up: the dashboard could not be drawn: {exc!r}")
                with contextlib.suppress(Exception):
                    live.update(notice, refresh=True)

        code = supervisor.run(on_tick=refresh)
    for line in list(supervisor.events)[-5:]:
        console.print(f"{line.name} | {line.text}", markup=False, highlight=False)
    console.print(
        f"anyserve up stopped (exit {code}); logs in {topology.state_dir / 'logs'}",
        markup=False,
        highlight=False,
    )
    return code
