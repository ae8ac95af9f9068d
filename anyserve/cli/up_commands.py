"""Commands that talk to a running ``anyserve up`` through its control socket: ``ps``,
``status``, ``restart``, ``scale``, ``down`` and ``logs`` (which reads its log files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from anyserve.cli.options import ConfigOption
from anyserve.cli.output import failed

commands = typer.Typer()


def _state_dir(config: Path) -> Path:
    """``.anyserve/`` beside the topology file: where a running `up` keeps its socket and logs."""
    return config.expanduser().resolve().parent / ".anyserve"


def _snapshot(config: Path) -> Any:
    from anyserve.control import request
    from anyserve.up.snapshot import Snapshot

    return Snapshot.from_dict(request(_state_dir(config), "ps"))


@commands.command()
def ps(
    config: ConfigOption = Path("anyserve.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the processes of the running `anyserve up`: state, restarts, CPU, memory, port."""
    import json

    snapshot = _snapshot(config)
    if as_json:
        typer.echo(json.dumps(snapshot.to_dict()["processes"], indent=2))
        return
    from rich.console import Console

    from anyserve.up.dashboard import process_table

    Console().print(process_table(snapshot, title=None))


@commands.command()
def status(
    config: ConfigOption = Path("anyserve.toml"),
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Keep refreshing (Ctrl-C to leave).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the dashboard of the running `anyserve up` once, or live with --watch."""
    import json

    from rich.console import Console

    from anyserve.up.dashboard import Dashboard

    snapshot = _snapshot(config)
    if as_json:
        typer.echo(json.dumps(snapshot.to_dict(), indent=2))
        return
    console = Console()
    if not watch:
        console.print(Dashboard(snapshot))
        return
    import time

    from rich.live import Live

    from anyserve.errors import NotReachable

    with Live(Dashboard(snapshot), console=console, auto_refresh=False, screen=True) as live:
        try:
            while True:
                time.sleep(1.0)
                try:
                    live.update(Dashboard(_snapshot(config)), refresh=True)
                except NotReachable:
                    break  # `up` has stopped
        except KeyboardInterrupt:
            pass


@commands.command()
def restart(
    name: Annotated[str, typer.Argument(help="A group (chat), one replica (chat.1) or api.")],
    config: ConfigOption = Path("anyserve.toml"),
) -> None:
    """Restart a group one replica at a time without dropping requests (or the API server)."""
    from anyserve.control import request

    typer.echo(request(_state_dir(config), "restart", name=name))


@commands.command()
def scale(
    spec: Annotated[
        str, typer.Argument(metavar="NAME=N", help="Group and replica count, e.g. chat=2.")
    ],
    config: ConfigOption = Path("anyserve.toml"),
) -> None:
    """Change how many replicas of a group run (until `up` stops; edit anyserve.toml to keep it)."""
    from anyserve.control import request

    name, sep, count = spec.partition("=")
    if not sep or not name or not count.strip().isdigit():
        raise failed(f"expected NAME=N with N >= 0, e.g. chat=2; got {spec!r}", code=2)
    typer.echo(request(_state_dir(config), "scale", name=name.strip(), count=int(count)))


@commands.command()
def down(config: ConfigOption = Path("anyserve.toml")) -> None:
    """Stop the running `anyserve up`: replicas unregister and drain, then everything exits."""
    import time

    from anyserve.control import request
    from anyserve.errors import NotReachable

    state_dir = _state_dir(config)
    pid = request(state_dir, "ps").get("pid")
    request(state_dir, "down")
    typer.echo(f"stopping anyserve up (pid {pid})")
    # Wait for it to finish so a script can rely on `down` meaning down.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            request(state_dir, "ps", timeout=2)
        except NotReachable:
            typer.echo("stopped")
            return
        time.sleep(0.2)
    raise failed("`anyserve up` is still stopping after 120s")


@commands.command()
def logs(
    name: Annotated[
        Optional[str],
        typer.Argument(help="A process (chat.0), a group (chat), api or up; default all."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="How many past lines per process.")
    ] = 50,
    config: ConfigOption = Path("anyserve.toml"),
) -> None:
    """Show the log files of `anyserve up` (.anyserve/logs/<name>.<N>.log)."""
    from anyserve.logs import Printer, log_names, tail
    from anyserve.logs import follow as follow_logs

    directory = _state_dir(config) / "logs"
    names = log_names(directory, name)
    if not names and not follow:
        where = f" for {name!r}" if name else ""
        raise failed(f"no logs{where} in {directory}; has `anyserve up` run here?")
    width = max([len(n) for n in names] + [4])
    printer = Printer(width=width)
    for n in names:
        for line in tail(directory / f"{n}.log", lines):
            printer.line(n, line)
    if follow:
        try:
            for n, line in follow_logs(directory, names, name):
                printer.line(n, line)
        except KeyboardInterrupt:
            return
