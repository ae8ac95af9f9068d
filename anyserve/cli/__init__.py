"""The ``anyserve`` command line, one module per audience.

- :mod:`~anyserve.cli.launchers`: ``replica`` (or bare ``anyserve APP``), ``api-server``, ``up``
- :mod:`~anyserve.cli.up_commands`: ``ps``, ``status``, ``restart``, ``scale``, ``down``, ``logs``
- :mod:`~anyserve.cli.client_commands`: ``call``, ``registry``, ``objects``
- :mod:`~anyserve.cli.output`: the formatting they share

This is the only place where an :class:`~anyserve.errors.AnyServeError` becomes an
exit code: expected failures print one line to stderr and exit 1 (usage errors 2),
never a traceback. Heavy imports (grpc, uvicorn, watchfiles, httpx) happen inside
the commands so that ``anyserve --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from anyserve.cli import client_commands, launchers, up_commands
from anyserve.errors import AnyServeError, ConfigError

__all__ = ["app", "main"]

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
# Unnamed, each audience's commands join the top level; `--help` lists them in this order.
app.add_typer(launchers.commands)
app.add_typer(up_commands.commands)
app.add_typer(client_commands.commands)
app.add_typer(client_commands.registry_app, name="registry")
app.add_typer(client_commands.objects_app, name="objects")


def command_names(typer_app: typer.Typer = app) -> set[str]:
    """The names of the top-level commands and groups."""
    names = set()
    for info in typer_app.registered_commands:
        names.add(info.name or (info.callback.__name__.replace("_", "-") if info.callback else ""))
    for group in typer_app.registered_groups:
        if group.name:
            names.add(group.name)
        elif group.typer_instance is not None:
            names |= command_names(group.typer_instance)
    return names


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``anyserve`` console script."""
    args = launchers.bare_form(list(sys.argv[1:] if argv is None else argv), command_names())
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
