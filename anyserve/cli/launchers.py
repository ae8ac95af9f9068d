"""Commands that start processes: ``replica`` (and its bare form ``anyserve APP``),
``api-server`` and ``up``.

The servers and the supervisor are imported inside the commands: they pull in grpc,
uvicorn and watchfiles, which ``anyserve --help`` must not wait for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from anyserve.cli.options import ConfigOption
from anyserve.defaults import MAX_IN_FLIGHT, MAX_MESSAGE_BYTES, OBJECT_STORE_PATH

commands = typer.Typer()


@commands.command()
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
    ] = Path(OBJECT_STORE_PATH),
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
    ] = MAX_IN_FLIGHT,
    max_message_size: Annotated[
        int,
        typer.Option(
            "--max-message-size",
            min=1,
            help="Largest gRPC message in bytes, both ways: the API server's --max-body-size "
            "plus 64 KiB (anyserve up passes it).",
        ),
    ] = MAX_MESSAGE_BYTES,
) -> None:
    """Serve one app's capabilities over KServe v2 gRPC.

    The bare form `anyserve APP --port 50051 --api-server URL` is the same command.
    """
    from anyserve.replica import run

    run(
        replica_config(
            app_ref=app_ref,
            host=host,
            port=port,
            api_server=api_server,
            object_store=object_store,
            replica_id=replica_id,
            allow_pickle=allow_pickle,
            grace=grace,
            max_in_flight=max_in_flight,
            max_message_size=max_message_size,
        )
    )


def replica_config(**params: Any) -> Any:
    """The :class:`~anyserve.replica.ReplicaConfig` the ``replica`` command's parsed options
    describe (what ``ReplicaConfig.to_argv`` writes, this reads back)."""
    from anyserve.replica import ReplicaConfig

    return ReplicaConfig(
        app=params["app_ref"],
        host=params["host"],
        port=params["port"],
        api_server=params["api_server"],
        object_store=params["object_store"],
        replica_id=params["replica_id"],
        allow_pickle=params["allow_pickle"],
        grace=params["grace"],
        max_in_flight=params["max_in_flight"],
        max_message_bytes=params["max_message_size"],
    )


@commands.command(
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


@commands.command()
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
            help="Allow `token = false` on an API server that listens beyond loopback.",
        ),
    ] = False,
) -> None:
    """Start the API server and every replica group of anyserve.toml, and keep them up.

    Crashed processes restart with backoff. Saving a watched file reloads its group.

    Ctrl-C unregisters and drains the replicas, then stops everything (exit 130).

    On a terminal a live dashboard is shown; all output is kept in .anyserve/logs/.

    The API server always gets a token: [api_server] token, $ANYSERVE_TOKEN, or one `up`
    creates in .anyserve/token (0600), where the client commands find it. Inference stays
    open unless [api_server] auth = "all". `token = false` opts out (beyond loopback only
    with --insecure).
    """
    from anyserve.topology import load

    topology = load(config)
    if dry_run:
        from anyserve.up.tokens import token_plan

        token, create = token_plan(topology, insecure=insecure)
        _print_topology(topology, token, create)
        return
    import os

    from anyserve.up.run import run

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


def bare_form(args: list[str], command_names: set[str]) -> list[str]:
    """The seed's bare form: `anyserve module:app --port 50051 ...` means `anyserve replica ...`."""
    if args and not args[0].startswith("-") and ":" in args[0] and args[0] not in command_names:
        return ["replica", *args]
    return args
