from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.core.cache import Cache, MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.redis_tier import JsonCodec, TieredCache


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


def _memory() -> Cache[str, int]:
    return MemoryCache("t", clock=FixedClock(0))


def _tiered() -> Cache[str, int]:
    # Without a shared tier: the in-process tier's single flight behind TieredCache.
    return TieredCache(MemoryCache("t", clock=FixedClock(0)), None, JsonCodec(int, int))


@pytest.mark.parametrize(
    "make",
    [_memory, _tiered],
    ids=["the memory cache", "the tiered cache"],
)
@pytest.mark.parametrize(
    "cancel",
    [[0], [0, 2], [1]],
    ids=[
        "the leader cancelled mid-load",
        "the leader and a follower cancelled mid-load",
        "a follower cancelled mid-load",
    ],
)
async def test_cancelling_callers_mid_load_leaves_the_others_the_value(
    make: Callable[[], Cache[str, int]], cancel: list[int]
) -> None:
    cache = make()
    gate = asyncio.Event()
    calls = 0
    finished = 0

    async def loader() -> tuple[int, float]:
        nonlocal calls, finished
        calls += 1
        await gate.wait()
        finished += 1
        return 42, 10.0

    tasks = []
    for _ in range(4):
        tasks.append(asyncio.create_task(cache.get_or_load("k", loader)))
        await asyncio.sleep(0)  # task 0 is the leader: it started the load
    for i in cancel:
        tasks[i].cancel()
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i in cancel:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == 42
    assert (calls, finished) == (1, 1), "the load ran once, to the end"
    assert cache.get("k") == 42, "and its value was kept"


async def test_a_load_whose_every_caller_is_cancelled_still_completes() -> None:
    cache: MemoryCache[str, int] = MemoryCache("t", clock=FixedClock(0))
    gate = asyncio.Event()

    async def loader() -> tuple[int, float]:
        await gate.wait()
        return 5, 10.0

    only = asyncio.create_task(cache.get_or_load("k", loader))
    await asyncio.sleep(0)
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert cache.get("k") == 5

    async def never() -> tuple[int, float]:
        raise AssertionError("the detached load's value serves the next caller")

    assert await cache.get_or_load("k", never) == 5


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


async def test_a_cancelled_join_leaves_the_jwks_fetch_to_the_others() -> None:
    """The single flight as the JWKS client uses it, against the emulator's Entra ID: the
    request that started the key fetch is cancelled mid-fetch; the others get the key
    from the same one fetch."""
    import aiohttp

    from gateway.azure.jwks import JwksClient
    from gateway.core.cloud import CLOUDS
    from gateway.dev.emulator import AzureEmulator, Latency

    async with AzureEmulator(latency=Latency(arm=0, entra=0.2, aia=0, imds=0)) as emu:
        tenant = emu.add_tenant()
        kid = emu._tenant(tenant).signer.kid  # test-only: the tenant's current key id
        connector = aiohttp.TCPConnector(ssl=emu.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            jwks = JwksClient(
                session, cloud=CLOUDS["public"], authority_host=emu.https_url, clock=FixedClock(0)
            )
            leader = asyncio.create_task(jwks.key_for(tenant, kid))
            await asyncio.sleep(0.05)  # the leader's fetch is under way
            others = [asyncio.create_task(jwks.key_for(tenant, kid)) for _ in range(3)]
            await asyncio.sleep(0)
            leader.cancel()
            keys = await asyncio.gather(*others)
            with pytest.raises(asyncio.CancelledError):
                await leader
    assert len({k.public_numbers() for k in keys}) == 1
    assert emu.counters.get("entra.jwks", 0) == 1, "one fetch, run to its end"
