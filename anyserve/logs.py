"""Events of ``anyserve up`` and the one place they are formatted.

Everything the supervisor has to say — a child's output line, a process starting,
becoming ready, crashing, a reload — is an :class:`Event`. The supervisor hands each
event to :class:`LogFiles` (``.anyserve/logs/<name>.<N>.log``, rotated by size), and
either to :class:`Printer` (prefixed ``name.N |`` lines, coloured on a terminal) or to
the dashboard. ``anyserve logs`` reads the same files back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

SUPERVISOR = "up"
"""The prefix of the supervisor's own lines."""

# Colours that read on dark and light terminals; a name always gets the same one.
_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_RED = "\x1b[31m"
_YELLOW = "\x1b[33m"


@dataclass(frozen=True)
class Event:
    """One thing worth telling: ``kind`` is ``"output"`` (a child's line), ``"lifecycle"``
    (started, ready, stopped), ``"exit"`` (an unexpected exit), ``"reload"`` or ``"error"``."""

    kind: str
    name: str
    message: str
    stream: str = "stdout"
    at: float = field(default_factory=time.time)

    @property
    def is_output(self) -> bool:
        return self.kind == "output"

    def text(self) -> str:
        """The line as written to files and plain consoles."""
        return self.message if self.is_output else f"[anyserve] {self.message}"


def colour_of(name: str) -> int:
    """A stable ANSI colour for a process name (``chat.0`` and ``chat.1`` share ``chat``'s)."""
    return _COLOURS[zlib.crc32(name.split(".", 1)[0].encode()) % len(_COLOURS)]


class Printer:
    """Writes events as ``name.N | line``; colours only when the output is a terminal."""

    def __init__(
        self, out: TextIO | None = None, colour: bool | None = None, width: int = 8
    ) -> None:
        self.out = out or sys.stdout
        self.colour = self.out.isatty() if colour is None else colour
        self.width = width

    def __call__(self, event: Event) -> None:
        self.line(event.name, event.text(), event.kind)

    def line(self, name: str, text: str, kind: str = "output") -> None:
        prefix = f"{name:<{self.width}} |"
        if self.colour:
            prefix = f"\x1b[{colour_of(name)}m{prefix}{_RESET}"
            if kind == "error":
                text = f"{_RED}{text}{_RESET}"
            elif kind == "exit":
                text = f"{_YELLOW}{text}{_RESET}"
            elif kind != "output":
                text = f"{_DIM}{text}{_RESET}"
        try:
            self.out.write(f"{prefix} {text}\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away (`anyserve up | head`); keep supervising


class LogFiles:
    """One append-only file per process name, rotated at ``max_bytes`` (``keep`` old ones)."""

    def __init__(self, directory: Path, max_bytes: int = 5_000_000, keep: int = 3) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep
        self._files: dict[str, IO[str]] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def write(self, event: Event) -> None:
        name = event.name
        handle = self._files.get(name)
        if handle is None:
            handle = self._files[name] = open(self.path(name), "a", encoding="utf-8")  # noqa: SIM115
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        handle.write(f"{stamp} {event.text()}\n")
        handle.flush()
        if handle.tell() >= self.max_bytes:
            self._rotate(name)

    def _rotate(self, name: str) -> None:
        self._files.pop(name).close()
        base = self.path(name)
        for index in range(self.keep - 1, 0, -1):
            older = base.with_name(f"{base.name}.{index}")
            if older.exists():
                os.replace(older, base.with_name(f"{base.name}.{index + 1}"))
        os.replace(base, base.with_name(f"{base.name}.1"))

    def close(self) -> None:
        for handle in self._files.values():
            with contextlib.suppress(OSError):
                handle.close()
        self._files.clear()


def log_names(directory: Path, name: str | None = None) -> list[str]:
    """Process names with a log file, filtered by ``name`` (``chat`` matches ``chat.0``)."""
    if not directory.is_dir():
        return []
    names = sorted(p.name[: -len(".log")] for p in directory.glob("*.log"))
    if name is None:
        return names
    return [n for n in names if n == name or n.split(".", 1)[0] == name]


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (read from the end, so big files stay cheap)."""
    if lines <= 0 or not path.exists():
        return []
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        block = 8192
        data = b""
        while size > 0 and data.count(b"\n") <= lines:
            step = min(block, size)
            size -= step
            handle.seek(size)
            data = handle.read(step) + data
    text = data.decode("utf-8", errors="replace").splitlines()
    return text[-lines:]


def follow(
    directory: Path,
    names: list[str],
    name: str | None,
    interval: float = 0.25,
    stop: float | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ``(name, line)`` as lines are appended; picks up new files and rotations."""
    offsets: dict[str, int] = {}
    for n in names:
        with contextlib.suppress(OSError):
            offsets[n] = (directory / f"{n}.log").stat().st_size
    partial: dict[str, bytes] = {}
    while stop is None or time.monotonic() < stop:
        for n in log_names(directory, name):
            path = directory / f"{n}.log"
            try:
                size = path.stat().st_size
            except OSError:
                continue
            start = offsets.get(n, 0)
            if size < start:  # rotated: the new file starts from the beginning
                start = 0
                partial.pop(n, None)
            if size == start:
                continue
            with open(path, "rb") as handle:
                handle.seek(start)
                data = partial.pop(n, b"") + handle.read(size - start)
            offsets[n] = size
            *complete, rest = data.split(b"\n")
            if rest:
                partial[n] = rest
            for raw in complete:
                yield n, raw.decode("utf-8", errors="replace")
        time.sleep(interval)
