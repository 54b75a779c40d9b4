"""TTL caches with single flight.

``Cache`` is the small interface every cached lookup goes through (JWKS per issuer,
intermediates per AIA URL, verified chains per signer, VM records, scale-set maps).
``MemoryCache`` is the in-process tier: a dict with expiries read from the injected
clock (so TTL behaviour is tested without sleeping) and *single flight*: N concurrent
misses for one key run the loader once, the other N-1 await its result.

The in-process tier is our own rather than aiocache's ``SimpleMemoryCache`` because
that one expires keys with ``loop.call_later`` timers (one per key, not driven by an
injectable clock). The shared Redis tier is ``gateway.core.redis_tier`` (redis.asyncio; why not
aiocache's Redis backend is explained there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from gateway.core.clock import Clock, SystemClock

__all__ = ["Cache", "CacheStats", "Loader", "MemoryCache", "NullCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
KC = TypeVar("KC", bound=Hashable, contravariant=True)

# A loader returns the value and how many seconds it may be kept.
Loader = Callable[[], Awaitable[tuple[V, float]]]


class Cache(Protocol[KC, V]):
    """What the clients need of a cache: ``MemoryCache`` (in-process) and
    ``gateway.core.redis_tier.TieredCache`` (in-process in front of Redis) both are one."""

    @property
    def name(self) -> str: ...

    def get(self, key: KC) -> V | None: ...

    def set(self, key: KC, value: V, ttl: float) -> None: ...

    def delete(self, key: KC) -> None: ...

    async def get_or_load(self, key: KC, loader: Loader[V]) -> V: ...

    def __len__(self) -> int: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    loads_failed: int = 0


class MemoryCache(Generic[K, V]):
    """Parameters:

    * name — for metrics and ``repr``.
    * max_entries — beyond it the oldest-inserted entries are dropped (bounded memory
      under hostile key churn).
    * clock — injected; expiries use ``clock.monotonic()``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_entries: int = 100_000,
        clock: Clock | None = None,
        observer: Callable[[str], None] | None = None,
    ):
        self.name = name
        # Told "hit", "miss" or "coalesced" on every get_or_load (metrics).
        self._observe = observer or _ignore
        self._max = max_entries
        self._clock = clock or SystemClock()
        self._data: dict[K, tuple[float, V]] = {}
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self.stats = CacheStats()

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock.monotonic():
            del self._data[key]
            return None
        return value

    def set(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._data.pop(key, None)
            return
        if key not in self._data and len(self._data) >= self._max:
            # dicts keep insertion order: drop the oldest tenth in one go.
            for old in list(self._data)[: max(1, self._max // 10)]:
                del self._data[old]
        self._data[key] = (self._clock.monotonic() + ttl, value)

    def delete(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    async def get_or_load(self, key: K, loader: Loader[V]) -> V:
        """The cached value, or the loader's; concurrent misses share one load.

        The load runs as its own task, detached from the caller that started it: every
        caller (the first included) awaits it through ``asyncio.shield``, so a caller
        that is cancelled (its request failed elsewhere, its client went away) stops
        waiting without cancelling the load the others wait for, and the load runs once.
        A failing load is not cached: every waiter gets the exception, and the next
        caller tries again.
        """
        value = self.get(key)
        if value is not None:
            self.stats.hits += 1
            self._observe("hit")
            return value
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats.coalesced += 1
            self._observe("coalesced")
        else:
            self.stats.misses += 1
            self._observe("miss")
            pending = asyncio.ensure_future(self._load(key, loader))
            pending.add_done_callback(_retrieve)
            self._inflight[key] = pending
        return await asyncio.shield(pending)

    async def _load(self, key: K, loader: Loader[V]) -> V:
        try:
            value, ttl = await loader()
        except BaseException:
            self.stats.loads_failed += 1
            raise
        else:
            self.set(key, value, ttl)
            return value
        finally:
            self._inflight.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        # A cache is a dependency, not a container: an empty one must not be falsy, or
        # ``cache or MemoryCache(...)`` silently replaces the one a caller passed in.
        return True

    def __repr__(self) -> str:
        return (
            f"<MemoryCache {self.name} entries={len(self._data)} inflight={len(self._inflight)} "
            f"hits={self.stats.hits} misses={self.stats.misses} coalesced={self.stats.coalesced}>"
        )


def _ignore(result: str) -> None:
    return None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a load's exception as retrieved: every waiter may have been cancelled."""
    if not fut.cancelled():
        fut.exception()


class NullCache(MemoryCache[K, V]):
    """A cache that keeps nothing and coalesces nothing: every lookup runs its loader.

    The benchmark's ``naive`` baseline (``cache.enabled: false``): per-join discovery,
    JWKS, chain building and ARM calls, the way a gateway without caches behaves.
    """

    def get(self, key: K) -> V | None:
        return None

    def set(self, key: K, value: V, ttl: float) -> None:
        return None

    async def get_or_load(self, key: K, loader: Loader[V]) -> V:
        self.stats.misses += 1
        self._observe("miss")
        value, _ttl = await loader()
        return value
