"""``anyserve.toml`` → one frozen :class:`Topology`.

The file declares the API server, the object store and named replica groups::

    [api_server]
    host = "127.0.0.1"
    port = 8080

    [objects]
    path = "/tmp/anyserve-objects"
    ttl = "1h"

    [replicas.chat]
    app = "examples.mvp_demo.chat_app:app"
    port = 50051

Loading never imports user code (that happens inside the replica process); it only
checks shapes and types. Every error names the file, the line when it can be found,
the dotted key and what was expected, and is a :class:`~anyserve.errors.ConfigError`
(the CLI exits 2).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from anyserve.addresses import is_loopback, reachable_host
from anyserve.defaults import (
    AUTH_MODE,
    AUTH_MODES,
    MAX_BODY_SIZE,
    MAX_IN_FLIGHT,
    OBJECT_STORE_PATH,
)
from anyserve.errors import BadRequest, ConfigError
from anyserve.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_FILE = "anyserve.toml"
RESTART_POLICIES = ("always", "on-failure", "never")
API_NAME = "api"
"""Process name of the API server (so no replica group may use it)."""

_APP_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class ApiServerSpec:
    """``[api_server]``: where the API server listens and its lease settings."""

    host: str = "127.0.0.1"
    port: int = 8080
    lease_ttl: float | None = None
    heartbeat_interval: float | None = None
    token: str | None = None
    """``token = "..."``: the bearer token registration and object writes require."""
    token_off: bool = False
    """``token = false``: run without a token even on a non-loopback address (with
    ``up --insecure`` only)."""
    auth: str = AUTH_MODE
    """What the token guards: ``writes`` (registration, object writes) or ``all`` routes."""
    grpc_port: int | None = None
    """``grpc_port = 8081``: also serve KServe v2 gRPC (the ingress) on this port."""
    max_body_size: int = MAX_BODY_SIZE
    """``max_body_size = "100MiB"``: the largest infer body, and so what replicas accept."""

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the API server (a wildcard bind cannot)."""
        return is_loopback(self.host)

    @property
    def url(self) -> str:
        """The URL replicas and clients use; a wildcard bind is reached over loopback."""
        host = reachable_host(self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class ObjectsSpec:
    """``[objects]``: the shared object store directory and its time to live."""

    path: Path = Path(OBJECT_STORE_PATH)
    ttl: float | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class GroupSpec:
    """``[replicas.NAME]``: ``count`` replicas of one app."""

    name: str
    app: str
    count: int = 1
    port: int | None = None
    host: str = "127.0.0.1"
    env: tuple[tuple[str, str], ...] = ()
    watch: tuple[Path, ...] = ()
    restart: str = "always"
    drain_timeout: float = 10.0
    max_in_flight: int = MAX_IN_FLIGHT
    """Requests the API server may send one replica at once (it queues the rest)."""
    stuck_timeout: float | None = 5.0
    """A replica that does not answer ``ServerReady`` for this long is killed and restarted
    (its event loop is blocked, or it was stopped); None: never."""

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def port_for(self, slot: int) -> int | None:
        """The fixed port of replica ``slot``: only the first one uses ``port``."""
        return self.port if slot == 0 else None


@dataclass(frozen=True)
class Topology:
    """Everything ``anyserve up`` runs, loaded from one file."""

    path: Path
    api_server: ApiServerSpec
    objects: ObjectsSpec
    groups: tuple[GroupSpec, ...]

    @property
    def root(self) -> Path:
        """The directory of the file: children run there, so ``app`` imports resolve."""
        return self.path.parent

    @property
    def state_dir(self) -> Path:
        """``.anyserve/`` beside the file: logs and the control socket."""
        return self.root / ".anyserve"

    def group(self, name: str) -> GroupSpec:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)


_TOP_KEYS = ("api_server", "objects", "replicas")
_API_KEYS = (
    "host",
    "port",
    "lease_ttl",
    "heartbeat_interval",
    "token",
    "auth",
    "grpc_port",
    "max_body_size",
)
_OBJECT_KEYS = ("path", "ttl", "allow_pickle")
_GROUP_KEYS = (
    "app",
    "count",
    "port",
    "host",
    "env",
    "watch",
    "restart",
    "drain_timeout",
    "max_in_flight",
    "stuck_timeout",
)
# A bearer token goes into an HTTP header: visible ASCII, no spaces (RFC 6750's b64token
# is stricter, but anything a header can carry works), and long enough not to be guessed.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{16,}$")


