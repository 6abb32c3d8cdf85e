"""Where a command's time goes: named phases with their start and duration, for `--debug-timings`.

A phase is timed with `with timings.phase("mount toolchain"):` or added afterwards from a number another
process measured (`add`). The report lists phases in the order they started, each with its offset from
the start of the command and its duration, so overlaps and gaps show.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float  # since the Timings began
    duration_s: float


class Timings:
    def __init__(self) -> None:
        self.origin = time.monotonic()
        self.phases: list[Phase] = []
        self._lock = threading.Lock()  # phases may end on other threads (a mount started in the background)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start, start)

    def add(self, name: str, duration_s: float, started: float | None = None) -> None:
        """Record a phase; STARTED is a time.monotonic() value (default: it ended just now)."""
        started = time.monotonic() - duration_s if started is None else started
        with self._lock:
            self.phases.append(Phase(name, started - self.origin, duration_s))

    def report(self) -> list[str]:
        """One line per phase, in start order: offset, duration, name."""
        with self._lock:
            phases = sorted(self.phases, key=lambda p: p.start_s)
        lines = [f"timings: total {time.monotonic() - self.origin:.3f} s (offset, duration, phase)"]
        lines += [f"timings: {p.start_s:7.3f} {p.duration_s:7.3f}  {p.name}" for p in phases]
        return lines


class NoTimings(Timings):
    """Timings that keep nothing (the default: no lock taken, no list grown)."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def add(self, name: str, duration_s: float, started: float | None = None) -> None:
        pass
