"""The replay store: single-use redemption of challenges (DESIGN §2).

``redeem(key, ttl)`` is an atomic set-if-absent with a TTL to the challenge's expiry:
it returns True the first time and False afterwards. With more than one replica the
store must be shared (Redis, ``SET key 1 NX PX ttl``, pipelined with the other
redemptions of the moment); the in-memory store is correct for one process only. A
store that cannot answer raises ``Overloaded`` with ``replay_store_unavailable``: the
single-use guarantee is never silently dropped.

Unlike the cache tier (``gateway.core.redis_tier``), which degrades to in-process caching when
Redis is down, the replay store fails closed: answering "first use" without asking the
shared store would let one challenge be redeemed once per replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from gateway.core.clock import Clock
from gateway.core.errors import Code, Overloaded

__all__ = ["MemoryReplayStore", "RedisReplayStore", "ReplayStore"]

log = logging.getLogger(__name__)

# Seconds an agent should wait before retrying when the store is unreachable.
_UNAVAILABLE_RETRY_AFTER = 2.0

# A redemption waiting for its round trip: redis key, ttl ms, asked at (loop time), waiter.
_Queued = tuple[str, int, float, "asyncio.Future[bool]"]


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
    * op_timeout — hard bound on one round trip to Redis (lease, connect, write, every
      reply); a redemption that has waited this long for a round trip fails without
      being sent, so none waits on Redis more than twice this.
    * max_in_flight — round trips to Redis at once, and so the most connections the
      store leases from the client's pool; redemptions asked for while all of them are
      out wait and leave together in the next one.
    * max_batch — redemptions in one round trip at most.

    A redemption is one ``SET key 1 NX PX ttl_ms``: atomic across replicas, and the key
    expires with the challenge, so the store never outgrows the live challenges. Under a
    storm the redemptions asked for at about the same time share one pipelined round
    trip (one write, one read). Pipelining changes nothing of what Redis does: each
    ``SET NX`` is still its own atomic command, so single use across workers and
    replicas holds as before; a round trip that fails fails every redemption in it, and
    a command the server refuses fails its own (``replay_store_unavailable``, never
    "first use"). With nothing else waiting a redemption leaves at once, alone.

    The round trip is written here rather than through ``client.pipeline()``: the
    commands are packed by :func:`_set_nx_px`, written with the connection's
    ``send_packed_command`` and read with its ``read_response``, on connections leased
    from the client's pool and kept between round trips. redis-py's pipeline added, per
    round trip, a pool hand-out and return, its retry and observability wrappers, and a
    task and a timer per write and per reply; a lone redemption cost 163 µs of CPU, 73
    µs now, and a storm's join 72 µs, 30 µs now
    (``benchmarks/experiments/replay_batch.py``). What stays the pipeline's: one retry
    when a pooled socket turns out closed before any reply (:func:`_exchange`), and a
    socket dropped when a round trip fails or times out half-way, so a late reply is
    never read as another redemption's.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "jg:replay:",
        op_timeout: float = 0.5,
        max_in_flight: int = 8,
        max_batch: int = 64,
    ) -> None:
        if op_timeout <= 0:
            raise ValueError(f"op_timeout must be > 0, got {op_timeout}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._client = client
        self._prefix = key_prefix
        self._op_timeout = op_timeout
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[_Queued] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._sending = 0  # senders started and not finished (at most max_in_flight)
        # Connections leased from the client's pool, idle between our round trips.
        self._idle: list[AbstractConnection] = []
        self._socket_timeout: float | None = None  # theirs, restored when handed back
        self.failures = 0
        self.round_trips = 0  # round trips begun: what a test counts, and a benchmark

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def redeem(self, key: str, ttl: float) -> bool:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._queue.append((self._prefix + key, int(max(ttl, 1.0) * 1000), loop.time(), waiter))
        if self._sending < self._max_in_flight:
            self._sending += 1
            task = loop.create_task(self._send_queued())
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        # The senders bound the wait (op_timeout queued, op_timeout on the wire) and
        # answer every waiter, so no timer of our own is needed here.
        return await waiter

    async def _send_queued(self) -> None:
        """Send what is queued, a batch per round trip, until nothing is left.

        ``_sending`` drops in the same step that finds the queue empty: a redemption
        queued after that starts a sender of its own. (Counting the tasks not yet
        discarded instead left it unsent when it came between a sender's end and its
        done callback: with ``max_in_flight=1``, every second redemption in a row.)"""
        try:
            await self._send_until_empty()
        finally:
            self._sending -= 1

    async def _send_until_empty(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            self._expire_queued(loop.time())
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            if not batch:
                return
            try:
                replies = await self._round_trip(batch)
            except (RedisError, OSError) as exc:  # OSError includes asyncio's TimeoutError
                self._fail(batch, exc)
                continue
            except BaseException as exc:  # cancelled (the loop is closing)
                self._fail(batch + self._queue, exc)
                self._queue.clear()
                raise
            for item, reply in zip(batch, replies, strict=True):
                waiter = item[3]
                if waiter.done():  # its join was cancelled meanwhile
                    continue
                if isinstance(reply, BaseException):
                    self._fail([item], reply)
                else:
                    # SET NX answers OK (True) when it set the key, nil (None) when the
                    # key existed.
                    waiter.set_result(bool(reply))

    def _expire_queued(self, now: float) -> None:
        """Fail the redemptions that waited op_timeout for a round trip (oldest first)."""
        stale = 0
        for _, _, asked, _ in self._queue:
            if asked + self._op_timeout > now:
                break
            stale += 1
        if stale:
            expired = self._queue[:stale]
            del self._queue[:stale]
            self._fail(expired, TimeoutError(f"queued for over {self._op_timeout}s"))

    def _fail(self, items: list[_Queued], exc: BaseException) -> None:
        waiting = [item[3] for item in items if not item[3].done()]
        if waiting:
            self._note_failure("redeem", exc, len(waiting))
        for waiter in waiting:
            waiter.set_exception(self._overloaded("redeem", exc))

    async def _round_trip(self, batch: list[_Queued]) -> list[object]:
        """One write of the batch's ``SET``s and its replies, on a connection of our own."""
        command = b"".join([_set_nx_px(rkey, ttl_ms) for rkey, ttl_ms, _, _ in batch])
        async with asyncio.timeout(self._op_timeout):
            self.round_trips += 1
            conn = self._idle.pop() if self._idle else await self._lease()
            try:
                replies = await _exchange(conn, command, len(batch))
            except BaseException:
                # Failed, timed out or cancelled half-way: replies may still be on their
                # way, so the socket is dropped (redis-py's write and read drop it too; this
                # also covers a cancellation between the two). It reconnects on next use.
                await conn.disconnect(nowait=True)
                self._idle.append(conn)
                raise
            self._idle.append(conn)
            return replies

    async def _lease(self) -> AbstractConnection:
        """A connection from the client's pool, kept for this store's round trips (at
        most ``max_in_flight`` are leased) until :meth:`aclose` hands it back.

        Its socket timeout is lifted while it is ours: ``op_timeout`` bounds each round
        trip whole (connect, write, every reply), and redis-py's own per-write and
        per-reply timers (a task and a timer each) cost about a third of a round trip.
        """
        pool = self._client.connection_pool
        conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        self._socket_timeout = conn.socket_timeout
        conn.socket_timeout = None
        return conn

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
        """The client belongs to the caller (it is shared); redemptions still queued
        are answered by their senders, within ``op_timeout``, before this returns."""
        if self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.socket_timeout = self._socket_timeout
            await self._client.connection_pool.release(conn)

    def _note_failure(self, op: str, exc: BaseException, count: int) -> None:
        self.failures += count
        log.warning("replay store %s failed (%s): %s", op, count, type(exc).__name__)

    @staticmethod
    def _overloaded(op: str, exc: BaseException) -> Overloaded:
        err = Overloaded(
            Code.REPLAY_STORE_UNAVAILABLE,
            retry_after=_UNAVAILABLE_RETRY_AFTER,
            detail=f"redis {op} failed: {type(exc).__name__}: {exc}",
        )
        err.__cause__ = exc
        return err

    def __repr__(self) -> str:
        return (
            f"<RedisReplayStore prefix={self._prefix!r} queued={len(self._queue)} "
            f"round_trips={self.round_trips} failures={self.failures}>"
        )


