"""The injected clock. Checks never call ``time.time()`` themselves."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "FixedClock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (wall clock)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds, for durations, TTLs and rate limits."""
        ...

    def now(self) -> datetime:
        """Aware UTC datetime of :meth:`time`."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time(), tz=UTC)

    def __repr__(self) -> str:
        return "SystemClock()"


class FixedClock:
    """A clock for tests and ``inspect --at``: pinned; it moves only by ``advance``."""

    def __init__(self, at: datetime | float) -> None:
        self._t = at.timestamp() if isinstance(at, datetime) else float(at)
        self._mono = 1000.0

    def time(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._t, tz=UTC)

    def advance(self, seconds: float) -> None:
        self._t += seconds
        self._mono += seconds

    def __repr__(self) -> str:
        return f"FixedClock({self.now().isoformat()})"
