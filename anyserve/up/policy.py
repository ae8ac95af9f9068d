"""How ``anyserve up`` paces itself: restart backoff and the loop's timings."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff: ``initial`` doubling to ``cap``, with jitter; ``stable_after``
    seconds of being ready forgive past failures; ``crash_loop_after`` quick failures in a
    row put the process in the crash-loop state."""

    initial: float = 0.5
    cap: float = 30.0
    stable_after: float = 60.0
    crash_loop_after: int = 4
    jitter: float = 0.15

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.cap, self.initial * 2 ** max(0, failures - 1))
        return base * (1 - self.jitter + 2 * self.jitter * rand())


@dataclass(frozen=True)
class Timings:
    """How often the loop looks at things; shortened only by tests."""

    tick: float = 0.1
    poll_fast: float = 0.2
    poll_slow: float = 1.0
    sample: float = 1.0
    settle: float = 1.0
    """After unregistering, wait this long before SIGTERM: a request routed just before
    the unregister still reaches the old process while it is accepting."""
    ready_timeout: float = 60.0
    kill_margin: float = 5.0
    api_grace: float = 5.0
    debounce_ms: int = 300
    probe_every: float = 1.0
    """How often every ready replica is asked ``ServerReady``..."""
    probe_timeout: float = 1.0
    """... and how long it has to answer (an idle replica answers in a millisecond)."""