def _set_nx_px(rkey: str, ttl_ms: int) -> bytes:
    """``SET rkey 1 NX PX ttl_ms`` in RESP (an array of bulk strings), as redis-py packs
    it: the key's UTF-8 bytes are length-prefixed, so any key is sent as it is."""
    key = rkey.encode()
    ttl = b"%d" % ttl_ms
    return b"*6\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n$%d\r\n%b\r\n" % (
        len(key),
        key,
        len(ttl),
        ttl,
    )


async def _exchange(conn: AbstractConnection, command: bytes, count: int) -> list[object]:
    """Write ``command`` (``count`` pipelined commands) and read their ``count`` replies.

    A pooled socket that the server closed (Redis restarted) fails before the first reply:
    nothing was done on it, so the command is written once more, on a new socket (the one
    retry ``redis_client`` configures). Once a reply was read, nothing is resent.
    """
    try:
        await conn.send_packed_command(command, check_health=False)
        first = await _reply(conn)
    except RedisConnectionError:
        await conn.disconnect(nowait=True)
        await conn.send_packed_command(command, check_health=False)
        first = await _reply(conn)
    replies = [first]
    for _ in range(count - 1):
        replies.append(await _reply(conn))
    return replies


async def _reply(conn: AbstractConnection) -> object:
    """One reply: ``b"OK"`` (set), None (the key existed), or the ``ResponseError`` of a
    command the server refused (out of memory, read-only replica). A refusal is a reply
    like the others, so the connection stays in step with the server."""
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc
