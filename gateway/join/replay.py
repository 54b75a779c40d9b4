"""The replay store: single-use redemption of challenges (DESIGN §2).

``redeem(key, ttl)`` is an atomic set-if-absent with a TTL to the challenge's expiry:
it returns True the first time and False afterwards. With more than one replica the
store must be shared (Redis, ``SET key 1 NX PX ttl``); the in-memory store is correct
for one process only. A store that cannot answer raises ``Overloaded`` with
``replay_store_unavailable``: the single-use guarantee is never silently dropped.

Unlike the cache tier (``gateway.core.redis_tier``), which degrades to in-process caching when
Redis is down, the replay store fails closed: answering "first use" without asking the
shared store would let one challenge be redeemed once per replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.core.clock import Clock
from gateway.core.errors import Code, Overloaded

__all__ = ["MemoryReplayStore", "RedisReplayStore", "ReplayStore"]

log = logging.getLogger(__name__)

# Seconds an agent should wait before retrying when the store is unreachable.
_UNAVAILABLE_RETRY_AFTER = 2.0


class ReplayStore(Protocol):
    async def redeem(self, key: str, ttl: float) -> bool: ...

    async def release(self, key: str) -> None:
        """Forget a redemption (used when the join failed before anything was issued)."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryReplayStore:
    def __init__(self, *, clock: Clock, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._seen: dict[str, float] = {}
        self._next_sweep = 0.0

    async def redeem(self, key: str, ttl: float) -> bool:
        now = self._clock.monotonic()
        if now >= self._next_sweep or len(self._seen) >= self._max:
            self._sweep(now)
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        self._seen[key] = now + max(ttl, 1.0)
        return True

    async def release(self, key: str) -> None:
        self._seen.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._seen = {k: t for k, t in self._seen.items() if t > now}
        self._next_sweep = now + 10.0

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._seen)

    def __repr__(self) -> str:
        return f"<MemoryReplayStore entries={len(self._seen)}>"


class RedisReplayStore:
    """The shared replay store: one Redis key per redeemed challenge.

    Parameters:

    * client — from ``gateway.core.redis_tier.redis_client`` (bounded blocking pool, no
      retries, socket timeouts); owned by the caller, who closes it.
    * key_prefix — namespace of the keys (``{prefix}{challenge}``).
    * op_timeout — hard bound on one call, on top of the client's socket timeouts, so a
      join never waits on Redis longer than this.

    ``redeem`` is one ``SET key 1 NX PX ttl_ms``: atomic across replicas, and the key
    expires with the challenge, so the store never outgrows the live challenges.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "jg:replay:",
        op_timeout: float = 0.5,
    ) -> None:
        if op_timeout <= 0:
            raise ValueError(f"op_timeout must be > 0, got {op_timeout}")
        self._client = client
        self._prefix = key_prefix
        self._op_timeout = op_timeout
        self.failures = 0

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def redeem(self, key: str, ttl: float) -> bool:
        ttl_ms = int(max(ttl, 1.0) * 1000)
        try:
            async with asyncio.timeout(self._op_timeout):
                was_set = await self._client.set(self.redis_key(key), b"1", nx=True, px=ttl_ms)
        except (RedisError, OSError) as exc:  # OSError includes asyncio's TimeoutError
            raise self._unavailable("redeem", exc) from exc
        # SET NX answers OK (True) when it set the key, nil (None) when the key existed.
        return bool(was_set)

    async def release(self, key: str) -> None:
        """Best effort: a release that fails leaves the challenge burned, which only costs
        the agent a new challenge (``challenge_reused`` is retryable); raising here would
        hide the error that made the join fail."""
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.delete(self.redis_key(key))
        except (RedisError, OSError) as exc:
            self.failures += 1
            log.warning("replay store release failed: %s", type(exc).__name__)

    async def ping(self) -> bool:
        """True if Redis answers within the op timeout; never raises."""
        try:
            async with asyncio.timeout(self._op_timeout):
                return bool(await self._client.ping())
        except (RedisError, OSError) as exc:
            log.debug("replay store ping failed: %r", exc)
            return False

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to the caller (it is shared)."""

    def _unavailable(self, op: str, exc: BaseException) -> Overloaded:
        self.failures += 1
        log.warning("replay store %s failed: %s", op, type(exc).__name__)
        return Overloaded(
            Code.REPLAY_STORE_UNAVAILABLE,
            retry_after=_UNAVAILABLE_RETRY_AFTER,
            detail=f"redis {op} failed: {type(exc).__name__}: {exc}",
        )

    def __repr__(self) -> str:
        return f"<RedisReplayStore prefix={self._prefix!r} failures={self.failures}>"
