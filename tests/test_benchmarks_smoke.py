"""The benchmark still runs and reports every figure (``python -m benchmarks --quick``).

Numbers are not checked against budgets here: a test machine is too noisy for that.
The test keeps the benchmark from rotting as the code it measures changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

CONCURRENCIES = ("1", "16", "64")
STREAMS = ("1", "16")
SIZES = ("1KiB", "1MiB", "64MiB")


def figure_paths() -> list[tuple[str, ...]]:
    """Every figure the benchmark promises, as a path into the results JSON."""
    paths: list[tuple[str, ...]] = []
    for c in CONCURRENCIES:
        for route in ("grpc", "json", "proto"):
            paths += [("unary", route, c, key) for key in ("rps", "p50_ms", "p99_ms")]
        for route in ("json", "proto"):
            paths.append(("unary", route, c, "cpu_ms_per_request"))
            paths.append(("ratios", c, f"{route}_over_direct_rps"))
            paths.append(("ratios", c, f"{route}_added_p50_ms"))
            paths.append(("ratios", c, f"{route}_over_direct_cpu_model"))
        for endpoint in ("http_trivial", "api_health", "grpc_live"):
            paths.append(("ceiling", endpoint, c, "rps"))
    for n in STREAMS:
        for route in ("grpc", "sse"):
            for key in ("events_per_s", "first_event_p50_ms", "first_event_p99_ms"):
                paths.append(("streaming", route, n, key))
        paths.append(("streaming", "sse", n, "cpu_ms_per_event"))
    for size in SIZES:
        for key in ("create_mib_s", "write_mib_s", "get_mib_s", "read_mib_s"):
            paths.append(("objects", "local", size, key))
        paths += [("objects", "local", size, k) for k in ("create_over_write", "get_over_read")]
    for key in ("upload_mib_s", "download_mib_s", "upload_over_create", "download_over_get"):
        paths.append(("objects", "http", key))
    paths.append(("startup", "help", "median_s"))
    return paths


def lookup(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = results
    for key in path:
        assert isinstance(node, dict) and key in node, f"missing {'.'.join(path)}"
        node = node[key]
    return node


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--quiet", "--no-wrk", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    data: dict[str, Any] = json.loads(Path(out).read_text())
    return data


def test_every_figure_is_a_number(results: dict[str, Any]) -> None:
    missing = [".".join(p) for p in figure_paths() if not is_number(lookup(results, p))]
    assert not missing, f"not numbers: {missing}"


def test_every_load_phase_answered_without_errors(results: dict[str, Any]) -> None:
    for section in ("unary", "streaming"):
        for route, phases in results[section].items():
            for key, figures in phases.items():
                assert figures["requests"] > 0, (section, route, key)
                assert figures["errors"] == 0, (section, route, key, figures.get("first_error"))


def test_start_up_figures_or_a_reason(results: dict[str, Any]) -> None:
    up, reload = results["startup"]["up"], results["startup"]["reload"]
    # `anyserve up` may not exist yet in an older tree: then the section says so.
    assert up["status"] in ("ok", "unavailable"), up
    if up["status"] == "ok":
        assert is_number(up["registered_s"])
        assert reload["status"] == "ok", reload
        assert is_number(reload["median_s"])
        # Counted, not asserted: a reload that fails requests is the supervisor's bug to fix,
        # which the benchmark reports; this test only keeps the benchmark itself working.
        assert isinstance(reload["failed_requests"], int)


def test_every_budget_is_judged(results: dict[str, Any]) -> None:
    rows = results["budgets"]
    assert len(rows) == 10
    for row in rows:
        if row["status"] == "n/a":
            assert row["path"].startswith("startup."), row
        else:
            assert row["status"] in ("PASS", "MISS") and is_number(row["value"]), row