def load(path: str | Path = DEFAULT_FILE) -> Topology:
    """Read and validate ``path``; raise :class:`ConfigError` naming file, line and key."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: no such file; create an anyserve.toml (see the README) or pass -c FILE"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    return loads(text, file.resolve())


def loads(text: str, path: Path) -> Topology:
    """Validate TOML ``text`` as if it were the file ``path``."""
    ctx = _Context(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{ctx.display}: invalid TOML: {exc}") from None

    ctx.check_keys(data, (), _TOP_KEYS)
    api = _api_server(ctx, ctx.table(data, ("api_server",)))
    objects = _objects(ctx, ctx.table(data, ("objects",)))
    replicas = ctx.table(data, ("replicas",))
    groups = tuple(_group(ctx, name, ctx.table(replicas, ("replicas", name))) for name in replicas)

    # Two things on one fixed port can never both start; say which keys collide.
    taken: dict[int, tuple[str, ...]] = {api.port: ("api_server", "port")}
    fixed = [(group.port, ("replicas", group.name, "port")) for group in groups]
    for port, key in [(api.grpc_port, ("api_server", "grpc_port")), *fixed]:
        if port is None:
            continue
        if port in taken:
            other = ".".join(taken[port])
            ctx.fail(key, f"port {port} is already used by {other}; choose another port")
        taken[port] = key
    return Topology(path=path, api_server=api, objects=objects, groups=groups)


def _api_server(ctx: _Context, table: dict[str, Any]) -> ApiServerSpec:
    where = ("api_server",)
    ctx.check_keys(table, where, _API_KEYS)
    default = ApiServerSpec()
    token = table.get("token")
    if (
        token is not None
        and token is not False
        and not (isinstance(token, str) and _TOKEN_RE.match(token))
    ):
        ctx.fail(
            (*where, "token"),
            "expected at least 16 visible characters without spaces (or false for none), "
            "e.g. the output of: python -c 'import secrets; print(secrets.token_urlsafe())'",
        )
    auth = ctx.string(table, (*where, "auth"), default.auth)
    if auth not in AUTH_MODES:
        ctx.fail((*where, "auth"), f"expected one of {', '.join(AUTH_MODES)}, got {auth!r}")
    return ApiServerSpec(
        host=ctx.string(table, (*where, "host"), default.host),
        port=ctx.port(table, (*where, "port"), default.port) or default.port,
        lease_ttl=ctx.duration(table, (*where, "lease_ttl"), None),
        heartbeat_interval=ctx.duration(table, (*where, "heartbeat_interval"), None),
        token=token if isinstance(token, str) else None,
        token_off=token is False,
        auth=auth,
        grpc_port=ctx.port(table, (*where, "grpc_port"), None),
        max_body_size=ctx.size(table, (*where, "max_body_size"), default.max_body_size),
    )


def _objects(ctx: _Context, table: dict[str, Any]) -> ObjectsSpec:
    where = ("objects",)
    ctx.check_keys(table, where, _OBJECT_KEYS)
    path = ctx.string(table, (*where, "path"), str(ObjectsSpec.path))
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = ctx.path.parent / resolved
    allow_pickle = table.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        ctx.wrong_type((*where, "allow_pickle"), "true or false", allow_pickle)
    return ObjectsSpec(
        path=resolved,
        ttl=ctx.duration(table, (*where, "ttl"), None),
        allow_pickle=allow_pickle,
    )


def _group(ctx: _Context, name: str, table: dict[str, Any]) -> GroupSpec:
    where = ("replicas", name)
    if not _GROUP_RE.match(name) or name == API_NAME:
        ctx.fail(
            where,
            "a group name is letters, digits, '-' and '_' (and not 'api'), e.g. [replicas.chat]",
        )
    ctx.check_keys(table, where, _GROUP_KEYS)
    if "app" not in table:
        ctx.fail(
            (*where, "app"),
            'missing; expected "module:attribute", e.g. app = "examples.mvp_demo.chat_app:app"',
            line_key=where,
        )
    app = ctx.string(table, (*where, "app"), "")
    if not _APP_RE.match(app):
        ctx.fail((*where, "app"), f'expected "module:attribute", got {app!r}')

    count = table.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        ctx.wrong_type((*where, "count"), "a whole number >= 0", count)

    env_value = table.get("env", {})
    if not isinstance(env_value, dict):
        ctx.wrong_type(
            (*where, "env"), 'a table of strings, e.g. { LOG_LEVEL = "debug" }', env_value
        )
    env: list[tuple[str, str]] = []
    for key, value in env_value.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            ctx.wrong_type((*where, "env", key), "a string", value, line_key=(*where, "env"))
        env.append((str(key), str(value)))

    watch_value = table.get("watch")
    if watch_value is None:
        watch = _default_watch(ctx.path.parent, app)
    else:
        if isinstance(watch_value, str):
            watch_value = [watch_value]
        if not isinstance(watch_value, list) or not all(isinstance(w, str) for w in watch_value):
            ctx.wrong_type((*where, "watch"), 'a list of paths, e.g. ["src/myapp"]', watch_value)
        paths = []
        for item in watch_value:
            p = Path(item).expanduser()
            p = p if p.is_absolute() else ctx.path.parent / p
            if not p.exists():
                ctx.fail(
                    (*where, "watch"), f"{item!r} does not exist (relative to {ctx.path.parent})"
                )
            paths.append(p)
        watch = tuple(paths)

    restart = ctx.string(table, (*where, "restart"), "always")
    if restart not in RESTART_POLICIES:
        ctx.fail(
            (*where, "restart"), f"expected one of {', '.join(RESTART_POLICIES)}, got {restart!r}"
        )
    drain = ctx.duration(table, (*where, "drain_timeout"), 10.0)
    max_in_flight = table.get("max_in_flight", 8)
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        ctx.wrong_type((*where, "max_in_flight"), "a whole number >= 1", max_in_flight)
    stuck = ctx.duration(table, (*where, "stuck_timeout"), 5.0)
    return GroupSpec(
        name=name,
        app=app,
        count=count,
        port=ctx.port(table, (*where, "port"), None),
        host=ctx.string(table, (*where, "host"), "127.0.0.1"),
        env=tuple(env),
        watch=watch,
        restart=restart,
        drain_timeout=10.0 if drain is None else drain,
        max_in_flight=max_in_flight,
        stuck_timeout=stuck or None,
    )


def module_file(root: Path, module: str) -> Path | None:
    """The source file of ``module`` if it lives under ``root`` (no import, no user code run)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _default_watch(root: Path, app: str) -> tuple[Path, ...]:
    """The app module's package folder; a top-level module file alone; nothing if installed."""
    module = app.split(":", 1)[0]
    file = module_file(root, module)
    if file is None:
        return ()
    if file.name == "__init__.py":
        return (file.parent,)
    if "." in module:
        return (file.parent,)
    return (file,)


