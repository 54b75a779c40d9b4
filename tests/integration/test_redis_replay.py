"""RedisReplayStore against a real redis-server: single use across replicas, expiry, and
failing closed (``replay_store_unavailable``) while Redis is down, then recovering."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.backoff import NoBackoff

from gateway.agent import (
    GatewayClient,
    HostParams,
    ImdsClient,
    build_join_body,
    load_or_create_keys,
    make_session,
    make_ssl_context,
)
from gateway.agent.errors import JoinError
from gateway.core.errors import Code, Overloaded
from gateway.core.redis_tier import redis_client
from gateway.dev.devstack import dev_stack
from gateway.join.deps import production_deps
from gateway.join.replay import RedisReplayStore, _set_nx_px
from gateway.server.serve import GatewayServer
from tests.support.redis_server import RedisServer
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as srv:
        yield srv


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = redis_client(server.url, max_connections=4, timeout=0.5)
    try:
        yield c
    finally:
        await c.aclose()


async def test_a_challenge_redeems_once(client: aioredis.Redis) -> None:
    store = RedisReplayStore(client)
    assert await store.redeem("chal-1", 30) is True
    assert await store.redeem("chal-1", 30) is False
    assert await store.redeem("chal-2", 30) is True
    # The key carries the challenge's TTL, so the store never outgrows live challenges.
    assert 29_000 < await client.pttl("jg:replay:chal-1") <= 30_000


async def test_a_redemption_expires_with_its_ttl(client: aioredis.Redis) -> None:
    store = RedisReplayStore(client)
    assert await store.redeem("short", 1.0) is True
    assert await store.redeem("short", 1.0) is False
    await asyncio.sleep(1.2)  # functional check of Redis expiry (PX), not of our clock
    assert await store.redeem("short", 1.0) is True


async def test_ttl_below_a_second_is_raised_to_one(client: aioredis.Redis) -> None:
    store = RedisReplayStore(client)
    assert await store.redeem("tiny", 0.001) is True
    assert 900 < await client.pttl("jg:replay:tiny") <= 1000


async def test_released_challenge_can_be_redeemed_again(client: aioredis.Redis) -> None:
    store = RedisReplayStore(client)
    assert await store.redeem("rel", 30) is True
    await store.release("rel")
    assert await store.redeem("rel", 30) is True


async def test_two_replicas_sharing_redis_see_each_others_redemptions(
    server: RedisServer,
) -> None:
    a_client = redis_client(server.url)
    b_client = redis_client(server.url)
    try:
        a, b = RedisReplayStore(a_client), RedisReplayStore(b_client)
        assert await a.redeem("shared", 30) is True
        assert await b.redeem("shared", 30) is False
        assert await b.redeem("other", 30) is True
        assert await a.redeem("other", 30) is False
        # A race between replicas for one challenge has exactly one winner.
        results = await asyncio.gather(
            *(s.redeem(f"race-{i}", 30) for i in range(50) for s in (a, b))
        )
        assert results.count(True) == 50
    finally:
        await a_client.aclose()
        await b_client.aclose()


async def test_redemptions_asked_together_share_round_trips(client: aioredis.Redis) -> None:
    # 200 joins redeeming at once cost a few pipelined round trips, not 200; each SET NX
    # is still its own command, so a challenge asked twice in one batch wins once.
    store = RedisReplayStore(client, max_in_flight=4, max_batch=128)
    keys = [f"storm-{i}" for i in range(200)]
    results = await asyncio.gather(*(store.redeem(k, 30) for k in [*keys, "twice", "twice"]))
    assert results[:200] == [True] * 200
    assert sorted(results[200:]) == [False, True]
    assert 2 <= store.round_trips <= 4
    again = await asyncio.gather(*(store.redeem(k, 30) for k in keys))
    assert again == [False] * 200
    assert [await client.pttl(f"jg:replay:{k}") > 29_000 for k in keys[:5]] == [True] * 5


async def test_a_lone_redemption_is_one_round_trip(client: aioredis.Redis) -> None:
    store = RedisReplayStore(client)
    assert await store.redeem("alone", 30) is True
    assert await store.redeem("alone", 30) is False
    assert store.round_trips == 2


async def test_redemptions_one_after_another_are_each_sent_with_one_round_trip_at_a_time(
    client: aioredis.Redis,
) -> None:
    # A redemption asked just after a sender found the queue empty, before that task's
    # done callback ran, used to be queued with no sender left to send it.
    store = RedisReplayStore(client, max_in_flight=1)
    async with asyncio.timeout(5):
        for i in range(5):
            assert await store.redeem(f"row-{i}", 30) is True
    assert store.round_trips == 5


async def test_every_redemption_of_a_failed_round_trip_fails_closed(
    server: RedisServer, client: aioredis.Redis
) -> None:
    store = RedisReplayStore(client, op_timeout=0.5)
    assert await store.redeem("warm", 30) is True
    server.stop()
    results = await asyncio.gather(
        *(store.redeem(f"down-{i}", 30) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, Overloaded) for r in results)
    assert {r.code for r in results if isinstance(r, Overloaded)} == {Code.REPLAY_STORE_UNAVAILABLE}
    assert store.failures == 20
    server.start()
    assert await store.redeem("down-0", 30) is True  # never recorded while Redis was down


async def test_key_prefixes_separate_deployments(client: aioredis.Redis) -> None:
    blue = RedisReplayStore(client, key_prefix="blue:")
    green = RedisReplayStore(client, key_prefix="green:")
    assert await blue.redeem("c", 30) is True
    assert await green.redeem("c", 30) is True
    assert await blue.redeem("c", 30) is False


async def test_ping_is_true_while_redis_is_up(client: aioredis.Redis) -> None:
    assert await RedisReplayStore(client).ping() is True


async def test_redis_down_fails_closed_quickly_then_recovers_on_the_same_port(
    server: RedisServer, client: aioredis.Redis
) -> None:
    store = RedisReplayStore(client, op_timeout=0.5)
    assert await store.redeem("before", 30) is True

    server.stop()
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await store.redeem("during", 30)
    assert time.monotonic() - started < 2.0
    assert info.value.code == Code.REPLAY_STORE_UNAVAILABLE
    assert info.value.retry_after == 2
    assert info.value.status == 503

    started = time.monotonic()
    assert await store.ping() is False
    assert time.monotonic() - started < 2.0
    await store.release("before")  # best effort: must not raise while Redis is down
    assert store.failures == 2

    server.start()  # same port; the client and its pool are not touched
    # Persistence is off, so the restarted Redis is empty: "during" was never recorded.
    assert await store.redeem("during", 30) is True
    assert await store.redeem("during", 30) is False
    assert await store.ping() is True


async def test_a_restart_between_calls_is_healed_without_a_failed_call(
    server: RedisServer, client: aioredis.Redis
) -> None:
    # The pool holds a connection the old server closed; it must reconnect, not fail.
    store = RedisReplayStore(client)
    assert await store.redeem("a", 30) is True
    server.restart()
    assert await store.redeem("b", 30) is True
    assert store.failures == 0


@contextlib.asynccontextmanager
async def black_holed_redis() -> AsyncIterator[aioredis.Redis]:
    """A client of a server that accepts connections but never answers."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    c = redis_client(f"redis://127.0.0.1:{port}/0", timeout=5.0)
    try:
        yield c
    finally:
        await c.aclose()
        srv.close()
        await srv.wait_closed()


