from __future__ import annotations

import asyncio

import pytest

from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock


async def test_concurrent_misses_share_one_load() -> None:
    cache: MemoryCache[str, int] = MemoryCache("t", clock=FixedClock(0))
    calls = 0
    gate = asyncio.Event()

    async def loader() -> tuple[int, float]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42, 10.0

    tasks = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [42] * 50
    assert calls == 1
    assert (cache.stats.misses, cache.stats.coalesced) == (1, 49)
    assert await cache.get_or_load("k", loader) == 42
    assert cache.stats.hits == 1 and calls == 1


async def test_entries_expire_on_the_injected_clock() -> None:
    clock = FixedClock(0)
    cache: MemoryCache[str, str] = MemoryCache("t", clock=clock)
    cache.set("k", "v", ttl=10)
    clock.advance(9.9)
    assert cache.get("k") == "v"
    clock.advance(0.2)
    assert cache.get("k") is None


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache: MemoryCache[str, int] = MemoryCache("t", clock=FixedClock(0))
    gate = asyncio.Event()
    attempts = 0

    async def failing() -> tuple[int, float]:
        nonlocal attempts
        attempts += 1
        await gate.wait()
        raise RuntimeError("boom")

    tasks = [asyncio.create_task(cache.get_or_load("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert attempts == 1

    async def ok() -> tuple[int, float]:
        return 7, 5.0

    assert await cache.get_or_load("k", ok) == 7


async def test_a_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    cache: MemoryCache[str, int] = MemoryCache("t", clock=FixedClock(0))
    gate = asyncio.Event()

    async def loader() -> tuple[int, float]:
        await gate.wait()
        return 1, 5.0

    first = asyncio.create_task(cache.get_or_load("k", loader))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get_or_load("k", loader))
    await asyncio.sleep(0)
    second.cancel()
    gate.set()
    assert await first == 1
    with pytest.raises(asyncio.CancelledError):
        await second


def test_max_entries_bounds_memory() -> None:
    cache: MemoryCache[int, int] = MemoryCache("t", max_entries=100, clock=FixedClock(0))
    for i in range(1000):
        cache.set(i, i, ttl=60)
    assert len(cache) <= 100
    assert cache.get(999) == 999


async def test_null_cache_runs_the_loader_every_time() -> None:
    from gateway.core.cache import NullCache

    cache: NullCache[str, int] = NullCache("naive")
    calls = 0

    async def loader() -> tuple[int, float]:
        nonlocal calls
        calls += 1
        return calls, 60.0

    assert [await cache.get_or_load("k", loader) for _ in range(3)] == [1, 2, 3]
    cache.set("k", 9, 60)
    assert cache.get("k") is None


def test_an_empty_cache_is_still_truthy() -> None:
    """``cache or default`` must keep a caller's empty cache (it once dropped NullCache
    and every metrics observer)."""
    from gateway.core.cache import NullCache

    assert MemoryCache("empty") and NullCache("naive")


async def test_the_jwks_client_uses_the_cache_it_is_given() -> None:
    import aiohttp

    from gateway.azure.jwks import JwksClient
    from gateway.core.cache import NullCache
    from gateway.core.cloud import CLOUDS

    seen: list[str] = []
    cache: NullCache[str, object] = NullCache("jwks", observer=seen.append)
    async with aiohttp.ClientSession() as session:
        client = JwksClient(
            session,
            cloud=CLOUDS["public"],
            clock=FixedClock(0),
            cache=cache,  # type: ignore[arg-type]
        )
        assert client._cache is cache
