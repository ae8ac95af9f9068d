"""``python -m benchmarks``: start the pieces, run every section, print and save the results.

Sections run one after another, never overlapping, so each has the machine (such as it
is when others share it) to itself: the generator's ceiling, unary, streaming, the object
store, wrk when installed, the optional profile, then start-up with everything else stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from benchmarks import budgets, ceiling, report, startup, storage, streaming, unary, wrk
from benchmarks.load import run_async
from benchmarks.servers import (
    ROOT,
    ApiServer,
    Children,
    Replica,
    start_api_server,
    start_replica,
    start_trivial,
)
from benchmarks.settings import Settings

DEFAULT_JSON = ROOT / "benchmarks" / "results.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Measure AnyServe against its own budgets: unary and streaming requests through "
            "the API server vs straight to the replica, API server CPU, object store, start-up."
        ),
    )
    p.add_argument("--quick", action="store_true", help="every figure, measured briefly (< 30 s)")
    p.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the results (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds each load phase measures (default 3; 0.4 with --quick)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="also sample the API server with py-spy under /infer/json; stacks go to DIR",
    )
    p.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check")
    p.add_argument(
        "--quiet-logs",
        action="store_true",
        help="run the API server and replica at log level warning (no line per request)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        p.error("--duration must be a positive number of seconds")
    return args


def meta(settings: Settings) -> dict[str, Any]:
    """The machine and software the run measured."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "commit": _commit(),
        "mode": "quick" if settings.quick else "default",
        "packages": _versions(
            "grpcio", "protobuf", "starlette", "uvicorn", "uvloop", "httptools", "orjson"
        ),
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "anyserve"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def _versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


async def _load_sections(
    api: ApiServer,
    replica: Replica,
    trivial_port: int,
    settings: Settings,
    results: dict[str, Any],
    profile_dir: Path | None,
) -> None:
    from benchmarks import profile

    results["ceiling"] = await ceiling.measure(api, replica, trivial_port, settings)
    results["unary"] = await unary.measure(api, replica, settings)
    results["ratios"] = unary.ratios(results["unary"], os.cpu_count() or 1)
    ceiling.mark_client_bound(results["unary"], results["ceiling"])
    results["streaming"] = await streaming.measure(api, replica, settings)
    if profile_dir is not None:
        results["profile"] = await profile.profile(api, replica, settings, profile_dir)


def measure(
    settings: Settings, use_wrk: bool, profile_dir: Path | None, quiet_logs: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {"meta": meta(settings), "settings": _settings_dict(settings)}
    results["settings"]["log_level"] = "warning" if quiet_logs else "default (info)"
    with Children() as children:
        store_dir = children.dir / "objects"
        settings.progress(f"starting the API server and an echo replica (logs in {children.dir})")
        api = start_api_server(children, store_dir, quiet_logs)
        replica = start_replica(children, api, store_dir, quiet_logs)
        trivial_port = start_trivial(children)
        run_async(_load_sections(api, replica, trivial_port, settings, results, profile_dir))
        local = storage.local(children.dir, settings)
        http = run_async(storage.over_http(api, settings, local["64MiB"]))
        results["objects"] = {"local": local, "http": http}
        if use_wrk and wrk.available() and not settings.quick:
            results["wrk"] = wrk.measure(api, settings)
        for child in list(children.started):  # start-up is timed on a quiet machine
            children.stop(child)
        results["startup"] = {
            "help": startup.help_time(settings),
            **startup.up_and_reload(children, settings),
        }
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["seconds"] = round(time.monotonic() - settings.started, 1)
    results["budgets"] = budgets.evaluate(results)
    return results


def _settings_dict(settings: Settings) -> dict[str, Any]:
    return {
        "duration_s": settings.duration,
        "rounds": settings.rounds,
        "warmup_s": settings.warmup,
        "max_requests": settings.max_requests,
        "concurrencies": list(settings.concurrencies),
        "stream_counts": list(settings.stream_counts),
        "object_reps": {str(size): reps for size, reps in settings.object_reps},
        "reloads": settings.reloads,
    }


def _interrupt(signum: int, frame: object) -> NoReturn:
    # Every stop signal takes the way out of Ctrl-C: the Children block stops everything.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    make = Settings.quick_mode if args.quick else Settings.default
    settings = make(args.duration, quiet=args.quiet)
    # SIGINT too: a shell starts background jobs with it ignored, and the run must stop.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        results = measure(settings, not args.no_wrk, args.profile, args.quiet_logs)
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        sys.exit(130)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")
    report.show(results)
    print(f"results: {args.json} ({results['meta']['seconds']} s)")


def _finite(value: Any) -> Any:
    """NaN (a figure with no samples) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