async def test_a_black_holed_redis_is_bounded_by_the_op_timeout() -> None:
    # The op timeout, not the socket's, bounds the wait.
    async with black_holed_redis() as c:
        store = RedisReplayStore(c, op_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await store.redeem("x", 30)
        assert info.value.code == Code.REPLAY_STORE_UNAVAILABLE
        assert await store.ping() is False
        assert time.monotonic() - started < 1.5


async def test_a_redemption_that_waited_out_its_timeout_in_the_queue_is_never_sent() -> None:
    # One round trip at a time, to a server that never answers, and a loop that stalls
    # while a redemption is queued: when the first round trip times out, the queued one
    # has waited op_timeout and fails without being sent (two failures, one round trip).
    async with black_holed_redis() as c:
        store = RedisReplayStore(c, op_timeout=0.3, max_in_flight=1)
        first = asyncio.ensure_future(store.redeem("first", 30))
        await asyncio.sleep(0.05)  # its round trip is out
        queued = asyncio.ensure_future(store.redeem("queued", 30))
        await asyncio.sleep(0)  # queued behind it
        time.sleep(0.35)  # noqa: ASYNC251 - the stalled loop (a starved CPU) is the point
        results = await asyncio.gather(first, queued, return_exceptions=True)
        assert [r.code for r in results if isinstance(r, Overloaded)] == [
            Code.REPLAY_STORE_UNAVAILABLE
        ] * 2
        assert store.round_trips == 1
        assert store.failures == 2


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("jg:replay:chal", id="ascii"),
        pytest.param("jg:replay:ch\u00e4l-\u2603", id="non-ascii"),
        pytest.param("jg:replay:a b\r\n$3", id="protocol bytes in the key"),
    ],
)
@pytest.mark.parametrize("ttl_ms", [1000, 30_000, 86_400_000])
def test_a_redemption_is_written_as_redis_py_packs_set_nx_px(key: str, ttl_ms: int) -> None:
    conn = aioredis.Connection()
    packed = b"".join(conn.pack_command("SET", key, b"1", "NX", "PX", ttl_ms))
    assert _set_nx_px(key, ttl_ms) == packed


