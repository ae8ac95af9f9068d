"""HTTP client for a running AnyServe API server, used by the ``anyserve`` client commands.

:class:`Client` wraps the HTTP surface (SPEC §4, §6): inference as JSON or as a stream of
server-sent events, the registry, and the object routes with uploads and downloads that
stream in chunks so memory stays flat whatever the object's size. It is the one place where
transport failures and error replies become :mod:`anyserve.errors` exceptions: a server that
cannot be reached is :class:`~anyserve.errors.NotReachable`, an error reply is the error for
its status with the server's message.

The helpers at the bottom build inference bodies from command-line style arguments
(``type=chat``, ``x:FP32=1,2,3``); they raise :class:`ValueError` on malformed input so the
CLI can report a usage error.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from anyserve.addresses import reachable_host
from anyserve.capability import headers_for, value_text
from anyserve.errors import (
    AnyServeError,
    BadRequest,
    ConfigError,
    DeadlineExceeded,
    NotReachable,
    Unavailable,
    from_status,
)

if TYPE_CHECKING:
    import httpx

DEFAULT_API_SERVER = "http://127.0.0.1:8080"
ENV_API_SERVER = "ANYSERVE_API_SERVER"
ENV_TOKEN = "ANYSERVE_TOKEN"
CONFIG_FILE = "anyserve.toml"
CHUNK_SIZE = 1024 * 1024
# Extra seconds the client waits beyond a request's own deadline, so the API server's
# deadline error (with its message) arrives before the client gives up on its own.
DEADLINE_MARGIN = 5.0


# --------------------------------------------------------------------------- where the server is


def _read_config(cwd: Path) -> dict[str, Any]:
    """The ``[api_server]`` table of ``anyserve.toml`` in ``cwd`` (empty when there is none)."""
    path = cwd / CONFIG_FILE
    if not path.is_file():
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from exc
    table = data.get("api_server", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [api_server] must be a table")
    return table


def normalize_url(url: str) -> str:
    """``host:port`` or ``http(s)://host:port[/]`` → ``http(s)://host:port`` (no trailing slash)."""
    url = url.strip()
    if not url:
        raise BadRequest("the API server address is empty; give e.g. http://127.0.0.1:8080")
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise BadRequest(f"API server address {url!r} must start with http:// or https://")
    return url.rstrip("/")


