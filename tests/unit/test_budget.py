"""The ARM budget on a FixedClock: waiting is an injected sleep that advances the clock, so
every refill, wait and refusal is exact and nothing sleeps."""

from __future__ import annotations

import asyncio

import pytest

from gateway.azure.arm import ArmReadKind
from gateway.azure.budget import SubscriptionBudget
from gateway.core.clock import FixedClock
from gateway.core.errors import Code, Overloaded

SUB = "11111111-1111-1111-1111-111111111111"
SUB2 = "22222222-2222-2222-2222-222222222222"


class Sleeper:
    """An injected sleep: records each wait and advances the clock by it."""

    def __init__(self, clock: FixedClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


def make(clock: FixedClock, **kw: float) -> tuple[SubscriptionBudget, Sleeper]:
    sleeper = Sleeper(clock)
    params: dict[str, float] = {"safety_margin": 0.0, "max_wait": 1.0, **kw}
    budget = SubscriptionBudget(
        burst=params.pop("burst", 10),
        refill_per_s=params.pop("refill_per_s", 2),
        list_per_minute=int(params.pop("list_per_minute", 300)),
        clock=clock,
        sleep=sleeper,
        **params,
    )
    return budget, sleeper


async def spend(budget: SubscriptionBudget, n: int, kind: ArmReadKind = "read") -> int:
    """Acquire up to n times; the number granted before the first refusal."""
    for i in range(n):
        try:
            await budget.acquire(SUB, kind=kind)
        except Overloaded:
            return i
    return n


# (id, budget params, reads taken at once, then: seconds advanced, reads granted after)
BURSTS: list[tuple[str, dict[str, float], int, float, int]] = [
    ("a full bucket grants its burst and no more", {"max_wait": 0}, 10, 0.0, 0),
    ("the bucket refills at its rate", {"max_wait": 0}, 10, 1.5, 3),
    ("the bucket never refills beyond its burst", {"max_wait": 0}, 10, 60.0, 10),
    (
        "the safety margin keeps us below Azure's burst",
        {"max_wait": 0, "safety_margin": 0.2},
        8,
        0.0,
        0,
    ),
    (
        "the safety margin also slows the refill",
        {"max_wait": 0, "safety_margin": 0.5},
        5,
        2.0,
        2,
    ),
]


@pytest.mark.parametrize(
    ("params", "first", "advance", "after"),
    [c[1:] for c in BURSTS],
    ids=[c[0] for c in BURSTS],
)
async def test_burst_then_refill(
    params: dict[str, float], first: int, advance: float, after: int
) -> None:
    clock = FixedClock(0)
    budget, sleeper = make(clock, **params)
    assert await spend(budget, 1000) == first
    clock.advance(advance)
    assert await spend(budget, 1000) == after
    assert sleeper.waits == []


async def test_an_empty_bucket_waits_briefly_when_a_token_is_near() -> None:
    clock = FixedClock(0)
    budget, sleeper = make(clock, burst=2, refill_per_s=4, max_wait=1.0)
    assert await spend(budget, 2) == 2
    # Three waiters reserve the next three tokens: 0.25 s, 0.5 s, 0.75 s away.
    for _ in range(3):
        await budget.acquire(SUB)
    assert sleeper.waits == pytest.approx([0.25, 0.25, 0.25]), "each waits for its own token"
    assert budget.stats.waited == 3


async def test_concurrent_waiters_are_spread_over_the_refill() -> None:
    clock = FixedClock(0)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)  # the clock stands still: all reserve at once

    budget = SubscriptionBudget(
        burst=1, refill_per_s=4, safety_margin=0, max_wait=1.0, clock=clock, sleep=sleep
    )
    await budget.acquire(SUB)
    await asyncio.gather(*(budget.acquire(SUB) for _ in range(4)))
    assert waits == pytest.approx([0.25, 0.5, 0.75, 1.0])
    with pytest.raises(Overloaded) as info:
        await budget.acquire(SUB)
    assert info.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert info.value.retry_after == pytest.approx(1.25)


# (id, burst, refill/s, max_wait, expected retry_after of the refusal)
REFUSALS: list[tuple[str, float, float, float, float]] = [
    ("a token further away than max_wait is refused at once", 1, 0.5, 1.0, 2.0),
    ("max_wait zero never waits", 1, 4, 0.0, 0.25),
    ("a slow refill tells how long until a token", 1, 0.1, 5.0, 10.0),
]


@pytest.mark.parametrize(
    ("burst", "rate", "max_wait", "retry_after"),
    [c[1:] for c in REFUSALS],
    ids=[c[0] for c in REFUSALS],
)
async def test_a_far_token_is_refused_with_retry_after(
    burst: float, rate: float, max_wait: float, retry_after: float
) -> None:
    clock = FixedClock(0)
    budget, sleeper = make(clock, burst=burst, refill_per_s=rate, max_wait=max_wait)
    await budget.acquire(SUB)
    before = budget.available(SUB)
    with pytest.raises(Overloaded) as info:
        await budget.acquire(SUB)
    assert info.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert info.value.retry_after == pytest.approx(retry_after)
    assert sleeper.waits == []
    assert budget.available(SUB) == before, "a refusal reserves nothing"
    assert budget.stats.refused == 1


