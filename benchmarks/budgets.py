"""AnyServe's performance budgets, each read from the results and marked PASS, MISS or n/a."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    """``value at path`` ``op`` ``target``, e.g. ratios.16.json_over_direct_rps >= 0.6."""

    name: str
    path: tuple[str, ...]
    op: str  # "<=", "<" or ">="
    target: float
    unit: str

    def value(self, results: dict[str, Any]) -> float | None:
        node: Any = results
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
            return None
        return float(node)

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.target
        if self.op == "<":
            return value < self.target
        return value <= self.target


BUDGETS = (
    Budget(
        "/infer/json req/s at c=16 ÷ direct gRPC",
        ("ratios", "16", "json_over_direct_rps"),
        ">=",
        0.6,
        "x",
    ),
    Budget(
        "/infer/json p50 added over direct gRPC at c=1",
        ("ratios", "1", "json_added_p50_ms"),
        "<=",
        0.5,
        "ms",
    ),
    Budget(
        "API server CPU per /infer/json request (c=16)",
        ("unary", "json", "16", "cpu_ms_per_request"),
        "<=",
        0.5,
        "ms",
    ),
    Budget(
        "/infer/stream first event p50, 1 stream",
        ("streaming", "sse", "1", "first_event_p50_ms"),
        "<=",
        3.0,
        "ms",
    ),
    Budget(
        "/infer/stream events/s, 16 streams",
        ("streaming", "sse", "16", "events_per_s"),
        ">=",
        5000,
        "ev/s",
    ),
    Budget(
        "object store 64 MiB create ÷ plain write",
        ("objects", "local", "64MiB", "create_over_write"),
        ">=",
        0.8,
        "x",
    ),
    Budget(
        "object store 64 MiB get ÷ plain read",
        ("objects", "local", "64MiB", "get_over_read"),
        ">=",
        0.8,
        "x",
    ),
    Budget("anyserve --help", ("startup", "help", "median_s"), "<", 0.3, "s"),
    Budget(
        "anyserve up of the demo to all registered",
        ("startup", "up", "registered_s"),
        "<=",
        3.0,
        "s",
    ),
    Budget(
        "file save → new code answering (median)", ("startup", "reload", "median_s"), "<=", 2.0, "s"
    ),
)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per budget: name, value, op, target, unit, status (PASS, MISS or n/a)."""
    rows = []
    for budget in BUDGETS:
        value = budget.value(results)
        status = "n/a" if value is None else "PASS" if budget.met(value) else "MISS"
        rows.append(
            {
                "name": budget.name,
                "path": ".".join(budget.path),
                "value": value,
                "op": budget.op,
                "target": budget.target,
                "unit": budget.unit,
                "status": status,
            }
        )
    return rows
