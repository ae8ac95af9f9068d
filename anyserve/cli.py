"""The ``anyserve`` command line.

This is the only place where an :class:`~anyserve.errors.AnyServeError` becomes an
exit code: expected failures print one line to stderr and exit 1 (usage errors 2),
never a traceback. Heavy imports (grpc, uvicorn, watchfiles, httpx) happen inside
the commands so that ``anyserve --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from anyserve.errors import AnyServeError, ConfigError

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


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# --------------------------------------------------------------------------- replica


@app.command()
def replica(
    app_ref: Annotated[str, typer.Argument(metavar="APP", help="module:attribute of an AnyServe app, e.g. examples.mvp_demo.chat_app:app")],
    host: Annotated[str, typer.Option(help="Address to bind the gRPC server to.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free port).")] = 8000,
    api_server: Annotated[Optional[str], typer.Option("--api-server", help="API server URL to register with, e.g. http://localhost:8080.")] = None,
    object_store: Annotated[Path, typer.Option("--object-store", help="Object store directory shared by the replicas.")] = Path("/tmp/anyserve-objects"),
    replica_id: Annotated[Optional[str], typer.Option("--replica-id", help="Replica identifier (default: generated).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Let the object store read and write pickle objects.")] = False,
    grace: Annotated[float, typer.Option(help="Seconds to finish in-flight requests on shutdown.")] = 10.0,
) -> None:
    """Serve one app's capabilities over KServe v2 gRPC (the bare form `anyserve APP ...` is the same)."""
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
        )
    )


# --------------------------------------------------------------------------- api-server (issue 3)
# --------------------------------------------------------------------------- end api-server

# --------------------------------------------------------------------------- up & control (issue 4)
# --------------------------------------------------------------------------- end up & control

# --------------------------------------------------------------------------- client commands (issue 5)
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
        app(args=args, prog_name="anyserve", standalone_mode=False)
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
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.UsageError):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
