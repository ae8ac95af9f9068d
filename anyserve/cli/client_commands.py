"""Commands for clients of the API server: ``call``, ``registry ls|rm`` and
``objects ls|put|get|rm|gc``.

They wrap the API server's HTTP surface (anyserve.client); ``objects`` can also work on a
store directory directly. How their results look is in :mod:`anyserve.cli.output`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Optional

import typer

from anyserve.capability import registration_label
from anyserve.cli.output import (
    add_text_row,
    ago,
    console,
    human_size,
    print_explanation,
    print_json,
    print_stream,
    reply_lines,
    since,
    timestamp,
    transfer_progress,
)
from anyserve.errors import AnyServeError, BadRequest

commands = typer.Typer()


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


@commands.command()
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
                print_json(result.body)
            else:
                for line in reply_lines(result.body):
                    typer.echo(line)
            if explain:
                print_explanation(result.meta)
            return
        events = client.stream(request, caps, timeout=timeout)
        print_stream(events, raw=raw or as_json)
        if explain:
            print_explanation(events.meta)


registry_app = typer.Typer(
    name="registry",
    help="The replicas registered with the API server.",
    no_args_is_help=True,
)


def _matches(replica: dict[str, Any], caps: dict[str, str]) -> bool:
    """A replica matches when one of its capabilities has every key with an equal text value."""
    from anyserve.client import capability_text

    for capability in replica.get("capabilities") or []:
        if isinstance(capability, dict) and all(
            k in capability and capability_text(capability[k]) == v for k, v in caps.items()
        ):
            return True
    return False


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
        print_json({"replicas": replicas, "total": len(replicas)})
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
        heartbeat = ago(age) if isinstance(age, (int, float)) else since(r.get("last_heartbeat"))
        add_text_row(
            table,
            str(r.get("replica_id", "?")),
            str(r.get("endpoint", "?")),
            "\n".join(registration_label(c) for c in r.get("capabilities") or []),
            str(r.get("state", "-")),
            str(r.get("in_flight", "-")),
            str(r.get("requests", "-")),
            heartbeat,
        )
    console().print(table)


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


def _one_target(api_server: str | None, object_store: Path | None) -> None:
    if api_server and object_store:
        raise typer.BadParameter(
            "give --api-server or --object-store, not both", param_hint="'--object-store'"
        )


def _store(path: Path) -> Any:
    from anyserve.objects import ObjectStore

    return ObjectStore(path)


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
        print_json({"objects": refs, "total": len(refs)})
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
    for ref in sorted(refs, key=lambda r: timestamp(r.get("created_at")) or 0.0):
        add_text_row(
            table,
            str(ref.get("key", "?")),
            str(ref.get("content_type", "-")),
            human_size(ref.get("size")),
            since(ref.get("created_at")),
        )
    console().print(table)


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
        with transfer_progress(size, f"put {label}") as advance:
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
        print_json(ref)
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
            with store.open(key) as source, transfer_progress(size, f"get {key}") as advance:
                for chunk in _chunks(source, advance):
                    sink.write(chunk)
        else:
            with (
                _client(api_server, timeout=None) as client,
                client.get_object(key) as download,
                transfer_progress(download.size, f"get {key}") as advance,
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
                created = timestamp(ref.get("created_at"))
                if created is not None and created < cutoff:
                    try:
                        client.delete_object(str(ref["key"]))
                    except NotFound:
                        continue  # removed meanwhile by someone else
                    removed.append(str(ref["key"]))
    if as_json:
        print_json({"removed": removed, "count": len(removed)})
    else:
        typer.echo(f"removed {len(removed)} object(s) older than {older_than}")
