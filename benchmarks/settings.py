"""How long and how often each section measures: the default run and ``--quick``."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    """One run's sizes. ``quick()`` keeps every figure but measures each only briefly."""

    quick: bool = False
    #: Seconds each load figure measures in all, split over ``rounds`` turns.
    duration: float = 3.0
    rounds: int = 3
    #: Seconds of load before each phase's measurement (connections open, caches warm).
    warmup: float = 0.2
    #: Quick mode caps each phase by count as well, so the whole run stays small.
    max_requests: int | None = None
    concurrencies: tuple[int, ...] = (1, 16, 64)
    stream_counts: tuple[int, ...] = (1, 16)
    #: Ceiling phases are shorter: they only need to show the order of magnitude.
    ceiling_duration: float = 2.0
    #: Object sizes (bytes) and how many times each is written and read.
    object_reps: tuple[tuple[int, int], ...] = ((1024, 200), (1 << 20, 30), (64 << 20, 4))
    http_object_reps: int = 3
    help_reps: int = 5
    reloads: int = 5
    quiet: bool = False
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def default(cls, duration: float | None = None, quiet: bool = False) -> Settings:
        if duration is None:
            return cls(quiet=quiet)
        return cls(duration=duration, ceiling_duration=min(2.0, duration), quiet=quiet)

    @classmethod
    def quick_mode(cls, duration: float | None = None, quiet: bool = False) -> Settings:
        return cls(
            quick=True,
            duration=duration or 0.4,
            rounds=1,
            warmup=0.1,
            max_requests=60,
            ceiling_duration=duration or 0.3,
            object_reps=((1024, 20), (1 << 20, 3), (64 << 20, 2)),
            http_object_reps=1,
            help_reps=1,
            reloads=1,
            quiet=quiet,
        )

    def progress(self, message: str) -> None:
        """One line on stderr so a person sees the run move (the table comes at the end)."""
        if not self.quiet:
            elapsed = time.monotonic() - self.started
            print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)
