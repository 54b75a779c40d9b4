"""The shared Redis tier of the caches (DESIGN §5), and the one Redis client factory.

DESIGN §5: "a shared Redis tier lets replicas reuse each other's results". During a join
storm every replica misses on the same JWKS documents, AIA intermediates and VM records;
with this tier the first replica's answer serves the others, so Azure sees one read per
key for the whole fleet rather than one per replica.

Two rules shape it:

* **The tier is an optimisation, never a dependency.** Every Redis error or timeout is
  swallowed, counted (:class:`SharedTierStats`) and logged once per outage; the cache
  falls back to the in-process tier and the loader. After a failure the tier is skipped
  for ``cooldown`` seconds (read from the injected clock), so an outage costs one failed
  round trip per cooldown, not one per lookup. (The replay store is the opposite: it is a
  correctness dependency and fails closed, see ``gateway.join.replay``.)
* **A dead Redis fails fast.** :func:`redis_client` builds the client on a bounded
  *blocking* pool (a burst waits at most ``timeout`` for a connection instead of opening
  thousands of sockets), with connect and socket timeouts and at most one immediate
  retry on a broken connection; every call is also wrapped in
  ``asyncio.timeout(op_timeout)``.

Why redis.asyncio directly and not aiocache's ``RedisCache`` (read in aiocache 0.12.3):

* ``RedisBackend.__init__`` builds its own pool from ``endpoint``/``port``/``db``/
  ``password``. It *can* be given ``connection_pool_class=BlockingConnectionPool`` with
  ``connection_pool_kwargs={"timeout": ...}``, but it cannot take an existing client or a
  URL: the caches and the replay store would hold two pools, and we would re-parse
  ``rediss://user:pw@host/db`` into its arguments (it only knows ``ssl=True/False``).
* Its ``close()`` calls ``redis.asyncio.Redis.close()``, deprecated since redis-py 5.0.1
  (a ``DeprecationWarning`` on every shutdown), and the package is untyped.
* We need two commands (``GET``+``PTTL`` in one transaction, ``SET PX``) on opaque bytes;
  aiocache's serializers, plugins and namespaces add nothing, and its ``get`` cannot
  return the remaining TTL that the in-process tier needs.

Values cross the tier as bytes through a :class:`Codec` the caller supplies (JSON for VM
records and JWKS documents, DER for certificates): nothing is pickled, so a value written
by one replica cannot execute code in another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.core.cache import Loader, MemoryCache
from gateway.core.clock import Clock, SystemClock

__all__ = [
    "Codec",
    "DerCertificatesCodec",
    "JsonCodec",
    "SharedEntry",
    "SharedTier",
    "SharedTierStats",
    "TieredCache",
    "redis_client",
]

log = logging.getLogger(__name__)

V = TypeVar("V")

# What a Redis call can raise when the server is down, slow or confused: redis-py's
# errors, and OSError (which includes the builtin TimeoutError of asyncio.timeout).
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError)


def redis_client(url: str, *, max_connections: int = 32, timeout: float = 0.5) -> aioredis.Redis:
    """A client on a bounded blocking pool that fails fast when Redis is down.

    Parameters:

    * url — ``redis://``, ``rediss://`` or ``unix://`` (redis-py's URL syntax).
    * max_connections — the pool bound; callers beyond it wait for a free connection.
    * timeout — seconds to wait for a pooled connection, to connect, and for a reply.

    Retries are minimal: one immediate retry, on connection errors only. That one is
    needed because after a Redis restart the pool still holds sockets the old server
    closed, and redis-py's hand-out check does not notice them: without the retry the
    first command after every restart fails. Timeouts are never retried (against a dead
    or stalled server a retry only doubles the wait), and a refused connect is answered
    by the kernel at once, so a dead Redis still fails in milliseconds.
    """
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return aioredis.Redis.from_pool(pool)


class Codec(Protocol[V]):
    """Turns a cached value into bytes and back. ``decode`` raises ``ValueError`` on bytes
    it does not understand (the entry is then treated as a miss)."""

    def encode(self, value: V) -> bytes: ...

    def decode(self, data: bytes) -> V: ...


class JsonCodec(Generic[V]):
    """JSON through two caller-supplied functions (value → JSON-able object and back).

    ``from_obj`` should raise ``ValueError``/``KeyError``/``TypeError`` on a bad shape;
    all three become ``ValueError`` here.
    """

    def __init__(self, to_obj: Callable[[V], Any], from_obj: Callable[[Any], V]) -> None:
        self._to_obj = to_obj
        self._from_obj = from_obj

    def encode(self, value: V) -> bytes:
        return json.dumps(self._to_obj(value), separators=(",", ":"), sort_keys=True).encode()

    def decode(self, data: bytes) -> V:
        try:
            return self._from_obj(json.loads(data))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"cached JSON has the wrong shape: {exc!r}") from exc


class DerCertificatesCodec:
    """A tuple of certificates as length-prefixed DER (the AIA cache's value type)."""

    def encode(self, value: tuple[x509.Certificate, ...]) -> bytes:
        parts = []
        for cert in value:
            der = cert.public_bytes(Encoding.DER)
            parts.append(struct.pack(">I", len(der)) + der)
        return b"".join(parts)

    def decode(self, data: bytes) -> tuple[x509.Certificate, ...]:
        certs = []
        view = memoryview(data)
        while view:
            if len(view) < 4:
                raise ValueError("truncated certificate length")
            (n,) = struct.unpack(">I", view[:4])
            if len(view) < 4 + n:
                raise ValueError("truncated certificate")
            certs.append(x509.load_der_x509_certificate(bytes(view[4 : 4 + n])))
            view = view[4 + n :]
        return tuple(certs)


@dataclass
class SharedTierStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    errors: int = 0
    skipped: int = 0  # calls not made because the tier is cooling down after an error
    decode_errors: int = 0


@dataclass(frozen=True)
class SharedEntry:
    value: bytes
    ttl: float  # seconds left in Redis


class SharedTier:
    """One cache kind's slice of Redis: keys ``{prefix}{name}:{key}``.

    Parameters:

    * client — from :func:`redis_client`; shared with the other tiers and the replay store,
      and closed by its owner, not here.
    * name — the cache kind (``jwks``, ``aia``, ``vm``...): the key namespace and ``repr``.
    * op_timeout — hard bound on one Redis call.
    * cooldown — after an error, seconds during which the tier is skipped.
    * clock — injected; only the cooldown reads it.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        *,
        key_prefix: str = "jg:cache:v1:",
        op_timeout: float = 0.25,
        cooldown: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self._client = client
        self.name = name
        self._prefix = f"{key_prefix}{name}:"
        self._op_timeout = op_timeout
        self._cooldown = cooldown
        self._clock = clock or SystemClock()
        self._down_until: float | None = None
        self.stats = SharedTierStats()

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> bytes | None:
        entry = await self.get_entry(key)
        return None if entry is None else entry.value

    async def get_entry(self, key: str) -> SharedEntry | None:
        """The value and its remaining TTL, or None on a miss *or any failure*."""
        if self._cooling_down():
            return None
        rkey = self.redis_key(key)
        try:
            async with asyncio.timeout(self._op_timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.get(rkey)
                    pipe.pttl(rkey)
                    value, pttl = await pipe.execute()
        except REDIS_FAILURES as exc:
            self._failed("get", exc)
            return None
        self._succeeded()
        # PTTL: -2 no key, -1 no expiry (never written by us), else milliseconds left.
        if value is None or not isinstance(value, bytes) or pttl is None or pttl <= 0:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return SharedEntry(value=value, ttl=pttl / 1000.0)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store for ``ttl`` seconds (at least 1 ms); failures are counted, not raised."""
        if ttl <= 0 or self._cooling_down():
            return
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.set(self.redis_key(key), value, px=max(1, int(ttl * 1000)))
        except REDIS_FAILURES as exc:
            self._failed("set", exc)
            return
        self._succeeded()
        self.stats.writes += 1

    async def delete(self, key: str) -> None:
        """Drop a key (forced refresh); failures are counted, not raised."""
        if self._cooling_down():
            return
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.delete(self.redis_key(key))
        except REDIS_FAILURES as exc:
            self._failed("delete", exc)
            return
        self._succeeded()

    @property
    def healthy(self) -> bool:
        return self._down_until is None

    def _cooling_down(self) -> bool:
        if self._down_until is not None and self._clock.monotonic() < self._down_until:
            self.stats.skipped += 1
            return True
        return False

    def _failed(self, op: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if self._down_until is None:
            # Once per outage: the lookups keep working from memory and the loaders.
            log.warning(
                "redis cache tier %s unavailable (%s: %s); using in-process cache only",
                self.name,
                op,
                type(exc).__name__,
            )
        else:
            log.debug("redis cache tier %s still unavailable (%s: %r)", self.name, op, exc)
        self._down_until = self._clock.monotonic() + self._cooldown

    def _succeeded(self) -> None:
        if self._down_until is not None:
            log.info("redis cache tier %s available again", self.name)
            self._down_until = None

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<SharedTier {self.name} healthy={self.healthy} hits={s.hits} misses={s.misses} "
            f"writes={s.writes} errors={s.errors} skipped={s.skipped}>"
        )


class TieredCache(Generic[V]):
    """An in-process :class:`MemoryCache` in front of a :class:`SharedTier`.

    ``get_or_load``: memory hit → else, under the memory tier's single flight, shared-tier
    hit (decoded, kept in memory for the TTL Redis has left) → else the loader, whose
    result goes to both tiers. So N concurrent misses in one process make one Redis
    round trip, and at most one loader call; across replicas the shared tier makes the
    first replica's load serve the others. The Redis lookup and the loader run inside the
    memory tier's detached load, so cancelling the caller that started them cancels
    neither (``MemoryCache.get_or_load``).

    ``shared=None`` is the memory-only cache (``cache.backend: memory``) behind the same
    interface. ``get``/``set`` act on the memory tier only (sync, like ``MemoryCache``).

    ``delete`` is how callers force a refresh (``JwksClient`` on an unknown ``kid``,
    ``VmBinder`` on an unknown ``vmId``: ``get`` → ``delete`` → ``get_or_load``). It stays
    sync, like ``MemoryCache.delete``, and it also marks the key so that its next load
    skips the shared tier's read: otherwise the refresh would be answered by the same
    stale value from Redis. The fresh result then overwrites Redis for every replica.
    ``invalidate`` additionally deletes the Redis copy at once.
    """

    # Bound on keys marked for refresh and never loaded again (hostile churn).
    _MAX_REFRESH_MARKS = 10_000

    def __init__(
        self,
        memory: MemoryCache[str, V],
        shared: SharedTier | None,
        codec: Codec[V],
    ) -> None:
        self.memory = memory
        self.shared = shared
        self._codec = codec
        self._refresh: set[str] = set()

    @property
    def name(self) -> str:
        return self.memory.name

    def get(self, key: str) -> V | None:
        return self.memory.get(key)

    def set(self, key: str, value: V, ttl: float) -> None:
        self.memory.set(key, value, ttl)

    def delete(self, key: str) -> None:
        self.memory.delete(key)
        if self.shared is not None:
            if len(self._refresh) >= self._MAX_REFRESH_MARKS:
                self._refresh.clear()
            self._refresh.add(key)

    async def invalidate(self, key: str) -> None:
        self.delete(key)
        if self.shared is not None:
            await self.shared.delete(key)

    async def get_or_load(self, key: str, loader: Loader[V]) -> V:
        shared = self.shared
        if shared is None:
            return await self.memory.get_or_load(key, loader)

        async def through_shared() -> tuple[V, float]:
            refreshing = key in self._refresh
            self._refresh.discard(key)
            entry = None if refreshing else await shared.get_entry(key)
            if entry is not None:
                try:
                    return self._codec.decode(entry.value), entry.ttl
                except ValueError as exc:
                    # A value from an older codec or a foreign writer: reload and overwrite.
                    shared.stats.decode_errors += 1
                    log.warning("redis cache tier %s: undecodable value (%s)", shared.name, exc)
            value, ttl = await loader()
            if ttl > 0:
                await shared.set(key, self._codec.encode(value), ttl)
            return value, ttl

        return await self.memory.get_or_load(key, through_shared)

    def __len__(self) -> int:
        return len(self.memory)

    def __bool__(self) -> bool:
        return True  # a dependency, not a container (see MemoryCache.__bool__)

    def __repr__(self) -> str:
        return f"<TieredCache memory={self.memory!r} shared={self.shared!r}>"