async def test_retry_after_closes_the_bucket_until_then() -> None:
    clock = FixedClock(0)
    budget, sleeper = make(clock, burst=100, max_wait=1.0)
    budget.observe(SUB, remaining_reads=None, retry_after=10.0)
    assert budget.closed_for(SUB) == pytest.approx(10.0)
    for _ in range(3):
        with pytest.raises(Overloaded) as info:
            await budget.acquire(SUB)
        assert info.value.code == Code.AZURE_BUDGET_EXHAUSTED
        assert info.value.retry_after == pytest.approx(10.0)
    clock.advance(9.5)
    await budget.acquire(SUB)  # 0.5 s left: within max_wait, so it waits
    assert sleeper.waits == pytest.approx([0.5])
    await budget.acquire(SUB)
    assert sleeper.waits == pytest.approx([0.5]), "open again"
    # Other subscriptions are not held back.
    budget.observe(SUB, remaining_reads=None, retry_after=30.0)
    await budget.acquire(SUB2)


async def test_a_shorter_retry_after_does_not_reopen_a_closed_bucket() -> None:
    clock = FixedClock(0)
    budget, _ = make(clock)
    budget.observe(SUB, remaining_reads=None, retry_after=20.0)
    budget.observe(SUB, remaining_reads=None, retry_after=2.0)
    assert budget.closed_for(SUB) == pytest.approx(20.0)


# (id, margin, ARM's remaining reads, our tokens after observe)
OBSERVED: list[tuple[str, float, int | None, float]] = [
    ("fewer reads left at ARM lower our estimate", 0.0, 3, 3),
    ("the margin is kept below ARM's count", 0.5, 16, 8),
    ("more reads left at ARM never raise our estimate", 0.0, 500, 10),
    ("no header changes nothing", 0.0, None, 10),
]


@pytest.mark.parametrize(
    ("margin", "remaining", "tokens"),
    [c[1:] for c in OBSERVED],
    ids=[c[0] for c in OBSERVED],
)
async def test_observe_lowers_the_estimate(
    margin: float, remaining: int | None, tokens: float
) -> None:
    clock = FixedClock(0)
    budget, _ = make(clock, burst=10 / (1 - margin), max_wait=0, safety_margin=margin)
    budget.observe(SUB, remaining_reads=remaining, retry_after=None)
    assert budget.available(SUB) == pytest.approx(tokens)
    assert await spend(budget, 1000) == int(tokens)


async def test_list_calls_also_spend_the_list_budget() -> None:
    clock = FixedClock(0)
    budget, _ = make(clock, burst=100, list_per_minute=6, max_wait=0)
    assert await spend(budget, 100, kind="list") == 6
    with pytest.raises(Overloaded) as info:
        await budget.acquire(SUB, kind="list")
    assert info.value.retry_after == pytest.approx(10.0), "6 per minute: one every 10 s"
    assert await spend(budget, 100) == 94, "plain reads still have the read bucket"
    budget.observe(SUB, remaining_reads=None, retry_after=None, remaining_lists=0)
    clock.advance(10)
    assert await spend(budget, 100, kind="list") == 1


async def test_a_list_retry_after_closes_list_calls_only() -> None:
    clock = FixedClock(0)
    budget, _ = make(clock, burst=100, max_wait=0)
    budget.observe(SUB, remaining_reads=90, retry_after=12.0, closes="list")
    assert budget.ready_in(SUB, kind="list") == pytest.approx(12.0)
    with pytest.raises(Overloaded) as info:
        await budget.acquire(SUB, kind="list")
    assert info.value.retry_after == pytest.approx(12.0)
    assert budget.ready_in(SUB) == 0.0
    assert await spend(budget, 5) == 5, "point reads go on"
    clock.advance(12)
    assert await spend(budget, 1, kind="list") == 1


# (id, budget params, list pages taken first, pages ahead, seconds until the next page)
READY: list[tuple[str, dict[str, float], int, int, float]] = [
    ("a full bucket is ready now", {"list_per_minute": 6}, 0, 0, 0.0),
    ("an empty list bucket is ready when a token refills", {"list_per_minute": 6}, 6, 0, 10.0),
    ("pages already started count ahead", {"list_per_minute": 6}, 4, 3, 20.0),
    ("reads are ready while lists are not", {"list_per_minute": 6}, 6, 0, 10.0),
]


@pytest.mark.parametrize(
    ("params", "taken", "ahead", "seconds"),
    [c[1:] for c in READY],
    ids=[c[0] for c in READY],
)
async def test_ready_in_says_when_the_next_page_is_affordable_without_spending(
    params: dict[str, float], taken: int, ahead: int, seconds: float
) -> None:
    clock = FixedClock(0)
    budget, _ = make(clock, burst=100, max_wait=0, **params)
    assert await spend(budget, taken, kind="list") == taken
    before = budget.available(SUB, kind="list")
    assert budget.ready_in(SUB, kind="list", ahead=ahead) == pytest.approx(seconds)
    assert budget.ready_in(SUB) == 0.0
    assert budget.available(SUB, kind="list") == before, "asking spends nothing"


@pytest.mark.parametrize(
    "kw",
    [
        {"safety_margin": 1.0},
        {"burst": 0},
        {"refill_per_s": 0},
        {"max_wait": -1},
    ],
    ids=[
        "a margin of the whole limit is refused",
        "an empty burst is refused",
        "no refill is refused",
        "a negative wait is refused",
    ],
)
def test_bad_parameters_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SubscriptionBudget(clock=FixedClock(0), **kw)  # type: ignore[arg-type]
