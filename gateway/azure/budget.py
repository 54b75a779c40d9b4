"""The gateway's own ARM read budget: a token bucket per subscription (DESIGN §5).

Azure throttles Resource Manager reads with a token bucket per subscription and principal
(250 burst, +25/s) and Compute's list calls with a budget of its own (300 per minute); past
either, ARM answers ``429`` + ``Retry-After``
(https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-
throttling). A join storm that *discovers* those limits by hitting them turns into a 429
storm, and every join behind it fails. So the gateway keeps its own, slightly smaller,
buckets and spends from them before every request (each page of a list counts):

* ``safety_margin`` keeps us that fraction below Azure's limits (other tools in the
  subscription read too, and our clock is not ARM's);
* ``observe`` lowers our estimate when ARM's ``x-ms-ratelimit-remaining-subscription-reads``
  (or, for list calls, ``x-ms-ratelimit-remaining-resource``) says fewer remain than we
  think — never raises it: the server's count is per principal, ours per subscription;
* a ``Retry-After`` (a ``429``) closes the subscription's bucket until then;
* an empty bucket makes the caller wait, but only up to ``max_wait`` and only when a token
  will be there by then; otherwise ``Overloaded(AZURE_BUDGET_EXHAUSTED, retry_after=…)``
  right away, which the HTTP layer renders as ``503`` + ``Retry-After``.

Waiters *reserve* their token (the bucket goes negative), so N concurrent waiters are
spread over the refill instead of all waking at once for the same token.

All time comes from the injected clock and all waiting from the injected ``sleep``, so the
behaviour is tested on a ``FixedClock`` without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.azure.arm import ArmReadKind
from gateway.azure.resource_id import azure_name_key
from gateway.core.clock import Clock
from gateway.core.errors import Code, Overloaded

__all__ = ["BudgetStats", "SubscriptionBudget"]

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class BudgetStats:
    """Counters for metrics and tests."""

    granted: int = 0
    waited: int = 0
    refused: int = 0
    lowered: int = 0
    closed: int = 0


@dataclass
class _Bucket:
    tokens: float
    last: float

    def refill(self, now: float, capacity: float, rate: float) -> None:
        if now > self.last:
            self.tokens = min(capacity, self.tokens + (now - self.last) * rate)
            self.last = now

    def wait_for_one(self, rate: float, ahead: int = 0) -> float:
        """Seconds until one whole token is there (0 if it is), after ``ahead`` more
        have been taken."""
        need = 1.0 + ahead
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / rate


@dataclass
class _Subscription:
    reads: _Bucket
    lists: _Bucket
    closed_until: float = 0.0
    lists_closed_until: float = 0.0  # a 429 of Compute's list budget: list calls only


class SubscriptionBudget:
    """Parameters:

    * burst, refill_per_s — Azure's subscription-read bucket (250, +25/s).
    * list_per_minute — Compute's list budget (300 per minute, refilled evenly).
    * safety_margin — the fraction of each limit we leave unused (0 ≤ m < 1).
    * max_wait — the longest a caller waits for a token before being refused.
    * clock — injected; buckets refill on ``clock.monotonic()``.
    * sleep — how a caller waits (default ``asyncio.sleep``; tests advance a clock).
    """

    def __init__(
        self,
        *,
        burst: float = 250,
        refill_per_s: float = 25,
        list_per_minute: int = 300,
        safety_margin: float = 0.1,
        max_wait: float = 1.0,
        clock: Clock,
        sleep: Sleep | None = None,
    ) -> None:
        if burst < 1 or refill_per_s <= 0 or list_per_minute < 1:
            raise ValueError("burst and list_per_minute must be >= 1, refill_per_s > 0")
        if not 0.0 <= safety_margin < 1.0:
            raise ValueError("safety_margin must be in [0, 1)")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        keep = 1.0 - safety_margin
        self._read_capacity = max(1.0, burst * keep)
        self._read_rate = refill_per_s * keep
        self._list_capacity = max(1.0, list_per_minute * keep)
        self._list_rate = list_per_minute * keep / 60.0
        self._keep = keep
        self._max_wait = max_wait
        self._clock = clock
        self._sleep: Sleep = sleep or asyncio.sleep
        self._subs: dict[str, _Subscription] = {}
        self.stats = BudgetStats()

    # -- ArmBudget ----------------------------------------------------------------------

    async def acquire(self, subscription: str, *, kind: ArmReadKind = "read") -> None:
        """Spend one read (and, for ``kind="list"``, one list call) for ``subscription``;
        wait briefly for it, or raise ``Overloaded(AZURE_BUDGET_EXHAUSTED)``."""
        now = self._clock.monotonic()
        sub = self._state(subscription, now)
        wait = self.ready_in(subscription, kind=kind)
        if wait > self._max_wait:
            self.stats.refused += 1
            raise Overloaded(
                Code.AZURE_BUDGET_EXHAUSTED,
                retry_after=wait,
                detail=(
                    f"our ARM {kind} budget for subscription {subscription.lower()} "
                    f"has a token in {wait:.2f}s"
                ),
            )
        # Reserve now (possibly going negative) so later callers queue behind this one.
        sub.reads.tokens -= 1.0
        if kind == "list":
            sub.lists.tokens -= 1.0
        self.stats.granted += 1
        if wait > 0:
            self.stats.waited += 1
            await self._sleep(wait)

    def observe(
        self,
        subscription: str,
        *,
        remaining_reads: int | None,
        retry_after: float | None,
        remaining_lists: int | None = None,
        closes: ArmReadKind = "read",
    ) -> None:
        """What ARM said: lower our estimates to its counts less the margin (``count *
        (1 - safety_margin)``); a ``Retry-After`` closes the subscription until then
        (``closes="list"``: its list calls only, point reads go on)."""
        now = self._clock.monotonic()
        sub = self._state(subscription, now)
        if remaining_reads is not None:
            ceiling = remaining_reads * self._keep
            if ceiling < sub.reads.tokens:
                sub.reads.tokens = ceiling
                self.stats.lowered += 1
        if remaining_lists is not None:
            ceiling = remaining_lists * self._keep
            if ceiling < sub.lists.tokens:
                sub.lists.tokens = ceiling
                self.stats.lowered += 1
        if retry_after is not None and retry_after > 0 and closes == "list":
            sub.lists_closed_until = max(sub.lists_closed_until, now + retry_after)
        elif retry_after is not None and retry_after > 0:
            until = now + retry_after
            if until > sub.closed_until:
                sub.closed_until = until
                self.stats.closed += 1
                logger.warning(
                    "ARM asked us to wait %.1fs for subscription %s: budget closed",
                    retry_after,
                    subscription.lower(),
                )

    def ready_in(self, subscription: str, *, kind: ArmReadKind = "read", ahead: int = 0) -> float:
        """Seconds until a token of ``kind`` is there for the next caller (0: now), the
        reservations of waiters and ``ahead`` more callers included. ``VmDirectory`` uses
        it to choose a point read over a list page that could not be fetched in time,
        without spending."""
        now = self._clock.monotonic()
        sub = self._state(subscription, now)
        wait = max(0.0, sub.closed_until - now, sub.reads.wait_for_one(self._read_rate, ahead))
        if kind == "list":
            wait = max(
                wait,
                sub.lists_closed_until - now,
                sub.lists.wait_for_one(self._list_rate, ahead),
            )
        return wait

    # -- introspection ------------------------------------------------------------------

    def available(self, subscription: str, *, kind: ArmReadKind = "read") -> float:
        """Tokens we think are left now (negative: reserved by waiters)."""
        sub = self._state(subscription, self._clock.monotonic())
        return sub.lists.tokens if kind == "list" else sub.reads.tokens

    def closed_for(self, subscription: str) -> float:
        """Seconds until a ``Retry-After`` hold ends (0 when open)."""
        now = self._clock.monotonic()
        return max(0.0, self._state(subscription, now).closed_until - now)

    def __repr__(self) -> str:
        return (
            f"<SubscriptionBudget reads={self._read_capacity:g}+{self._read_rate:g}/s "
            f"lists={self._list_capacity:g}+{self._list_rate:g}/s "
            f"subscriptions={len(self._subs)} {self.stats}>"
        )

    # -- plumbing -----------------------------------------------------------------------

    def _state(self, subscription: str, now: float) -> _Subscription:
        key = azure_name_key(subscription)
        sub = self._subs.get(key)
        if sub is None:
            sub = self._subs[key] = _Subscription(
                reads=_Bucket(self._read_capacity, now), lists=_Bucket(self._list_capacity, now)
            )
        else:
            sub.reads.refill(now, self._read_capacity, self._read_rate)
            sub.lists.refill(now, self._list_capacity, self._list_rate)
        return sub
