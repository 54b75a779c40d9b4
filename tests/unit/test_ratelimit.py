from __future__ import annotations

import pytest

from gateway.core.clock import FixedClock
from gateway.core.errors import Code, Overloaded
from gateway.http.ratelimit import ClientRateLimiter


def test_a_burst_then_refill_per_address() -> None:
    clock = FixedClock(0)
    limiter = ClientRateLimiter(rate=2, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("10.0.0.1")
    with pytest.raises(Overloaded) as err:
        limiter.check("10.0.0.1")
    assert err.value.code == Code.RATE_LIMITED and err.value.status == 429
    assert err.value.retry_after == pytest.approx(0.5)
    limiter.check("10.0.0.2")  # another client is not affected
    clock.advance(0.5)
    limiter.check("10.0.0.1")  # one token back after 1/rate seconds


def test_rate_zero_is_off() -> None:
    limiter = ClientRateLimiter(rate=0, burst=1, clock=FixedClock(0))
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check("10.0.0.1")


def test_memory_stays_bounded_under_address_churn() -> None:
    limiter = ClientRateLimiter(rate=1, burst=5, clock=FixedClock(0), max_clients=100)
    for i in range(5000):
        limiter.check(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter._buckets) <= 100