class _Context:
    """The file being validated: turns a dotted key into an error with its line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        try:
            self.display = str(path.relative_to(Path.cwd()))
        except ValueError:
            self.display = str(path)

    def fail(
        self, key: tuple[str, ...], message: str, line_key: tuple[str, ...] | None = None
    ) -> NoReturn:
        line = _line_of(self.text, line_key or key)
        where = f"{self.display}:{line}" if line else self.display
        raise ConfigError(f"{where}: {'.'.join(key)}: {message}")

    def wrong_type(
        self,
        key: tuple[str, ...],
        expected: str,
        got: object,
        line_key: tuple[str, ...] | None = None,
    ) -> NoReturn:
        self.fail(key, f"expected {expected}, got {_show(got)}", line_key=line_key)

    def check_keys(
        self, table: Mapping[str, Any], where: tuple[str, ...], allowed: tuple[str, ...]
    ) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(
                    (*where, key), f"unknown key{hint}; expected one of: {', '.join(allowed)}"
                )

    def table(self, data: Mapping[str, Any], key: tuple[str, ...]) -> dict[str, Any]:
        value = data.get(key[-1], {})
        if not isinstance(value, dict):
            self.wrong_type(key, f"a table [{'.'.join(key)}]", value)
        return value

    def string(self, table: Mapping[str, Any], key: tuple[str, ...], default: str) -> str:
        value = table.get(key[-1], default)
        if not isinstance(value, str) or (key[-1] in table and not value):
            self.wrong_type(key, "a non-empty string", value)
        return value

    def port(
        self, table: Mapping[str, Any], key: tuple[str, ...], default: int | None
    ) -> int | None:
        value = table.get(key[-1], default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.wrong_type(key, "a port number 1-65535", value)
        return value

    def size(self, table: Mapping[str, Any], key: tuple[str, ...], default: int) -> int:
        if key[-1] not in table:
            return default
        value = table[key[-1]]
        try:
            return parse_size(value)
        except ValueError:
            self.wrong_type(key, 'bytes or a size like "100MiB", "512M", "1G"', value)

    def duration(
        self, table: Mapping[str, Any], key: tuple[str, ...], default: float | None
    ) -> float | None:
        if key[-1] not in table:
            return default
        from anyserve.objects import parse_duration

        value = table[key[-1]]
        try:
            return parse_duration(value)
        except BadRequest:
            self.wrong_type(key, 'seconds or a duration like "30s", "15m", "1h"', value)


def _show(value: object) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)
    text = repr(value) if not isinstance(value, (list, dict)) else ""
    return f"{text} ({kind})" if text else kind


def _line_of(text: str, key: tuple[str, ...]) -> int | None:
    """The 1-based line where ``key`` is set (or its table starts); None if not found.

    tomllib does not report positions, so this scans headers and ``key =`` lines. It
    covers the plain layout people write; anything fancier just loses the line number.
    """
    table: tuple[str, ...] = ()
    header_line: dict[tuple[str, ...], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            inner = line.strip("[]").split("#", 1)[0].strip().rstrip("]").strip()
            table = tuple(_unquote(part) for part in inner.split("."))
            header_line.setdefault(table, number)
            if table == key:
                return number
            continue
        if "=" not in line:
            continue
        lhs = tuple(_unquote(part) for part in line.split("=", 1)[0].split("."))
        full = table + lhs
        if full == key or (len(full) < len(key) and key[: len(full)] == full):
            return number
    # A group given only as sub-tables ([replicas.chat.env]) has no header of its own.
    return header_line.get(key)


def _unquote(part: str) -> str:
    return part.strip().strip("\"'")


def config_error(topology: Topology, key: tuple[str, ...], message: str) -> ConfigError:
    """A :class:`ConfigError` about ``key`` of a loaded topology, with its line if found."""
    try:
        text = topology.path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    ctx = _Context(topology.path, text)
    try:
        ctx.fail(key, message)
    except ConfigError as exc:
        return exc
