"""Which groups a set of changed files reloads, and the bytecode those changes stale."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from anyserve.topology import Topology, module_file


def drop_stale_bytecode(paths: Iterable[str]) -> None:
    """Remove cached bytecode of changed sources.

    A pyc is trusted when the source's mtime (whole seconds) and size match; an edit
    within the same second that keeps the size would otherwise load the old code.
    """
    for raw in paths:
        path = Path(raw)
        if path.suffix != ".py":
            continue
        for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            with contextlib.suppress(OSError):
                cached.unlink()


def changed_groups(topology: Topology, paths: Iterable[str]) -> list[str]:
    """The groups whose watch paths contain a changed file.

    With the default watch (the app's package folder) several groups often share one
    folder; a change to one group's own app module then reloads only that group.
    """
    app_files: dict[str, str] = {}
    for group in topology.groups:
        found = module_file(topology.root, group.app.split(":", 1)[0])
        if found is not None:
            app_files[group.name] = os.path.realpath(found)
    owners: dict[str, set[str]] = {}
    for name, file in app_files.items():
        owners.setdefault(file, set()).add(name)
    paths = list(paths)
    hit: list[str] = []
    for group in topology.groups:
        roots = [os.path.realpath(p) for p in group.watch]
        for raw in paths:
            path = os.path.realpath(raw)
            if not any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                continue
            owner = owners.get(path)
            if owner is not None and group.name not in owner:
                continue  # another group's app module, not imported by this one (we assume)
            hit.append(group.name)
            break
    return hit