async def test_a_command_the_server_refuses_fails_that_redemption_alone(
    server: RedisServer, client: aioredis.Redis
) -> None:
    # A user whose ACL allows only "jg:replay:ok-*": in one round trip, the SET on another
    # key is refused (NOPERM) and fails closed, the others are answered, and the next
    # round trip reads its own replies.
    await client.acl_setuser(
        "replayer", enabled=True, passwords=["+pw"], keys=["jg:replay:ok-*"], commands=["+set"]
    )
    limited = redis_client(server.url.replace("redis://", "redis://replayer:pw@"))
    try:
        store = RedisReplayStore(limited)
        results = await asyncio.gather(
            store.redeem("ok-1", 30),
            store.redeem("denied", 30),
            store.redeem("ok-2", 30),
            return_exceptions=True,
        )
        assert store.round_trips == 1
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], Overloaded)
        assert results[1].code == Code.REPLAY_STORE_UNAVAILABLE
        assert "NoPermissionError" in str(results[1])
        assert store.failures == 1
        assert await store.redeem("ok-1", 30) is False
        assert await store.redeem("ok-3", 30) is True
        await store.aclose()
    finally:
        await limited.aclose()


async def test_a_reply_that_comes_after_the_op_timeout_is_never_read_as_another_ones(
    client: aioredis.Redis,
) -> None:
    # Writes paused: the SET is sent, its reply comes late. The round trip fails closed
    # and drops its socket, so that late reply cannot answer the next redemption.
    store = RedisReplayStore(client, op_timeout=0.2, max_in_flight=1)
    assert await store.redeem("warm", 30) is True
    await client.execute_command("CLIENT", "PAUSE", "400", "WRITE")
    with pytest.raises(Overloaded) as info:
        await store.redeem("paused", 30)
    assert info.value.code == Code.REPLAY_STORE_UNAVAILABLE
    await asyncio.sleep(0.4)
    assert await store.redeem("after", 30) is True
    assert await store.redeem("after", 30) is False
    assert await store.redeem("warm", 30) is False


async def test_closing_the_store_hands_its_connections_back_as_they_were(
    client: aioredis.Redis,
) -> None:
    pool = client.connection_pool
    store = RedisReplayStore(client, max_in_flight=2)
    await asyncio.gather(*(store.redeem(f"hand-back-{i}", 30) for i in range(10)))
    leased = set(pool._in_use_connections)  # type: ignore[attr-defined]
    assert 1 <= len(leased) <= 2
    await store.aclose()
    assert not pool._in_use_connections  # type: ignore[attr-defined]
    assert all(conn.socket_timeout == 0.5 for conn in leased)


