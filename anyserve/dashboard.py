"""Moved to :mod:`anyserve.up.dashboard` (the view) and :mod:`anyserve.up.snapshot`
(the data it draws); these names stay importable from here for existing callers."""

from __future__ import annotations

from anyserve.up.dashboard import (
    STATE_STYLES,
    Dashboard,
    format_bytes,
    format_capability,
    format_duration,
    plain,
    process_table,
    replica_table,
)
from anyserve.up.snapshot import LogLine, ProcessView, ReplicaView, Snapshot

__all__ = [
    "STATE_STYLES",
    "Dashboard",
    "LogLine",
    "ProcessView",
    "ReplicaView",
    "Snapshot",
    "format_bytes",
    "format_capability",
    "format_duration",
    "plain",
    "process_table",
    "replica_table",
]
