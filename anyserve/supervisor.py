"""Moved to the :mod:`anyserve.up` package; these names stay importable from here for
existing callers."""

from __future__ import annotations

from anyserve.up.changes import changed_groups, drop_stale_bytecode
from anyserve.up.policy import RestartPolicy, Timings
from anyserve.up.run import run
from anyserve.up.supervisor import Supervisor
from anyserve.up.tokens import TOKEN_FILE, token_file, token_plan

__all__ = [
    "TOKEN_FILE",
    "RestartPolicy",
    "Supervisor",
    "Timings",
    "changed_groups",
    "drop_stale_bytecode",
    "run",
    "token_file",
    "token_plan",
]
