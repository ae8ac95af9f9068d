"""What ``anyserve up`` shows: rich renderables of a :class:`Snapshot`.

The view pulls: :class:`Dashboard` renders a snapshot through ``__rich__`` (so a test can
print it into ``Console(file=StringIO())``); the supervisor does not know it exists.

Replica ids, capability values, messages and log lines come from replicas, clients and
child output: they are drawn as :class:`~rich.text.Text` built by :func:`plain`, never
parsed as markup (``"[/]"`` would raise) and never passed to the terminal with control
characters in them (``"\\x1b[2J"`` would clear the screen).
"""

from __future__ import annotations

import re
import time

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from anyserve.capability import registration_label
from anyserve.up.snapshot import LogLine, Snapshot
from anyserve.up.state import EventKind, Kind, Phase, State

STATE_STYLES: dict[str, str] = {
    State.STARTING: "yellow",
    State.READY: "green",
    State.UNHEALTHY: "red",
    State.RELOADING: "cyan",
    State.DRAINING: "cyan",
    State.BACKING_OFF: "dark_orange",
    State.CRASH_LOOP: "bold red",
    State.STOPPED: "dim",
}

KIND_STYLES: dict[str, str] = {
    EventKind.ERROR: "red",
    EventKind.EXIT: "yellow",
    EventKind.LIFECYCLE: "dim",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(value: object, style: str = "") -> Text:
    """``value`` as literal text: no markup, control characters shown as ``\\xNN``."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return Text(text, style=style)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _table(title: str | None) -> Table:
    # No vertical rules and one space of padding: the whole view fits 80 columns.
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        show_edge=False,
    )


def process_table(snapshot: Snapshot, title: str | None = "Processes") -> RenderableType:
    """Name, kind, pid, state, restarts, uptime, CPU %, RSS and port per process, then
    what went wrong where something did (exit code, retry countdown, last stderr lines)."""
    table = _table(title)
    for column in ("NAME", "KIND", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "RSS", "PORT"):
        justify = "left" if column in ("NAME", "KIND", "STATE") else "right"
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    problems = Text()
    for p in snapshot.processes:
        table.add_row(
            plain(p.name),
            plain("api" if p.kind == Kind.API else p.kind),
            str(p.pid) if p.pid else "-",
            plain(p.state, style=STATE_STYLES.get(p.state, "")),
            str(p.restarts),
            format_duration(p.uptime),
            "-" if p.cpu is None else f"{p.cpu:.1f}",
            format_bytes(p.rss),
            str(p.port) if p.port else "-",
        )
        note = p.message
        if p.retry_in is not None and p.state in (State.BACKING_OFF, State.CRASH_LOOP):
            note = (
                f"{note}; next try in {p.retry_in:.1f}s" if note else f"retry in {p.retry_in:.1f}s"
            )
        if not note:
            continue
        bad = p.state in (State.CRASH_LOOP, State.UNHEALTHY) or "failed" in note or "stuck" in note
        problems.append_text(plain(f"{p.name}: ", style="bold"))
        problems.append_text(plain(note, style="red" if bad else "yellow"))
        problems.append("\n")
        if p.state == State.CRASH_LOOP:
            for line in p.stderr_tail[-3:]:
                problems.append_text(plain(f"    {line}", style="dim"))
                problems.append("\n")
    if not problems:
        return table
    problems.rstrip()
    return Group(table, problems)


def replica_table(snapshot: Snapshot) -> Table:
    """Per registered replica: capabilities, in-flight, requests, errors, p50/p99."""
    table = _table("Replicas")
    for column in ("REPLICA", "CAPABILITIES", "IN-FLIGHT", "REQS", "ERRS", "P50 MS", "P99 MS"):
        justify = "left" if column in ("REPLICA", "CAPABILITIES") else "right"
        table.add_column(column, justify=justify, no_wrap=column != "CAPABILITIES")  # type: ignore[arg-type]
    for r in sorted(snapshot.replicas, key=lambda r: r.replica_id):
        capabilities = Text("\n").join(plain(registration_label(c)) for c in r.capabilities)
        table.add_row(
            plain(r.replica_id),
            capabilities or "-",
            str(r.in_flight),
            str(r.requests),
            Text(str(r.errors), style="red" if r.errors else ""),
            "-" if r.p50_ms is None else f"{r.p50_ms:.1f}",
            "-" if r.p99_ms is None else f"{r.p99_ms:.1f}",
        )
    if not snapshot.replicas:
        note = "API server not reachable" if not snapshot.api_reachable else "none registered"
        table.add_row(Text(note, style="dim"), "", "", "", "", "", "")
    return table


def _lines(title: str, lines: tuple[LogLine, ...], limit: int) -> RenderableType:
    rows: list[RenderableType] = [Text(title, style="bold")]
    if not lines:
        rows.append(Text("  (none yet)", style="dim"))
    for line in lines[-limit:] if limit > 0 else ():
        stamp = time.strftime("%H:%M:%S", time.localtime(line.at))
        style = KIND_STYLES.get(line.kind, "")
        # One screen line per log line, so the view does not jump as lines come and go.
        row = Text(no_wrap=True, overflow="ellipsis")
        row.append(f"{stamp} ", style="dim")
        row.append_text(plain(f"{line.name} | ", style="bold"))
        row.append_text(plain(line.text, style=style))
        rows.append(row)
    return Group(*rows)


class Dashboard:
    """The full view: header, processes, replicas, recent reload events, latest log lines."""

    def __init__(self, snapshot: Snapshot, *, log_lines: int = 8, event_lines: int = 5) -> None:
        self.snapshot = snapshot
        self.log_lines = log_lines
        self.event_lines = event_lines

    def __rich__(self) -> RenderableType:
        s = self.snapshot
        header = Text()
        header.append("anyserve up", style="bold")
        header.append_text(plain(f"  {s.topology}  ", style="dim"))
        header.append_text(plain(f"API {s.api_url} "))
        header.append("●" if s.api_reachable else "○", style="green" if s.api_reachable else "red")
        header.append(
            f"  up {format_duration(s.taken_at - s.started_at)}  pid {s.pid}", style="dim"
        )
        if s.state != Phase.RUNNING:
            header.append_text(plain(f"  {s.state}", style="bold yellow"))
        return Group(
            header,
            process_table(s),
            replica_table(s),
            _lines("Events", s.events, self.event_lines),
            _lines("Logs", s.logs, self.log_lines),
        )
