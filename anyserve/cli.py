"""The ``anyserve`` command line.

This is the only place where an :class:`~anyserve.errors.AnyServeError` becomes an
exit code: expected failures print one line to stderr and exit 1 (usage errors 2),
never a traceback. Heavy imports (grpc, uvicorn, watchfiles, httpx) happen inside
the commands so that ``anyserve --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Optional

import typer

from anyserve.errors import AnyServeError, BadRequest, ConfigError

app = typer.Typer(
    name="anyserve",
    help=(
        "AnyServe: route inference requests by capability to replicas of your Python handlers.\n\n"
        "Run a whole topology with `anyserve up`, or one replica with `anyserve APP --port 50051`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --------------------------------------------------------------------------- replica


@app.command()
def replica(
    app_ref: Annotated[
        str,
        typer.Argument(
            metavar="APP",
            help="module:attribute of an AnyServe app, e.g. examples.mvp_demo.chat_app:app",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind the gRPC server to.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free port).")] = 8000,
    api_server: Annotated[
        Optional[str],
        typer.Option(
            "--api-server", help="API server URL to register with, e.g. http://localhost:8080."
        ),
    ] = None,
    object_store: Annotated[
        Path, typer.Option("--object-store", help="Object store directory shared by the replicas.")
    ] = Path("/tmp/anyserve-objects"),
    replica_id: Annotated[
        Optional[str], typer.Option("--replica-id", help="Replica identifier (default: generated).")
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Let the object store read and write pickle objects."),
    ] = False,
    grace: Annotated[
        float, typer.Option(help="Seconds to finish in-flight requests on shutdown.")
    ] = 10.0,
    max_in_flight: Annotated[
        int,
        typer.Option(
            "--max-in-flight",
            min=1,
            help="Requests the API server may send this replica at once (it queues the rest).",
        ),
    ] = 8,
) -> None:
    """Serve one app's capabilities over KServe v2 gRPC.

    The bare form `anyserve APP --port 50051 --api-server URL` is the same command.
    """
    from anyserve.replica import ReplicaConfig, run

    run(
        ReplicaConfig(
            app=app_ref,
            host=host,
            port=port,
            api_server=api_server,
            object_store=object_store,
            replica_id=replica_id,
            allow_pickle=allow_pickle,
            grace=grace,
            max_in_flight=max_in_flight,
        )
    )


# ---------------------------------------------------------------------- api-server


@app.command(
    "api-server",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def api_server(ctx: typer.Context) -> None:
    """Run the API server: registry, capability routing, JSON/SSE/v2 inference, objects.

    Takes the options of `python -m anyserve.api_server` (see `anyserve api-server --help`):
    --host, --port, --lease-ttl, --heartbeat-interval, --object-store, --token, ...
    """
    from anyserve.api_server import main as serve

    serve(ctx.args, prog="anyserve api-server")


# --------------------------------------------------------------------------- end api-server

# ---------------------------------------------------------------------- up & control
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The topology file.", show_default=True)
]


def _failed(message: str, code: int = 1) -> SystemExit:
    """Print one error line; raise the result to exit with ``code``.

    A ``SystemExit`` passes through click's non-standalone mode, which would swallow the
    code of a ``typer.Exit``.
    """
    typer.echo(f"error: {message}", err=True)
    return SystemExit(code)


def _state_dir(config: Path) -> Path:
    """``.anyserve/`` beside the topology file: where a running `up` keeps its socket and logs."""
    return config.expanduser().resolve().parent / ".anyserve"


@app.command()
def up(
    config: ConfigOption = Path("anyserve.toml"),
    no_tui: Annotated[
        bool, typer.Option("--no-tui", help="Prefixed log lines instead of the live dashboard.")
    ] = False,
    no_reload: Annotated[
        bool, typer.Option("--no-reload", help="Do not reload replicas when their files change.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate the topology file, print it and exit; start nothing."
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Let an API server that listens beyond loopback run without a token.",
        ),
    ] = False,
) -> None:
    """Start the API server and every replica group of anyserve.toml, and keep them up.

    Crashed processes restart with backoff. Saving a watched file reloads its group.

    Ctrl-C unregisters and drains the replicas, then stops everything (exit 130).

    On a terminal a live dashboard is shown; all output is kept in .anyserve/logs/.

    An API server listening beyond loopback (host = "0.0.0.0") needs a token: [api_server]
    token, $ANYSERVE_TOKEN, or one `up` creates in .anyserve/token.
    """
    from anyserve.topology import load

    topology = load(config)
    if dry_run:
        from anyserve.supervisor import token_plan

        token, create = token_plan(topology, insecure=insecure)
        _print_topology(topology, token, create)
        return
    import os

    from anyserve.supervisor import run

    # A dumb terminal cannot redraw in place: fall back to prefixed lines there.
    tui = sys.stdout.isatty() and os.environ.get("TERM") != "dumb" and not no_tui
    sys.exit(run(topology, tui=tui, reload=not no_reload, insecure=insecure))


def _print_topology(topology: Any, token: str | None, create: bool) -> None:
    api, objects = topology.api_server, topology.objects
    typer.echo(f"{topology.path}: OK")
    extra = ""
    if api.lease_ttl is not None or api.heartbeat_interval is not None:
        extra = f" (lease {api.lease_ttl}s, heartbeat {api.heartbeat_interval}s)"
    if create:
        auth = f"token created in {topology.state_dir / 'token'}"
    elif token:
        auth = "token from anyserve.toml" if api.token else "token from $ANYSERVE_TOKEN"
    else:
        auth = "no token"
    typer.echo(f"  api server  {api.url}{extra}, {auth}")
    ttl = "no TTL" if objects.ttl is None else f"TTL {objects.ttl:g}s"
    typer.echo(
        f"  objects     {objects.path} ({ttl}{', pickle allowed' if objects.allow_pickle else ''})"
    )
    for g in topology.groups:
        port = f"port {g.port}" if g.port else "free port"
        watch = ", ".join(str(p) for p in g.watch) or "nothing"
        typer.echo(
            f"  {g.name:<11} {g.app} x{g.count}, {port}, restart={g.restart}, "
            f"drain {g.drain_timeout:g}s, max in flight {g.max_in_flight}, watch {watch}"
        )


def _snapshot(config: Path) -> Any:
    from anyserve.control import request
    from anyserve.dashboard import Snapshot

    return Snapshot.from_dict(request(_state_dir(config), "ps"))


@app.command()
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

    from anyserve.dashboard import process_table

    Console().print(process_table(snapshot, title=None))


@app.command()
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

    from anyserve.dashboard import Dashboard

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


@app.command()
def restart(
    name: Annotated[str, typer.Argument(help="A group (chat), one replica (chat.1) or api.")],
    config: ConfigOption = Path("anyserve.toml"),
) -> None:
    """Restart a group one replica at a time without dropping requests (or the API server)."""
    from anyserve.control import request

    typer.echo(request(_state_dir(config), "restart", name=name))


@app.command()
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
        raise _failed(f"expected NAME=N with N >= 0, e.g. chat=2; got {spec!r}", code=2)
    typer.echo(request(_state_dir(config), "scale", name=name.strip(), count=int(count)))


@app.command()
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
    raise _failed("`anyserve up` is still stopping after 120s")


@app.command()
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
        raise _failed(f"no logs{where} in {directory}; has `anyserve up` run here?")
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


# --------------------------------------------------------------------------- end up & control

# ---------------------------------------------------------------------- client commands
# `call`, `registry` and `objects` wrap the API server's HTTP surface (anyserve.client). Output
# for people is plain text or a rich table on stdout; `--json` prints machine-readable JSON;
# progress bars and `--explain` go to stderr so that stdout stays pipeable.

_API_SERVER_HELP = (
    # "\\[" keeps rich from reading the TOML table name as markup.
    "API server URL. Default: $ANYSERVE_API_SERVER, else \\[api_server] host/port of "
    "./anyserve.toml, else http://127.0.0.1:8080."
)
ApiServerOption = Annotated[
    Optional[str], typer.Option("--api-server", metavar="URL", help=_API_SERVER_HELP)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
StoreOption = Annotated[
    Optional[Path],
    typer.Option(
        "--object-store",
        metavar="DIR",
        help="Work on this store directory directly instead of through the API server.",
    ),
]


def _client(api_server: str | None, timeout: float | None = 60.0) -> Any:
    from anyserve.client import Client, resolve_api_server, resolve_token

    return Client(resolve_api_server(api_server), token=resolve_token(), timeout=timeout)


def _caps(items: list[str] | None, param: str = "--cap") -> dict[str, str]:
    from anyserve.client import parse_capability

    try:
        return parse_capability(items or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{param}'") from None


def _print_json(data: Any) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal rich would assume 80 columns and wrap ids; scripts get whole lines.
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def _timestamp(value: Any) -> float | None:
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


def _add_row(table: Any, *cells: str) -> None:
    """Add plain-text cells: ids and capability values are data, never rich markup."""
    from rich.text import Text

    table.add_row(*(Text(c) for c in cells))


def _age(value: Any) -> str:
    """How long ago a timestamp (epoch seconds or ISO 8601) was, e.g. ``3.2s ago``."""
    import time

    ts = _timestamp(value)
    return "-" if ts is None else _ago(time.time() - ts)


def _ago(seconds: float) -> str:
    secs = max(0.0, float(seconds))
    if secs < 60:
        return f"{secs:.1f}s ago"
    if secs < 3600:
        return f"{secs / 60:.0f}m ago"
    if secs < 86400:
        return f"{secs / 3600:.1f}h ago"
    return f"{secs / 86400:.1f}d ago"


def _size(n: Any) -> str:
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


def _reply_lines(body: dict[str, Any]) -> list[str]:
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


def _explain(meta: Any) -> None:
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


@app.command()
def call(
    text: Annotated[
        Optional[str], typer.Argument(metavar="TEXT", help="Sent as the BYTES input `text`.")
    ] = None,
    cap: Annotated[
        Optional[list[str]],
        typer.Option("--cap", "-c", metavar="KEY=VALUE", help="Capability to route to (repeat)."),
    ] = None,
    inputs: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input",
            "-i",
            metavar="NAME[:TYPE[SHAPE]]=VALUE",
            help="An input (repeat): NAME=text is BYTES; x:FP32=1,2,3 or m:INT64[2,2]=1,2,3,4 "
            "give a datatype and values.",
        ),
    ] = None,
    objects: Annotated[
        Optional[list[str]],
        typer.Option(
            "--object",
            "-o",
            metavar="NAME=KEY",
            help="Pass a stored object by reference: input NAME holds its key (repeat).",
        ),
    ] = None,
    body: Annotated[
        Optional[str],
        typer.Option(
            "--body",
            "-d",
            metavar="JSON|@FILE",
            help='The request body as JSON ({"inputs": [...]}), from a file with @FILE or '
            "stdin with @-; sent as is (other inputs are appended).",
        ),
    ] = None,
    stream: Annotated[
        bool,
        typer.Option("--stream", help="Call a streaming capability; print tokens as they arrive."),
    ] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="With --stream: print each event as one JSON line.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the reply as JSON (with --stream: one event per line)."),
    ] = False,
    timeout: Annotated[
        Optional[float],
        typer.Option(help="Seconds the request may take (sent as X-Request-Timeout).", min=0.001),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show on stderr which replica answered and why.")
    ] = False,
    api_server: ApiServerOption = None,
) -> None:
    """Send an inference request, routed by capability, and print the reply.

    anyserve call --cap type=chat "Hello"
    anyserve call --cap type=chat --stream "Hi"
    anyserve call --cap type=heavy --cap gpus=2 --input data=x
    anyserve call --cap type=embed --object obj_ref=KEY
    anyserve call --cap type=chat --body @request.json --json

    Text outputs print as they are, one per line; with several outputs, as `name: value`.
    Numeric outputs print as `name: [..]`.
    --body gives the JSON request body; --json switches the output to JSON.
    """
    from anyserve.client import build_body, load_body, parse_assignment, parse_input

    caps = _caps(cap)
    if not caps:
        raise typer.BadParameter(
            "give at least one --cap KEY=VALUE, e.g. --cap type=chat", param_hint="'--cap'"
        )
    try:
        parsed_inputs = [parse_input(spec) for spec in inputs or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--input'") from None
    refs: dict[str, str] = {}
    for spec in objects or []:
        try:
            name, key = parse_assignment(spec, "NAME=KEY")
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--object'") from None
        refs[name] = key
    if raw and not stream:
        raise typer.BadParameter("--raw needs --stream", param_hint="'--raw'")
    request = build_body(
        text=text,
        inputs=parsed_inputs,
        objects=refs,
        body=load_body(body) if body is not None else None,
    )

    # Without --timeout the API server's own deadline applies; wait well past it so that its
    # message, not a client-side timeout, is what the user sees.
    with _client(api_server, timeout=600.0) as client:
        if not stream:
            result = client.infer_json(request, caps, timeout=timeout)
            if as_json:
                _print_json(result.body)
            else:
                for line in _reply_lines(result.body):
                    typer.echo(line)
            if explain:
                _explain(result.meta)
            return
        events = client.stream(request, caps, timeout=timeout)
        _print_stream(events, raw=raw or as_json)
        if explain:
            _explain(events.meta)


def _print_stream(events: Iterable[dict[str, Any]], raw: bool) -> None:
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


registry_app = typer.Typer(
    name="registry",
    help="The replicas registered with the API server.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")


def _matches(replica: dict[str, Any], caps: dict[str, str]) -> bool:
    """A replica matches when one of its capabilities has every key with an equal text value."""
    from anyserve.client import capability_text

    for capability in replica.get("capabilities") or []:
        if isinstance(capability, dict) and all(
            k in capability and capability_text(capability[k]) == v for k, v in caps.items()
        ):
            return True
    return False


def _capability_label(capability: Any) -> str:
    from anyserve.client import capability_text

    if not isinstance(capability, dict):
        return str(capability)
    label = ",".join(f"{k}={capability_text(v)}" for k, v in capability.items() if k != "stream")
    return label + (" [stream]" if capability.get("stream") else "")


@registry_app.command("ls")
def registry_ls(
    cap: Annotated[
        Optional[list[str]],
        typer.Option(
            "--cap", "-c", metavar="KEY=VALUE", help="Only replicas serving this (repeat)."
        ),
    ] = None,
    as_json: JsonOption = False,
    api_server: ApiServerOption = None,
) -> None:
    """List the registered replicas: id, endpoint, capabilities, state, load, heartbeat age."""
    caps = _caps(cap)
    with _client(api_server) as client:
        data = client.registry()
    replicas = [r for r in data.get("replicas") or [] if isinstance(r, dict)]
    if caps:
        replicas = [r for r in replicas if _matches(r, caps)]
    if as_json:
        _print_json({"replicas": replicas, "total": len(replicas)})
        return
    from rich.table import Table

    if not replicas:
        typer.echo("no replicas registered" + (" with that capability" if caps else ""))
        return
    table = Table()
    table.add_column("replica", no_wrap=True)
    table.add_column("endpoint", no_wrap=True)
    table.add_column("capabilities")
    table.add_column("state")
    table.add_column("in flight", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("heartbeat", justify="right")
    for r in sorted(replicas, key=lambda r: str(r.get("replica_id", ""))):
        # The server's own age is immune to clock differences between the two machines.
        age = r.get("heartbeat_age")
        heartbeat = _ago(age) if isinstance(age, (int, float)) else _age(r.get("last_heartbeat"))
        _add_row(
            table,
            str(r.get("replica_id", "?")),
            str(r.get("endpoint", "?")),
            "\n".join(_capability_label(c) for c in r.get("capabilities") or []),
            str(r.get("state", "-")),
            str(r.get("in_flight", "-")),
            str(r.get("requests", "-")),
            heartbeat,
        )
    _console().print(table)


@registry_app.command("rm")
def registry_rm(
    replica_id: Annotated[str, typer.Argument(metavar="ID", help="The replica id to remove.")],
    api_server: ApiServerOption = None,
) -> None:
    """Remove a replica's record from the registry.

    The replica's heartbeats no longer bring it back; it serves again once restarted.
    """
    with _client(api_server) as client:
        client.unregister(replica_id)
    typer.echo(f"removed {replica_id}")


objects_app = typer.Typer(
    name="objects",
    help="The object store: list, upload, download, remove and collect objects.",
    no_args_is_help=True,
)
app.add_typer(objects_app, name="objects")


def _one_target(api_server: str | None, object_store: Path | None) -> None:
    if api_server and object_store:
        raise typer.BadParameter(
            "give --api-server or --object-store, not both", param_hint="'--object-store'"
        )


def _store(path: Path) -> Any:
    from anyserve.objects import ObjectStore

    return ObjectStore(path)


@contextmanager
def _progress(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
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
    with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _chunks(source: BinaryIO, advance: Callable[[int], None]) -> Iterator[bytes]:
    from anyserve.client import CHUNK_SIZE

    while chunk := source.read(CHUNK_SIZE):
        advance(len(chunk))
        yield chunk


def _ref_dict(ref: Any) -> dict[str, Any]:
    return dict(ref.to_dict()) if hasattr(ref, "to_dict") else dict(ref)


@objects_app.command("ls")
def objects_ls(
    as_json: JsonOption = False,
    api_server: ApiServerOption = None,
    object_store: StoreOption = None,
) -> None:
    """List the stored objects: key, type, size, age."""
    _one_target(api_server, object_store)
    if object_store is not None:
        refs = [_ref_dict(r) for r in _store(object_store).list()]
    else:
        with _client(api_server) as client:
            refs = client.objects()
    if as_json:
        _print_json({"objects": refs, "total": len(refs)})
        return
    from rich.table import Table

    if not refs:
        typer.echo("no objects")
        return
    table = Table()
    table.add_column("key", no_wrap=True)
    table.add_column("type")
    table.add_column("size", justify="right")
    table.add_column("created", justify="right")
    for ref in sorted(refs, key=lambda r: _timestamp(r.get("created_at")) or 0.0):
        _add_row(
            table,
            str(ref.get("key", "?")),
            str(ref.get("content_type", "-")),
            _size(ref.get("size")),
            _age(ref.get("created_at")),
        )
    _console().print(table)


class ObjectType(str, Enum):
    json = "json"
    bytes = "bytes"


@objects_app.command("put")
def objects_put(
    file: Annotated[str, typer.Argument(metavar="FILE|-", help="File to upload; - reads stdin.")],
    key: Annotated[
        Optional[str], typer.Option(help="Key to store it under (default: generated).")
    ] = None,
    content_type: Annotated[
        ObjectType, typer.Option("--type", help="How readers decode it.")
    ] = ObjectType.bytes,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the new object's ref as JSON.")
    ] = False,
    api_server: ApiServerOption = None,
    object_store: StoreOption = None,
) -> None:
    """Upload a file (streamed in chunks) and print the new object's key."""
    import os

    _one_target(api_server, object_store)
    if file == "-":
        source, size, label = sys.stdin.buffer, None, "stdin"
    else:
        try:
            source = open(file, "rb")  # noqa: SIM115 - closed below
            size = os.fstat(source.fileno()).st_size
        except OSError as exc:
            raise BadRequest(f"cannot read {file}: {exc.strerror or exc}") from None
        label = Path(file).name
    try:
        with _progress(size, f"put {label}") as advance:
            if object_store is not None:
                ref = _ref_dict(
                    _store(object_store).write_stream(
                        _chunks(source, advance), key=key, content_type=content_type.value
                    )
                )
            else:
                with _client(api_server, timeout=None) as client:
                    ref = client.put_object(
                        _chunks(source, advance),
                        key=key,
                        content_type=content_type.value,
                        size=size,
                    )
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if as_json:
        _print_json(ref)
    else:
        typer.echo(ref.get("key", ""))


