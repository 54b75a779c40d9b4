"""The shared Redis tier and TieredCache, against a real redis-server (tests/support).

What must hold: replicas reuse each other's loads through Redis; a Redis outage degrades
to in-process caching and never fails a lookup; values cross as bytes through codecs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.redis_tier import (
    Codec,
    DerCertificatesCodec,
    JsonCodec,
    SharedTier,
    TieredCache,
    redis_client,
)
from tests.support.redis_server import RedisServer

# A redis-server of its own per test: outside `make test-fast`.
pytestmark = pytest.mark.external


@dataclass(frozen=True)
class VmRecord:
    vm_id: str
    resource_id: str
    tags: tuple[str, ...]


def vm_from_obj(obj: Any) -> VmRecord:
    return VmRecord(vm_id=obj["vm_id"], resource_id=obj["resource_id"], tags=tuple(obj["tags"]))


VM_CODEC: JsonCodec[VmRecord] = JsonCodec(asdict, vm_from_obj)
VM = VmRecord("0b5a7d1e-1111-4222-8333-944445555666", "/subscriptions/s/rg/vm1", ("a", "b"))
VM_NEW = VmRecord("7c0ffee0-1111-4222-8333-944445555666", "/subscriptions/s/rg/vm1", ())


def make_cert(cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as srv:
        yield srv


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = redis_client(server.url, max_connections=8, timeout=0.5)
    try:
        yield c
    finally:
        await c.aclose()


class CountingLoader:
    def __init__(self, value: VmRecord, ttl: float = 60.0) -> None:
        self.value = value
        self.ttl = ttl
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> tuple[VmRecord, float]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.value, self.ttl


def replica(
    client: aioredis.Redis, clock: FixedClock, *, cooldown: float = 1.0
) -> TieredCache[VmRecord]:
    return TieredCache(
        MemoryCache("vm", clock=clock),
        SharedTier(client, "vm", clock=clock, cooldown=cooldown),
        VM_CODEC,
    )


async def test_a_load_on_one_replica_is_a_shared_hit_on_another(client: aioredis.Redis) -> None:
    clock = FixedClock(0)
    a, b = replica(client, clock), replica(client, clock)
    loader = CountingLoader(VM, ttl=60)
    assert await a.get_or_load("vm1", loader) == VM
    assert await b.get_or_load("vm1", loader) == VM
    assert loader.calls == 1
    assert b.shared is not None and b.shared.stats.hits == 1
    assert a.shared is not None and (a.shared.stats.misses, a.shared.stats.writes) == (1, 1)
    # b now answers from its own memory tier without asking Redis again.
    assert await b.get_or_load("vm1", loader) == VM
    assert (b.shared.stats.hits, b.memory.stats.hits) == (1, 1)
    assert 59_000 < await client.pttl("jg:cache:v1:vm:vm1") <= 60_000


async def test_a_shared_hit_is_kept_in_memory_only_for_the_ttl_redis_has_left(
    client: aioredis.Redis,
) -> None:
    clock = FixedClock(0)
    # Written by another replica 50 s into a 60 s lifetime: 10 s remain.
    await client.set("jg:cache:v1:vm:vm1", VM_CODEC.encode(VM), px=10_000)
    b = replica(client, clock)
    loader = CountingLoader(VM)
    assert await b.get_or_load("vm1", loader) == VM
    assert loader.calls == 0
    clock.advance(9.0)
    assert b.get("vm1") == VM
    clock.advance(1.5)
    assert b.get("vm1") is None


async def test_concurrent_misses_make_one_redis_lookup_and_one_load(
    client: aioredis.Redis,
) -> None:
    a = replica(client, FixedClock(0))
    loader = CountingLoader(VM)
    loader.gate = asyncio.Event()
    tasks = [asyncio.create_task(a.get_or_load("vm1", loader)) for _ in range(20)]
    for _ in range(50):
        if loader.calls:
            break
        await asyncio.sleep(0.01)
    loader.gate.set()
    assert await asyncio.gather(*tasks) == [VM] * 20
    assert loader.calls == 1
    assert a.shared is not None and a.shared.stats.misses == 1
    assert a.memory.stats.coalesced == 19


async def test_redis_down_degrades_to_memory_and_recovers(
    server: RedisServer, client: aioredis.Redis
) -> None:
    clock = FixedClock(0)
    a = replica(client, clock, cooldown=5.0)
    assert a.shared is not None
    server.stop()
    loader = CountingLoader(VM)
    assert await a.get_or_load("vm1", loader) == VM  # no exception: the loader answers
    assert loader.calls == 1
    # The failed get opened the cooldown: the write after the load is skipped.
    assert (a.shared.stats.errors, a.shared.stats.skipped) == (1, 1)
    assert not a.shared.healthy
    # Within the cooldown the tier is skipped, not retried on every lookup.
    assert await a.get_or_load("vm2", loader) == VM
    assert (a.shared.stats.errors, a.shared.stats.skipped) == (1, 3)
    assert await a.get_or_load("vm1", loader) == VM  # memory hit
    assert loader.calls == 2

    server.start()
    clock.advance(5.0)
    assert await a.get_or_load("vm3", loader) == VM
    assert a.shared.healthy
    assert a.shared.stats.writes == 1
    assert await client.exists("jg:cache:v1:vm:vm3") == 1


async def test_shared_tier_get_and_set_swallow_errors(
    server: RedisServer, client: aioredis.Redis
) -> None:
    tier = SharedTier(client, "jwks", cooldown=0.0)
    await tier.set("t", b"doc", 30)
    assert await tier.get("t") == b"doc"
    server.stop()
    assert await tier.get("t") is None
    await tier.set("t", b"doc", 30)
    await tier.delete("t")
    assert tier.stats.errors == 3


async def test_an_undecodable_shared_value_is_a_miss_and_is_overwritten(
    client: aioredis.Redis,
) -> None:
    await client.set("jg:cache:v1:vm:vm1", b"{not json", px=60_000)
    a = replica(client, FixedClock(0))
    loader = CountingLoader(VM)
    assert await a.get_or_load("vm1", loader) == VM
    assert loader.calls == 1
    assert a.shared is not None and a.shared.stats.decode_errors == 1
    stored = await client.get("jg:cache:v1:vm:vm1")
    assert isinstance(stored, bytes) and VM_CODEC.decode(stored) == VM


async def test_a_load_with_no_ttl_is_not_shared(client: aioredis.Redis) -> None:
    a = replica(client, FixedClock(0))
    assert await a.get_or_load("vm1", CountingLoader(VM, ttl=0)) == VM
    assert await client.exists("jg:cache:v1:vm:vm1") == 0


async def test_invalidate_drops_both_tiers(client: aioredis.Redis) -> None:
    clock = FixedClock(0)
    a, b = replica(client, clock), replica(client, clock)
    loader = CountingLoader(VM)
    await a.get_or_load("vm1", loader)
    await a.invalidate("vm1")
    assert a.get("vm1") is None
    # A forced refresh must reach the loader, not the stale shared copy.
    await b.get_or_load("vm1", loader)
    assert loader.calls == 2


async def test_a_forced_refresh_skips_the_stale_shared_copy_and_replaces_it(
    client: aioredis.Redis,
) -> None:
    # The JwksClient/VmBinder refresh: get → delete → get_or_load, all on one replica.
    clock = FixedClock(0)
    a, b = replica(client, clock), replica(client, clock)
    stale, fresh = CountingLoader(VM), CountingLoader(VM_NEW)
    assert await a.get_or_load("vm1", stale) == VM
    assert await b.get_or_load("vm1", stale) == VM  # b holds the shared copy too
    a.delete("vm1")
    assert await a.get_or_load("vm1", fresh) == VM_NEW
    assert (stale.calls, fresh.calls) == (1, 1)
    # The fresh value replaced Redis: once b's memory copy lapses, b reads it from there.
    b.memory.clear()
    assert await b.get_or_load("vm1", stale) == VM_NEW
    assert stale.calls == 1
    # Only the load right after a delete skips Redis.
    a.memory.clear()
    assert await a.get_or_load("vm1", stale) == VM_NEW and stale.calls == 1
    # A refresh on b loads too, and its result is what Redis holds next.
    b.delete("vm1")
    assert await b.get_or_load("vm1", stale) == VM
    assert stale.calls == 2
    stored = await client.get("jg:cache:v1:vm:vm1")
    assert isinstance(stored, bytes) and VM_CODEC.decode(stored) == VM


async def test_cache_kinds_do_not_share_keys(client: aioredis.Redis) -> None:
    clock = FixedClock(0)
    vm = replica(client, clock)
    other: TieredCache[VmRecord] = TieredCache(
        MemoryCache("sets", clock=clock), SharedTier(client, "sets", clock=clock), VM_CODEC
    )
    loader = CountingLoader(VM)
    await vm.get_or_load("k", loader)
    await other.get_or_load("k", loader)
    assert loader.calls == 2


async def test_without_a_shared_tier_it_is_the_memory_cache() -> None:
    cache: TieredCache[VmRecord] = TieredCache(
        MemoryCache("vm", clock=FixedClock(0)), None, VM_CODEC
    )
    loader = CountingLoader(VM)
    assert await cache.get_or_load("vm1", loader) == VM
    assert await cache.get_or_load("vm1", loader) == VM
    assert loader.calls == 1 and len(cache) == 1


CERTS = (make_cert("intermediate"), make_cert("root"))


@pytest.mark.parametrize(
    ("codec", "value"),
    [
        pytest.param(VM_CODEC, VM, id="a VM record survives JSON"),
        pytest.param(
            JsonCodec(lambda d: d, lambda o: o),
            {"keys": [{"kid": "k1", "n": "AQAB"}]},
            id="a JWKS document survives JSON",
        ),
        pytest.param(DerCertificatesCodec(), CERTS, id="a certificate chain survives DER"),
        pytest.param(DerCertificatesCodec(), (), id="an empty chain survives DER"),
    ],
)
def test_codec_round_trip(codec: Codec[Any], value: Any) -> None:
    data = codec.encode(value)
    assert isinstance(data, bytes)
    assert codec.decode(data) == value


@pytest.mark.parametrize(
    ("codec", "data"),
    [
        pytest.param(VM_CODEC, b"{not json", id="bytes that are not JSON are refused"),
        pytest.param(VM_CODEC, b'{"vm_id": "x"}', id="JSON of the wrong shape is refused"),
        pytest.param(VM_CODEC, b"\xff\xfe", id="bytes that are not UTF-8 are refused"),
        pytest.param(DerCertificatesCodec(), b"\x00\x00", id="a truncated length is refused"),
        pytest.param(
            DerCertificatesCodec(), b"\x00\x00\x00\x10abc", id="a truncated certificate is refused"
        ),
        pytest.param(
            DerCertificatesCodec(), b"\x00\x00\x00\x03abc", id="bytes that are not DER are refused"
        ),
    ],
)
def test_codec_refuses_bad_bytes_with_value_error(codec: Codec[Any], data: bytes) -> None:
    with pytest.raises(ValueError):
        codec.decode(data)
