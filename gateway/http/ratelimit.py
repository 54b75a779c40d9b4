"""Per-client rate limits: a token bucket per client address (DESIGN §2, 429).

The address is the effective client address (after trusted-proxy headers), so a
balancer's own address is never what gets limited. Off by default: VMs behind one NAT
gateway share an address, and a storm from them is legitimate; operators who expose the
gateway to networks with many unrelated clients turn it on. In-process (per worker), on
the injected clock, bounded in memory.
"""

from __future__ import annotations

from gateway.core.clock import Clock
from gateway.core.errors import Code, Overloaded

__all__ = ["ClientRateLimiter"]


class ClientRateLimiter:
    """Parameters: ``rate`` requests per second per address (0 = no limit), ``burst``
    bucket size, ``max_clients`` addresses tracked at once."""

    def __init__(
        self, *, rate: float, burst: float, clock: Clock, max_clients: int = 100_000
    ) -> None:
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._clock = clock
        self._max = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def check(self, address: str) -> None:
        """Spend one token for ``address``; ``Overloaded(rate_limited)`` when none is left."""
        if self._rate <= 0:
            return
        now = self._clock.monotonic()
        tokens, at = self._buckets.get(address, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            raise Overloaded(
                Code.RATE_LIMITED,
                retry_after=(1.0 - tokens) / self._rate,
                detail=f"client {address} over {self._rate}/s",
            )
        if address not in self._buckets and len(self._buckets) >= self._max:
            # Full buckets carry no information: drop them first (bounded under churn).
            self._buckets = {a: v for a, v in self._buckets.items() if v[0] < self._burst}
            if len(self._buckets) >= self._max:
                self._buckets.clear()
        self._buckets[address] = (tokens - 1.0, now)
