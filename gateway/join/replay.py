"""The replay store: single-use redemption of challenges (DESIGN §2).

``redeem(key, ttl)`` is an atomic set-if-absent with a TTL to the challenge's expiry:
it returns True the first time and False afterwards. With more than one replica the
store must be shared (Redis, ``SET key 1 NX EX ttl``); the in-memory store is correct
for one process only. A store that cannot answer raises ``Overloaded`` with
``replay_store_unavailable``: the single-use guarantee is never silently dropped.
"""

from __future__ import annotations

from typing import Protocol

from gateway.clock import Clock

__all__ = ["MemoryReplayStore", "ReplayStore"]


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