@objects_app.command("get")
def objects_get(
    ref: Annotated[
        str, typer.Argument(metavar="KEY", help="The object's key (or its path in the store).")
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", metavar="FILE", help="Write here instead of stdout (- is stdout)."
        ),
    ] = None,
    api_server: ApiServerOption = None,
    object_store: StoreOption = None,
) -> None:
    """Download an object (streamed in chunks) to stdout or to a file."""
    import os

    from anyserve.client import object_key

    _one_target(api_server, object_store)
    key = object_key(ref)
    to_stdout = output is None or str(output) == "-"
    tmp: Path | None = None
    if to_stdout:
        sink: BinaryIO = sys.stdout.buffer
    else:
        assert output is not None
        # Write beside the target and rename at the end: no half-written file on failure.
        tmp = output.with_name(f".{output.name}.part-{os.getpid()}")
        try:
            sink = open(tmp, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise BadRequest(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        if object_store is not None:
            store = _store(object_store)
            size = _ref_dict(store.stat(key)).get("size")
            with store.open(key) as source, _progress(size, f"get {key}") as advance:
                for chunk in _chunks(source, advance):
                    sink.write(chunk)
        else:
            with (
                _client(api_server, timeout=None) as client,
                client.get_object(key) as download,
                _progress(download.size, f"get {key}") as advance,
            ):
                for chunk in download.chunks():
                    sink.write(chunk)
                    advance(len(chunk))
        sink.flush()
        if tmp is not None:
            sink.close()
            assert output is not None
            os.replace(tmp, output)
            tmp = None
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; stop writing quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if tmp is not None:
            sink.close()
            tmp.unlink(missing_ok=True)


@objects_app.command("rm")
def objects_rm(
    key: Annotated[
        str, typer.Argument(metavar="KEY", help="The object's key (or its path in the store).")
    ],
    api_server: ApiServerOption = None,
    object_store: StoreOption = None,
) -> None:
    """Remove an object."""
    from anyserve.client import object_key

    _one_target(api_server, object_store)
    key = object_key(key)
    if object_store is not None:
        _store(object_store).delete(key)
    else:
        with _client(api_server) as client:
            client.delete_object(key)
    typer.echo(f"removed {key}")


@objects_app.command("gc")
def objects_gc(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", metavar="AGE", help="Remove objects older than this (30s, 10m, 1h, 2d)."
        ),
    ] = "1h",
    as_json: JsonOption = False,
    api_server: ApiServerOption = None,
    object_store: StoreOption = None,
) -> None:
    """Remove the objects older than an age (the store's TTL collection, run now)."""
    import time

    from anyserve.objects import parse_duration

    _one_target(api_server, object_store)
    try:
        max_age = parse_duration(older_than)
    except (ValueError, AnyServeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'--older-than'") from None
    cutoff = time.time() - max_age
    removed: list[str] = []
    if object_store is not None:
        store = _store(object_store)
        old = [r.key for r in store.list() if r.created_at < cutoff]
        store.cleanup(max_age)
        removed = [key for key in old if not store.exists(key)]
    else:
        from anyserve.errors import NotFound

        with _client(api_server) as client:
            for ref in client.objects():
                created = _timestamp(ref.get("created_at"))
                if created is not None and created < cutoff:
                    try:
                        client.delete_object(str(ref["key"]))
                    except NotFound:
                        continue  # removed meanwhile by someone else
                    removed.append(str(ref["key"]))
    if as_json:
        _print_json({"removed": removed, "count": len(removed)})
    else:
        typer.echo(f"removed {len(removed)} object(s) older than {older_than}")


# --------------------------------------------------------------------------- end client commands


def _commands() -> set[str]:
    names = set()
    for info in app.registered_commands:
        names.add(info.name or (info.callback.__name__.replace("_", "-") if info.callback else ""))
    for group in app.registered_groups:
        if group.name:
            names.add(group.name)
    return names


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``anyserve`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The seed's bare form: `anyserve module:app --port 50051 ...` means `anyserve replica ...`.
    if args and not args[0].startswith("-") and ":" in args[0] and args[0] not in _commands():
        args.insert(0, "replica")
    try:
        # Without standalone mode click returns a typer.Exit's code instead of exiting.
        code = app(args=args, prog_name="anyserve", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except AnyServeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        # Usage errors and aborts from click (which typer may vendor under another name).
        name = type(exc).__name__
        if name == "Abort":
            sys.exit(130)
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