@pytest.mark.parametrize(
    ("max_connections", "timeout", "message"),
    [
        pytest.param(0, 0.5, "max_connections", id="an empty pool is refused"),
        pytest.param(4, 0.0, "timeout", id="a zero timeout is refused"),
    ],
)
def test_client_factory_validates_its_bounds(
    max_connections: int, timeout: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        redis_client("redis://127.0.0.1:1/0", max_connections=max_connections, timeout=timeout)


async def test_client_factory_builds_a_bounded_blocking_pool_with_minimal_retry() -> None:
    c = redis_client("redis://127.0.0.1:1/0", max_connections=7, timeout=0.25)
    try:
        pool = c.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == 7
        assert pool.timeout == 0.25
        assert pool.connection_kwargs["socket_timeout"] == 0.25
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.25
        conn = pool.make_connection()  # type: ignore[no-untyped-call]
        # One immediate retry, for a connection the server closed, and nothing else.
        assert conn.retry.get_retries() == 1
        assert isinstance(conn.retry._backoff, NoBackoff)
        assert redis.exceptions.TimeoutError not in conn.retry._supported_errors
    finally:
        await c.aclose()


TOKENS_YAML = azure_token_yaml()


async def test_two_gateway_replicas_sharing_redis_refuse_a_replayed_join(
    tmp_path: Path, server: RedisServer
) -> None:
    """End to end: a join body accepted by replica A is ``challenge_reused`` on replica B;
    with Redis down a fresh join is ``replay_store_unavailable`` (503, Retry-After)."""
    async with AsyncExitStack() as stack:
        st = await stack.enter_async_context(
            dev_stack(tmp_path / "stack", tokens_yaml=TOKENS_YAML, start_gateway=False)
        )
        urls = []
        for _ in range(2):  # two replicas: same config and keys file, own Redis client
            client = redis_client(server.url)
            stack.push_async_callback(client.aclose)
            deps = await stack.enter_async_context(
                production_deps(st.config, replay=RedisReplayStore(client))
            )
            gw = await stack.enter_async_context(GatewayServer(st.config, deps=deps))
            urls.append(gw.url())

        tenant = st.emulator.add_tenant()
        vm = st.emulator.add_vm(
            subscription="11111111-1111-1111-1111-111111111111",
            resource_group="rg1",
            name="vm1",
            tenant=tenant,
            identity="user",
        )
        ssl_context = make_ssl_context(st.gateway_ca_file)
        session = await stack.enter_async_context(make_session(ssl_context=ssl_context))
        a, b = (GatewayClient(session, base_url=u, ssl_context=ssl_context) for u in urls)
        imds = ImdsClient(session, base_url=vm.imds_url)
        keys = load_or_create_keys(tmp_path / "vm1")

        async def join_body(gateway: GatewayClient) -> dict[str, Any]:
            challenge = await gateway.challenge()
            return build_join_body(
                token_name="azure-token",
                challenge=challenge,
                attested_data=await imds.attested_document(challenge),
                access_token=await imds.access_token(client_id=vm.client_id),
                host=HostParams(
                    node_name="vm1",
                    role="Node",
                    public_ssh_key=keys.public_ssh_key,
                    public_tls_key=keys.public_tls_key,
                ),
            )

        body = await join_body(a)
        assert "host_id" in await a.join(body)
        with pytest.raises(JoinError) as reused:
            await b.join(body)
        assert (reused.value.status, reused.value.code) == (403, Code.CHALLENGE_REUSED)

        fresh = await join_body(b)
        server.stop()
        with pytest.raises(JoinError) as down:
            await b.join(fresh)
        assert (down.value.status, down.value.code) == (503, Code.REPLAY_STORE_UNAVAILABLE)
        assert down.value.retry_after == 2

        server.start()  # same port: the replicas recover without a restart
        assert "host_id" in await b.join(fresh)