def resolve_api_server(
    option: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """The API server URL: ``option``, else ``$ANYSERVE_API_SERVER``, else the ``[api_server]``
    host/port of ``anyserve.toml`` in ``cwd`` (a wildcard host means this machine), else
    ``http://127.0.0.1:8080``."""
    env = os.environ if env is None else env
    if option:
        return normalize_url(option)
    if env.get(ENV_API_SERVER):
        return normalize_url(env[ENV_API_SERVER])
    table = _read_config(Path.cwd() if cwd is None else cwd)
    if table:
        path = (Path.cwd() if cwd is None else cwd) / CONFIG_FILE
        host = str(table.get("host", "127.0.0.1"))
        port = table.get("port", 8080)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"{path}: [api_server] port must be a number 1-65535, not {port!r}")
        # A server bound to every interface is reached on this machine through loopback.
        host = reachable_host(host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{port}"
    return DEFAULT_API_SERVER


def resolve_token(*, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str | None:
    """The bearer token: ``$ANYSERVE_TOKEN``, else ``[api_server] token`` of ``anyserve.toml``,
    else the token ``anyserve up`` created in ``.anyserve/token`` of the current folder.

    There is deliberately no command-line option: arguments are visible to every user in ``ps``.
    """
    env = os.environ if env is None else env
    if env.get(ENV_TOKEN):
        return env[ENV_TOKEN]
    folder = Path.cwd() if cwd is None else cwd
    token = _read_config(folder).get("token")
    if isinstance(token, str) and token:
        return token
    try:
        created = (folder / ".anyserve" / "token").read_text().strip()
    except OSError:
        return None
    return created or None


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class ReplyMeta:
    """What the API server says about how a request was routed (from its reply headers)."""

    request_id: str | None = None
    replica: str | None = None
    # (replica id, requests in flight when the choice was made) per matching replica
    candidates: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ReplyMeta:
        return cls(
            request_id=headers.get("x-request-id"),
            replica=headers.get("x-anyserve-replica"),
            candidates=parse_candidates(headers.get("x-anyserve-candidates", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "replica": self.replica,
            "candidates": [{"replica_id": r, "in_flight": n} for r, n in self.candidates],
        }


def parse_candidates(header: str) -> tuple[tuple[str, int | None], ...]:
    """``"id1=0,id2=1"`` → ``(("id1", 0), ("id2", 1))``; a load that is not a number is None."""
    out: list[tuple[str, int | None]] = []
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        rid, _, load = item.partition("=")
        try:
            out.append((rid.strip(), int(load)))
        except ValueError:
            out.append((rid.strip(), None))
    return tuple(out)


@dataclass(frozen=True)
class InferResult:
    """A ``/infer/json`` reply: the body in the `/infer/json` JSON shape and the routing headers."""

    body: dict[str, Any]
    meta: ReplyMeta = field(default_factory=ReplyMeta)


class Client:
    """A synchronous client of one API server.

    ``timeout`` is the default read timeout in seconds (``None`` waits forever); connecting
    gives up after a few seconds so that a server that is down is reported at once.
    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float | None = 60.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        self.base_url = normalize_url(base_url)
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(5.0, timeout or 5.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn transport failures into AnyServe errors that name the server."""
        import httpx

        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NotReachable(f"API server not reachable at {self.base_url}") from exc
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(
                f"the API server at {self.base_url} did not answer in time"
                " (raise --timeout for long requests)"
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise Unavailable(
                f"the API server at {self.base_url} closed the connection:"
                f" {exc or type(exc).__name__}"
            ) from exc
        except httpx.HTTPError as exc:
            raise AnyServeError(f"request to {self.base_url} failed: {exc}") from exc

    @staticmethod
    def _check(response: httpx.Response) -> None:
        """Raise the AnyServe error for an error reply (the body must have been read)."""
        if response.status_code < 400:
            return
        message = ""
        try:
            data = response.json()
            if isinstance(data, dict):
                message = str(data.get("detail") or data.get("error") or "")
        except ValueError:
            # Not an AnyServe reply (a proxy's HTML page, say): one short line of it.
            message = " ".join(response.text.split())[:200]
        if not message:
            message = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        raise from_status(response.status_code, message)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._translated():
            response = self._http.request(method, path, **kwargs)
        self._check(response)
        return response

    def _infer_headers(
        self, capability: Mapping[str, str], timeout: float | None, request_id: str | None
    ) -> dict[str, str]:
        headers = capability_headers(capability)
        if timeout is not None:
            headers["X-Request-Timeout"] = f"{timeout:g}"
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    def _timeout(self, timeout: float | None) -> Any:
        import httpx

        if timeout is None:
            return httpx.USE_CLIENT_DEFAULT
        return httpx.Timeout(timeout + DEADLINE_MARGIN, connect=5.0)

    # ------------------------------------------------------------------ routes

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return dict(self._request("GET", "/health").json())

    def infer_json(
        self,
        body: Mapping[str, Any],
        capability: Mapping[str, str],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        """``POST /infer/json``: route ``body`` to a replica serving ``capability``.

        ``timeout`` (seconds) is sent as ``X-Request-Timeout`` and bounds the wait here too.
        """
        response = self._request(
            "POST",
            "/infer/json",
            json=dict(body),
            headers=self._infer_headers(capability, timeout, request_id),
            timeout=self._timeout(timeout),
        )
        try:
            data = response.json()
        except ValueError as exc:
            raise AnyServeError(f"the API server answered with invalid JSON: {exc}") from exc
        return InferResult(body=data, meta=ReplyMeta.from_headers(response.headers))

    def stream(
        self,
        body: Mapping[str, Any],
        capability: Mapping[str, str],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EventStream:
        """``POST /infer/stream``: an iterable of the parsed events, read as they arrive.

        An error event (``{"error": ...}``) ends the iteration with an AnyServe error.
        """
        return EventStream(
            self,
            dict(body),
            self._infer_headers(capability, timeout, request_id),
            self._timeout(timeout),
        )

    def registry(self) -> dict[str, Any]:
        """``GET /registry``: ``{"replicas": [...], "total": N}``."""
        return dict(self._request("GET", "/registry").json())

    def unregister(self, replica_id: str) -> dict[str, Any]:
        """``DELETE /unregister``: remove a replica's record from the registry."""
        response = self._request("DELETE", "/unregister", json={"replica_id": replica_id})
        try:
            data = response.json()
        except ValueError:
            data = {}
        if isinstance(data, dict) and data.get("success") is False:
            raise from_status(404, str(data.get("detail") or f"no replica {replica_id!r}"))
        return data if isinstance(data, dict) else {}

    def objects(self) -> list[dict[str, Any]]:
        """``GET /objects``: the stored objects as ObjRef dicts."""
        data = self._request("GET", "/objects").json()
        if isinstance(data, dict):
            data = data.get("objects", [])
        return [dict(item) for item in data]

    def put_object(
        self,
        chunks: Iterable[bytes],
        *,
        key: str | None = None,
        content_type: str = "bytes",
        size: int | None = None,
    ) -> dict[str, Any]:
        """``POST /objects``: upload ``chunks`` as they are produced; the new ObjRef dict.

        With ``size`` the upload carries a Content-Length (so a server limit can refuse it up
        front); without, it is sent chunked.
        """
        params = {"type": content_type}
        if key:
            params["key"] = key
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        response = self._request(
            "POST", "/objects", params=params, content=iter(chunks), headers=headers
        )
        return dict(response.json())

    @contextmanager
    def get_object(self, key: str) -> Iterator[Download]:
        """``GET /objects/{key}``, streamed: use as ``with client.get_object(k) as d:``."""
        with self._translated(), self._http.stream("GET", "/objects/" + quote(key, safe="")) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            length = r.headers.get("content-length")
            yield Download(r, int(length) if length and length.isdigit() else None)

    def delete_object(self, key: str) -> None:
        """``DELETE /objects/{key}``."""
        self._request("DELETE", "/objects/" + quote(key, safe=""))


@dataclass
class Download:
    """An object being downloaded: ``size`` when the server said it, chunks as they arrive."""

    _response: httpx.Response
    size: int | None

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        yield from self._response.iter_bytes(chunk_size)


class EventStream:
    """The events of one ``/infer/stream`` call; iterate it once.

    ``meta`` holds the routing headers once the reply has started.
    """

    def __init__(self, client: Client, body: dict[str, Any], headers: dict[str, str], timeout: Any):
        self._client = client
        self._body = body
        self._headers = headers
        self._timeout = timeout
        self.meta = ReplyMeta()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        client = self._client
        with (
            client._translated(),
            client._http.stream(
                "POST",
                "/infer/stream",
                json=self._body,
                headers=self._headers,
                timeout=self._timeout,
            ) as response,
        ):
            if response.status_code >= 400:
                response.read()
                client._check(response)
            self.meta = ReplyMeta.from_headers(response.headers)
            for data in sse_data(response.iter_lines()):
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise AnyServeError(
                        f"the API server sent an invalid event: {data[:200]}"
                    ) from exc
                if isinstance(event, dict) and "error" in event and len(event) <= 2:
                    status = event.get("status", 500)
                    raise from_status(
                        status if isinstance(status, int) else 500, str(event["error"])
                    )
                yield event


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event in ``lines`` (multi-line data joined by newlines)."""
    buf: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if name == "data":
            buf.append(value[1:] if value.startswith(" ") else value)
    if buf:
        yield "\n".join(buf)


# --------------------------------------------------------------------------- request building

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_NAME = re.compile(r"^[^\s=:\[\]]+$")


def parse_assignment(text: str, what: str = "KEY=VALUE") -> tuple[str, str]:
    """``"key=value"`` → ``("key", "value")``; ValueError when there is no ``=`` or no key."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected {what}, got {text!r}")
    return key, value


def parse_capability(items: Iterable[str]) -> dict[str, str]:
    """``["type=chat", "gpus=2"]`` → ``{"type": "chat", "gpus": "2"}``."""
    caps: dict[str, str] = {}
    for item in items:
        key, value = parse_assignment(item)
        if not _KEY.match(key):
            raise ValueError(
                f"capability key {key!r} must be letters, digits, '_' or '-' (in {item!r})"
            )
        if not value.strip():
            raise ValueError(f"capability {key!r} has no value (in {item!r})")
        caps[key] = value.strip()
    return caps


# The SDK's names for the shared codec (the CLI and user code import them from here).
capability_text = value_text
capability_headers = headers_for


def text_input(name: str, text: str) -> dict[str, Any]:
    """A BYTES input holding one string, in the `/infer/json` JSON shape."""
    return {
        "name": name,
        "datatype": "BYTES",
        "shape": [1],
        "contents": {"bytes_contents": [text]},
    }


def _number(datatype: str, text: str) -> Any:
    text = text.strip()
    if datatype == "BOOL":
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a BOOL (true/false)")
    if datatype.startswith(("INT", "UINT")):
        value = int(text, 0)
        if datatype.startswith("UINT") and value < 0:
            raise ValueError(f"{text!r} is negative but the type is {datatype}")
        return value
    return float(text)


def parse_input(spec: str) -> dict[str, Any]:
    """One ``--input``: ``NAME=TEXT`` (a BYTES string) or ``NAME:TYPE[SHAPE]=v1,v2,...``.

    ``x:FP32=1,2,3`` is FP32 of shape [3]; ``m:INT64[2,2]=1,2,3,4`` gives the shape;
    ``tags:BYTES=a,b`` is two strings.
    """
    lhs, value = parse_assignment(spec, "NAME=VALUE or NAME:TYPE=v1,v2,...")
    name, _, typed = lhs.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"input name {name!r} is not valid (in {spec!r})")
    if not typed:
        return text_input(name, value)
    from anyserve.tensors import DATATYPE_FIELD

    m = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*(?:\[([0-9,\s]*)\])?\s*", typed)
    if not m:
        raise ValueError(f"expected NAME:TYPE or NAME:TYPE[SHAPE], got {lhs!r}")
    datatype = m.group(1).upper()
    if datatype not in DATATYPE_FIELD:
        raise ValueError(
            f"datatype {datatype!r} is not one of {', '.join(DATATYPE_FIELD)} (in {spec!r})"
        )
    if datatype == "BYTES":
        values: list[Any] = value.split(",") if value else []
    else:
        try:
            values = [_number(datatype, v) for v in value.split(",")] if value.strip() else []
        except ValueError as exc:
            raise ValueError(f"input {name!r}: {exc}") from exc
    shape = [len(values)]
    if m.group(2) is not None:
        shape = [int(d) for d in m.group(2).split(",") if d.strip()]
        count = 1
        for d in shape:
            count *= d
        if count != len(values):
            raise ValueError(
                f"input {name!r}: shape {shape} needs {count} values, got {len(values)}"
            )
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "contents": {DATATYPE_FIELD[datatype]: values},
    }


def load_body(spec: str) -> dict[str, Any]:
    """A request body given as JSON text, ``@FILE`` or ``@-`` (standard input)."""
    source = "the body"
    text = spec
    if spec.startswith("@"):
        source = spec[1:] or "-"
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise BadRequest(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(f'{source} must be a JSON object like {{"inputs": [...]}}')
    return body


def build_body(
    *,
    text: str | None = None,
    inputs: Iterable[Mapping[str, Any]] = (),
    objects: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``/infer/json`` body: ``body`` as given, with the other inputs appended.

    ``text`` becomes the input ``text``; ``objects`` maps input names to object keys, passed by
    reference as BYTES inputs (the replica reads the object from the shared store).
    """
    out: dict[str, Any] = dict(body or {})
    all_inputs: list[Any] = list(out.get("inputs") or [])
    if text is not None:
        all_inputs.append(text_input("text", text))
    all_inputs.extend(dict(i) for i in inputs)
    for name, key in (objects or {}).items():
        all_inputs.append(text_input(name, key))
    names = [i.get("name") for i in all_inputs if isinstance(i, dict)]
    dupes = sorted({str(n) for n in names if names.count(n) > 1})
    if dupes:
        raise BadRequest(f"input {', '.join(dupes)} given more than once")
    out["inputs"] = all_inputs
    return out


def object_key(ref: str) -> str:
    """The store key named by ``ref``: a key, a path inside a store, or an ObjRef's JSON form."""
    ref = ref.strip()
    if ref.startswith("{"):
        try:
            data = json.loads(ref)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("key"), str):
            return str(data["key"])
    if "/" in ref:
        return Path(ref).name
    return ref
