"""Exponential backoff with full jitter, and ``Retry-After`` parsing.

When a scale-out starts thousands of agents within a minute, a fixed retry schedule makes them
come back in lock-step and knock the gateway over again. Full jitter (a uniform draw between 0
and the exponential ceiling, see https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/)
spreads them out. A ``Retry-After`` from the gateway is a floor: we never come back sooner.
"""

from __future__ import annotations

import random

# A gateway asking for more than an hour is misconfigured; do not park the node for hours.
from gateway.core.httputil import MAX_RETRY_AFTER, parse_retry_after

__all__ = ["Backoff", "parse_retry_after"]


class Backoff:
    """Delay before retry number ``attempt`` (1-based: the delay after the first failure is 1).

    Parameters:
        base: ceiling of the first delay, seconds.
        cap: ceiling of any delay, seconds.
        rng: the random source (tests pass a seeded ``random.Random``).
    """

    def __init__(self, *, base: float, cap: float, rng: random.Random | None = None) -> None:
        if base < 0 or cap < 0:
            raise ValueError("base and cap must be >= 0")
        self._base = base
        self._cap = cap
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int) -> float:
        exponent = max(0, min(attempt - 1, 62))
        return float(min(self._cap, self._base * 2.0**exponent))

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        jittered = self._rng.uniform(0.0, self.ceiling(attempt))
        if retry_after is not None:
            return max(min(retry_after, MAX_RETRY_AFTER), jittered)
        return jittered

    def __repr__(self) -> str:
        return f"Backoff(base={self._base}, cap={self._cap})"
