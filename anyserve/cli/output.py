"""Formatting shared by the commands: error lines, JSON, rich tables and consoles, ages and
sizes, inference replies and streams, transfer progress.

Output for people is plain text or a rich table on stdout; `--json` prints machine-readable
JSON; progress bars and `--explain` go to stderr so that stdout stays pipeable. rich is
imported inside the helpers that draw, so `anyserve --help` does not pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import typer


def failed(message: str, code: int = 1) -> SystemExit:
    """Print one error line; raise the result to exit with ``code``.

    A ``SystemExit`` passes through click's non-standalone mode, which would swallow the
    code of a ``typer.Exit``.
    """
    typer.echo(f"error: {message}", err=True)
    return SystemExit(code)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (non-ASCII kept as is)."""
    import json

    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def console(stderr: bool = False) -> Any:
    """A rich console on stdout (or stderr) for tables and progress."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal rich would assume 80 columns and wrap ids; scripts get whole lines.
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string (None if neither)."""
    from datetime import datetime

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def add_text_row(table: Any, *cells: str) -> None:
    """Add plain-text cells: ids and capability values are data, never rich markup."""
    from rich.text import Text

    table.add_row(*(Text(c) for c in cells))


def since(value: Any) -> str:
    """How long ago a timestamp (epoch seconds or ISO 8601) was, e.g. ``3.2s ago``."""
    import time

    ts = timestamp(value)
    return "-" if ts is None else ago(time.time() - ts)


def ago(seconds: float) -> str:
    """A duration as a short age, e.g. ``3.2s ago``, ``5m ago``, ``1.5h ago``."""
    secs = max(0.0, float(seconds))
    if secs < 60:
        return f"{secs:.1f}s ago"
    if secs < 3600:
        return f"{secs / 60:.0f}m ago"
    if secs < 86400:
        return f"{secs / 3600:.1f}h ago"
    return f"{secs / 86400:.1f}d ago"


def human_size(n: Any) -> str:
    """A byte count as B, KiB, MiB or GiB; ``-`` when it is not a number."""
    if not isinstance(n, (int, float)):
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - loop always returns


def _output_values(output: dict[str, Any]) -> tuple[str, list[Any]]:
    """("text" | "number" | "binary", values) of one output in the seed's JSON shape."""
    contents = output.get("contents") or {}
    for field, values in contents.items():
        if not values:
            continue
        if field == "bytes_contents":
            if any(isinstance(v, dict) for v in values):
                return "binary", values
            return "text", [str(v) for v in values]
        return "number", list(values)
    return "number", []


def _format_value(kind: str, values: list[Any], shape: Any) -> str:
    import json

    if kind == "binary":
        return f"<binary, {len(values)} item(s); use --json>"
    text = json.dumps(values, ensure_ascii=False)
    if isinstance(shape, list) and len(shape) > 1:
        text += " (shape " + "x".join(str(d) for d in shape) + ")"
    return text


def reply_lines(body: dict[str, Any]) -> list[str]:
    """Human output of an /infer/json reply.

    A single text output is printed as is, one value per line; with several outputs each line
    is labelled ``name: value``; numbers are always ``name: [..]``.
    """
    outputs = [o for o in body.get("outputs") or [] if isinstance(o, dict)]
    lines: list[str] = []
    for output in outputs:
        name = str(output.get("name", "?"))
        kind, values = _output_values(output)
        if kind == "text" and len(outputs) == 1:
            lines.extend(values)
        elif kind == "text" and len(values) == 1:
            lines.append(f"{name}: {values[0]}")
        else:
            lines.append(f"{name}: {_format_value(kind, values, output.get('shape'))}")
    return lines


def print_explanation(meta: Any) -> None:
    """Which replica answered and the load of every candidate, from the reply headers."""
    echo = lambda s: typer.echo(s, err=True)  # noqa: E731
    request = f" (request {meta.request_id})" if meta.request_id else ""
    echo(f"answered by: {meta.replica or 'not reported'}{request}")
    if meta.candidates:
        loads = ", ".join(
            f"{rid} ({'?' if n is None else n} in flight)" for rid, n in meta.candidates
        )
        echo(f"candidates:  {loads}")
        echo("policy:      the matching replica with the fewest requests in flight")
    else:
        echo("candidates:  not reported by the API server")


def print_stream(events: Iterable[dict[str, Any]], raw: bool) -> None:
    """Print a streamed reply: text tokens as they arrive, other outputs as ``name: value``
    lines; with ``raw`` every event as one JSON line."""
    import json

    out = sys.stdout
    ended_line = True
    try:
        for event in events:
            if raw:
                out.write(json.dumps(event, ensure_ascii=False) + "\n")
                out.flush()
                continue
            for output in event.get("outputs") or []:
                if not isinstance(output, dict) or output.get("name") == "finish_reason":
                    continue
                kind, values = _output_values(output)
                if kind == "text":
                    token = "".join(values)
                    if token:
                        out.write(token)
                        ended_line = token.endswith("\n")
                elif values:
                    if not ended_line:
                        out.write("\n")
                    name = output.get("name", "?")
                    out.write(f"{name}: {_format_value(kind, values, output.get('shape'))}\n")
                    ended_line = True
            out.flush()
    finally:
        if not raw and not ended_line:
            out.write("\n")
            out.flush()


@contextmanager
def transfer_progress(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """A transfer progress bar on stderr when it is a terminal; yields ``advance(nbytes)``."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
