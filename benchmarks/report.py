"""The results as rich tables on the terminal (plain text when not a terminal)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

ROUTE_NAMES = {
    "grpc": "direct gRPC ModelInfer",
    "json": "/infer/json",
    "proto": "/infer (protobuf)",
    "sse": "/infer/stream (SSE)",
}
STREAM_NAMES = {"grpc": "direct gRPC ModelStreamInfer", "sse": "/infer/stream (SSE)"}


def _n(value: Any, digits: int = 0) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _busy(figures: dict[str, Any]) -> str:
    busy = figures.get("busy", {})
    return " ".join(
        f"{name[0]}{busy[name]:.2f}" for name in ("api", "replica", "client") if name in busy
    )


def machine(results: dict[str, Any]) -> Text:
    meta = results["meta"]
    load = meta.get("loadavg_start", [])
    return Text(
        f"{meta.get('cpu_model', '?')} · {meta.get('nproc', '?')} cores · Python "
        f"{meta.get('python', '?')} · load average at start {', '.join(map(str, load))} · "
        f"anyserve {meta.get('commit', '?')[:12]} · {meta.get('mode', '?')} mode · "
        f"log level {results['settings'].get('log_level', '?')}",
        style="dim",
    )


def unary_table(results: dict[str, Any]) -> Table:
    table = Table(title="Unary echo (closed loop; busy = CPU s per s of api/replica/client)")
    for column in ("route", "conc", "req/s", "p50 ms", "p99 ms", "x direct", "+p50 ms"):
        table.add_column(column, justify="left" if column == "route" else "right")
    table.add_column("x direct\n(CPU model)", justify="right")
    table.add_column("API CPU ms/req", justify="right")
    table.add_column("busy", justify="left")
    unary, ratios = results["unary"], results["ratios"]
    for concurrency in unary["grpc"]:
        for route in ("grpc", "json", "proto"):
            f = unary[route][concurrency]
            ratio = ratios[concurrency].get(f"{route}_over_direct_rps")
            added = ratios[concurrency].get(f"{route}_added_p50_ms")
            model = ratios[concurrency].get(f"{route}_over_direct_cpu_model")
            name = ROUTE_NAMES[route] + (" *" if f.get("client_bound") else "")
            table.add_row(
                name,
                concurrency,
                _n(f["rps"]),
                _n(f["p50_ms"], 2),
                _n(f["p99_ms"], 2),
                _n(ratio, 2) if ratio is not None else "1",
                _n(added, 2) if added is not None else "",
                _n(model, 2) if model is not None else "",
                _n(f.get("cpu_ms_per_request"), 3),
                _busy(f),
            )
        table.add_section()
    table.caption = (
        "* within 80% of the client's own ceiling (or the client was busy): generator-bound. "
        "CPU model: the req/s ratio if CPU per request were the only limit (idle machine)."
    )
    return table


def streaming_table(results: dict[str, Any]) -> Table:
    table = Table(title="Streaming (11 events per stream, no delay)")
    for column in ("route", "streams", "events/s", "first p50 ms", "first p99 ms", "stream p50 ms"):
        table.add_column(column, justify="left" if column == "route" else "right")
    table.add_column("API CPU ms/event", justify="right")
    table.add_column("busy", justify="left")
    streaming = results["streaming"]
    for streams in streaming["grpc"]:
        for route in ("grpc", "sse"):
            f = streaming[route][streams]
            table.add_row(
                STREAM_NAMES[route],
                streams,
                _n(f["events_per_s"]),
                _n(f["first_event_p50_ms"], 2),
                _n(f["first_event_p99_ms"], 2),
                _n(f["stream_p50_ms"], 2),
                _n(f.get("cpu_ms_per_event"), 3),
                _busy(f),
            )
    return table


def objects_table(results: dict[str, Any]) -> Table:
    table = Table(title="Object store (median of reps; reads from the page cache)")
    for column in ("size", "create MiB/s", "plain write", "x", "get MiB/s", "plain read", "x"):
        table.add_column(column, justify="left" if column == "size" else "right")
    table.add_column("create ops/s", justify="right")
    for label, f in results["objects"]["local"].items():
        table.add_row(
            label,
            _n(f["create_mib_s"], 1),
            _n(f["write_mib_s"], 1),
            _n(f["create_over_write"], 2),
            _n(f["get_mib_s"], 1),
            _n(f["read_mib_s"], 1),
            _n(f["get_over_read"], 2),
            _n(f["create_ops_s"], 0),
        )
    http = results["objects"].get("http")
    if http:
        table.add_section()
        table.add_row(
            "64MiB over HTTP",
            _n(http["upload_mib_s"], 1),
            "(store)",
            _n(http["upload_over_create"], 2),
            _n(http["download_mib_s"], 1),
            "(store)",
            _n(http["download_over_get"], 2),
            "",
        )
    return table


def startup_table(results: dict[str, Any]) -> Table:
    table = Table(title="Start-up")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    startup = results["startup"]
    help_ = startup["help"]
    table.add_row(
        "anyserve --help (median)", _n(help_["median_s"], 3), f"{len(help_['runs_s'])} runs"
    )
    up = startup["up"]
    if up["status"] == "ok":
        api_s, first_s = _n(up.get("api_server_s"), 2), _n(up.get("first_replica_s"), 2)
        detail = f"{up['replicas']} replicas; API server up at {api_s} s, first replica {first_s} s"
        table.add_row("anyserve up → all registered", _n(up["registered_s"], 2), detail)
    else:
        table.add_row("anyserve up → all registered", up["status"], up.get("reason", "")[:80])
    reload = startup["reload"]
    if reload["status"] == "ok":
        runs = ", ".join(_n(r, 2) for r in reload["runs_s"])
        detail = f"runs {runs}; failed requests {reload['failed_requests']}"
        table.add_row("save → new code answering (median)", _n(reload["median_s"], 2), detail)
        for reason in reload.get("failures", [])[:2]:
            table.add_row("  a request failed during a reload", "", reason[:100])
    else:
        table.add_row("save → new code answering", reload["status"], reload.get("reason", "")[:80])
    return table


def ceiling_table(results: dict[str, Any]) -> Table:
    table = Table(title="Load generator ceiling (same clients, endpoints that do nothing)")
    table.add_column("endpoint")
    for concurrency in results["ceiling"]["http_trivial"]:
        table.add_column(f"c={concurrency} req/s", justify="right")
    names = {
        "http_trivial": "trivial HTTP server (fixed 200)",
        "api_health": "API server GET /health",
        "grpc_live": "replica gRPC ServerLive",
    }
    for key, name in names.items():
        row = results["ceiling"][key]
        table.add_row(name, *(_n(f["rps"]) for f in row.values()))
    wrk = results.get("wrk")
    if wrk:
        table.add_section()
        table.add_row("wrk → /infer/json", *(_n(f.get("rps")) for f in wrk["json"].values()))
    return table


def budgets_table(results: dict[str, Any]) -> Table:
    table = Table(title="Budgets")
    for column in ("budget", "value", "target", "status"):
        table.add_column(column, justify="left" if column == "budget" else "right")
    styles = {"PASS": "green", "MISS": "bold red", "n/a": "yellow"}
    for row in results["budgets"]:
        value = row["value"]
        shown = "-" if value is None else f"{_figure(value)} {row['unit']}"
        table.add_row(
            row["name"],
            shown,
            f"{row['op']} {row['target']:g} {row['unit']}",
            Text(row["status"], style=styles[row["status"]]),
        )
    return table


def _figure(value: float) -> str:
    """Three significant digits, large numbers whole with separators (8,137, not 8.14e+03)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def profile_tables(results: dict[str, Any]) -> list[Table]:
    profile = results.get("profile")
    if not profile or profile.get("status") != "ok":
        return []
    columns = [
        (phase, process)
        for phase in ("infer_json", "infer_stream")
        for process in ("api", "replica")
        if profile.get(phase, {}).get(process, {}).get("status") == "ok"
    ]
    parts = Table(title="Profile: share of working samples by component (py-spy, idle left out)")
    parts.add_column("component")
    for phase, process in columns:
        parts.add_column(f"{process} {phase}", justify="right")
    names: list[str] = []
    for phase, process in columns:
        for name in profile[phase][process]["components"]:
            if name not in names:
                names.append(name)
    for name in names:
        cells = [profile[p][q]["components"].get(name) for p, q in columns]
        parts.add_row(name, *("" if c is None else f"{c * 100:.1f}%" for c in cells))
    tables = [parts]
    api = profile.get("infer_json", {}).get("api", {})
    if api.get("status") == "ok":
        top = Table(title="API server under /infer/json: top frames (share of working samples)")
        top.add_column("self", justify="right")
        top.add_column("frame")
        top.add_column("incl", justify="right")
        top.add_column("frame")
        for own, under in zip(api["self"][:12], api["inclusive"][:12], strict=False):
            top.add_row(
                f"{own['share'] * 100:.1f}%",
                own["frame"],
                f"{under['share'] * 100:.1f}%",
                under["frame"],
            )
        tables.append(top)
    return tables


def render(results: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [machine(results)]
    for build in (unary_table, streaming_table, objects_table, startup_table, ceiling_table):
        parts.append(build(results))
    parts.extend(profile_tables(results))
    parts.append(budgets_table(results))
    return Group(*parts)


def show(results: dict[str, Any], console: Console | None = None) -> None:
    (console or Console(width=140)).print(render(results))
