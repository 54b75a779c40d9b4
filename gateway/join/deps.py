"""The composition root: ``production_deps(config)`` builds the real ``JoinDeps``.

One factory per resource, each an async context manager that closes what it opened, and
entered one by one on an ``AsyncExitStack`` (aiohttp's ``cleanup_ctx`` discipline): a
failure at any step closes exactly what the steps before it opened, in reverse order. The
order is the dependency order:

1. files: token registry, challenge keys, trust store (nothing to close; a bad file stops
   the start with its path);
2. the outbound HTTPS session (Entra, ARM, AIA) — system trust plus
   ``azure.outbound_ca_file``;
3. the auth service's client (its own pooled mTLS session);
4. the Redis client, with ``cache.backend: redis``;
5. the replay store (on Redis, or in memory);
6. the Azure clients and caches (nothing to close: they borrow the session and Redis);
7. the attested-document verifier (its chain-building thread pool).

Tests build ``JoinDeps`` themselves with fakes that do real crypto; the server uses this.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
from redis import asyncio as aioredis

from gateway.azure.aia import DEFAULT_AIA_PREFIXES, AiaFetcher
from gateway.azure.arm import ArmBudget, ArmClient, NoBudget
from gateway.azure.attested import AttestedVerifier
from gateway.azure.budget import SubscriptionBudget
from gateway.azure.certs import TrustStore
from gateway.azure.jwks import JwksClient, TokenVerifier, keyset_from_json, keyset_to_json
from gateway.azure.vm_directory import VmDirectory
from gateway.core.cache import Cache, MemoryCache, NullCache
from gateway.core.clock import Clock, SystemClock
from gateway.core.config import Config
from gateway.core.metrics import Metrics
from gateway.core.redis_tier import (
    Codec,
    DerCertificatesCodec,
    JsonCodec,
    SharedTier,
    TieredCache,
    redis_client,
)
from gateway.core.reload import Reloadable
from gateway.core.tlsutil import client_ssl_context
from gateway.join.binding import VmBinder
from gateway.join.challenge import ChallengeCodec, load_keys_file
from gateway.join.forward import AuthClient, CircuitBreaker
from gateway.join.pipeline import JoinDeps
from gateway.join.replay import MemoryReplayStore, RedisReplayStore, ReplayStore
from gateway.join.rules import TokenRegistry, load_token_files

__all__ = [
    "SessionFactory",
    "attested_verifier",
    "auth_client",
    "challenge_keys",
    "load_tokens",
    "outbound_session",
    "outbound_ssl_context",
    "production_deps",
    "redis_connection",
    "replay_store",
    "trust_store",
    "upstream_ssl_context",
    "vm_binder",
]

log = logging.getLogger(__name__)

# Opens an aiohttp session (the default is ``aiohttp.ClientSession`` itself); tests pass
# one that counts what was opened and closed.
SessionFactory = Callable[..., aiohttp.ClientSession]


# -- 1. files --------------------------------------------------------------------------


def load_tokens(config: Config) -> Reloadable[TokenRegistry]:
    """The token registry, re-read whole from ``tokens.files`` on SIGHUP."""
    paths = tuple(config.path(p) for p in config.tokens.files)
    vm_binding = config.azure.vm_binding
    return Reloadable("token", lambda: load_token_files(paths, vm_binding=vm_binding))


def challenge_keys(config: Config, clock: Clock) -> Reloadable[ChallengeCodec]:
    """The challenge codec, rebuilt from ``challenge.keys_file`` on SIGHUP."""
    path = config.path(config.challenge.keys_file)
    ttl = config.challenge.ttl_seconds
    return Reloadable(
        "challenge keys", lambda: ChallengeCodec(load_keys_file(path), ttl=ttl, clock=clock)
    )


def trust_store(config: Config) -> TrustStore:
    """The attested document's pinned roots: bundled (unless turned off) plus
    ``azure.extra_ca_files``."""
    return TrustStore.load(
        extra_pem_files=[config.path(p) for p in config.azure.extra_ca_files],
        include_bundled=config.azure.bundled_roots,
    )


def outbound_ssl_context(config: Config) -> ssl.SSLContext:
    """Trust for Entra, ARM and AIA: the system store plus ``azure.outbound_ca_file``."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.azure.outbound_ca_file:
        ctx.load_verify_locations(cafile=str(config.path(config.azure.outbound_ca_file)))
    return ctx


def upstream_ssl_context(config: Config) -> ssl.SSLContext:
    """mTLS to the auth service: its CA, and the gateway's client certificate."""
    upstream = config.upstream
    return client_ssl_context(
        ca_file=config.path(upstream.ca_file) if upstream.ca_file else None,
        cert_file=config.path(upstream.client_cert_file) if upstream.client_cert_file else None,
        key_file=config.path(upstream.client_key_file) if upstream.client_key_file else None,
    )


# -- 2..5. resources that must be closed ---------------------------------------------------


@asynccontextmanager
async def outbound_session(
    config: Config, trace: aiohttp.TraceConfig, open_session: SessionFactory
) -> AsyncIterator[aiohttp.ClientSession]:
    """The one session every Azure client shares (Entra, ARM, AIA)."""
    ctx = outbound_ssl_context(config)  # before opening: a bad CA file opens nothing
    connector = aiohttp.TCPConnector(ssl=ctx, limit=256, ttl_dns_cache=300)
    session = open_session(connector=connector, trust_env=False, trace_configs=[trace])
    try:
        yield session
    finally:
        await session.close()


@asynccontextmanager
async def auth_client(
    config: Config, clock: Clock, trace: aiohttp.TraceConfig, open_session: SessionFactory
) -> AsyncIterator[AuthClient]:
    """The auth service's client on its own pooled mTLS session (``upstream.*``)."""
    upstream = config.upstream
    ctx = upstream_ssl_context(config)  # before opening: bad files open nothing
    # The pool bound lives on the connector we open here; the client uses ``ctx`` on every
    # request (so the mTLS identity is the one configured even on a shared session).
    session = open_session(
        connector=aiohttp.TCPConnector(limit=upstream.max_connections, ssl=ctx),
        trust_env=False,
        trace_configs=[trace],
    )
    try:
        client = AuthClient(
            url=upstream.url,
            ssl_context=ctx,
            clock=clock,
            timeout=upstream.timeout_seconds,
            session=session,
            batch=upstream.batch,
            breaker=CircuitBreaker(
                failure_threshold=upstream.breaker_failures,
                reset_timeout=upstream.breaker_reset_seconds,
                clock=clock,
            ),
        )
        async with client:
            yield client
    finally:
        await session.close()


@asynccontextmanager
async def redis_connection(config: Config) -> AsyncIterator[aioredis.Redis | None]:
    """One Redis client per process (bounded blocking pool, fail-fast timeouts), shared by
    the replay store and the cache tiers; None with ``cache.backend: memory``."""
    if config.cache.backend != "redis":
        yield None
        return
    client = redis_client(config.cache.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def replay_store(
    redis: aioredis.Redis | None, clock: Clock, given: ReplayStore | None = None
) -> AsyncIterator[ReplayStore]:
    """Redeemed challenges: the one given, else on Redis, else in this process's memory."""
    if given is not None:
        store = given
    elif redis is not None:
        store = RedisReplayStore(redis)
    else:
        store = MemoryReplayStore(clock=clock)
    try:
        yield store
    finally:
        await store.aclose()


# -- 6. the Azure side: clients over the session, and their caches --------------------------


def _caches(
    config: Config, clock: Clock, metrics: Metrics
) -> Callable[[str], MemoryCache[Any, Any]]:
    """A named cache factory: in-process TTL caches with single flight, or with
    ``cache.enabled: false`` (the benchmark's naive baseline) caches that keep nothing."""

    def make(name: str) -> MemoryCache[Any, Any]:
        cls = MemoryCache if config.cache.enabled else NullCache
        return cls(name, clock=clock, observer=metrics.cache_observer(name))

    return make


def _shared_caches(
    config: Config,
    clock: Clock,
    redis: aioredis.Redis | None,
    cache: Callable[[str], MemoryCache[Any, Any]],
) -> Callable[[str, Codec[Any]], Cache[str, Any]]:
    def shared(name: str, codec: Codec[Any]) -> Cache[str, Any]:
        """With Redis, a cache whose loads other replicas reuse (JWKS, AIA); else the
        in-process one. VM maps stay per process: they are cheap to rebuild from one
        listing, and their refresh logic depends on when *this* process loaded them."""
        if redis is None or not config.cache.enabled:
            return cache(name)
        return TieredCache(cache(name), SharedTier(redis, name, clock=clock), codec)

    return shared


def _arm_budget(config: Config, clock: Clock) -> ArmBudget:
    # The naive baseline (caches off) spends without a budget, as a gateway without one
    # would; otherwise every ARM request is paid for from our own bucket first.
    if not config.cache.enabled:
        return NoBudget()
    b = config.azure.arm_budget
    return SubscriptionBudget(
        burst=b.burst,
        refill_per_s=b.refill_per_second,
        list_per_minute=b.list_per_minute,
        safety_margin=b.safety_margin,
        max_wait=b.max_wait_seconds,
        clock=clock,
    )


def vm_binder(
    config: Config,
    arm: ArmClient,
    clock: Clock,
    cache: Callable[[str], MemoryCache[Any, Any]],
    metrics: Metrics,
) -> VmBinder:
    """The binding decision over the ARM read strategy (``cache.*`` tunes the reads)."""
    c = config.cache
    return VmBinder(
        VmDirectory(
            arm,
            clock=clock,
            vm_cache_ttl=c.vm_ttl_seconds,
            negative_ttl=c.negative_ttl_seconds,
            refresh_interval=c.map_refresh_seconds,
            list_window=c.list_window_seconds,
            # Without caches a listing would be redone per join: naive mode reads VMs.
            list_threshold=c.list_threshold if c.enabled else 10**9,
            list_wait=config.azure.arm_budget.max_wait_seconds,
            cache_maps=c.enabled,
            vm_cache=cache("vms"),
            group_observer=metrics.cache_observer("resource_group_maps"),
            set_observer=metrics.cache_observer("scale_set_maps"),
        ),
        enabled=config.azure.vm_binding,
    )


@asynccontextmanager
async def attested_verifier(
    config: Config,
    trust: TrustStore,
    aia: AiaFetcher | None,
    chain_cache: MemoryCache[Any, Any],
    clock: Clock,
) -> AsyncIterator[AttestedVerifier]:
    """The attested-document verifier; its chain-building thread pool is shut down on exit."""
    verifier = AttestedVerifier(
        cloud=config.cloud,
        trust=trust,
        aia=aia,
        chain_cache=chain_cache,
        clock=clock,
        skew=config.azure.clock_skew_seconds,
        known_issuer_names=config.azure.known_issuer_names,
    )
    try:
        yield verifier
    finally:
        verifier.close()


# -- the root --------------------------------------------------------------------------------


@asynccontextmanager
async def production_deps(
    config: Config,
    *,
    clock: Clock | None = None,
    replay: ReplayStore | None = None,
    metrics: Metrics | None = None,
    open_session: SessionFactory | None = None,
) -> AsyncIterator[JoinDeps]:
    """Parameters:

    * config — the loaded config (its values were validated at load).
    * clock, metrics — injected; default the system clock and a fresh registry.
    * replay — a replay store to use instead of the configured one (it is closed on exit).
    * open_session — opens the aiohttp sessions (default ``aiohttp.ClientSession``).
    """
    clock = SystemClock() if clock is None else clock
    metrics = Metrics() if metrics is None else metrics
    open_session = aiohttp.ClientSession if open_session is None else open_session
    az = config.azure
    cloud = config.cloud
    authority = (az.authority_host or cloud.authority_host).rstrip("/")
    arm_endpoint = (az.arm_endpoint or cloud.arm_endpoint).rstrip("/")
    aia_prefixes = (*DEFAULT_AIA_PREFIXES, *az.aia.extra_allowed_prefixes)

    # 1. Files first: a bad one stops the start before anything is opened.
    tokens = load_tokens(config)
    keys = challenge_keys(config, clock)
    trust = trust_store(config)
    trace = metrics.trace_config(
        [(authority, "entra"), (arm_endpoint, "arm"), (config.upstream.url, "auth")]
        + [(prefix, "aia") for prefix in aia_prefixes]
    )

    async with AsyncExitStack() as stack:
        # 2..5. Each resource closes itself; LIFO on the way out, or on a failure here.
        session = await stack.enter_async_context(outbound_session(config, trace, open_session))
        auth = await stack.enter_async_context(auth_client(config, clock, trace, open_session))
        redis = await stack.enter_async_context(redis_connection(config))
        replay_store_ = await stack.enter_async_context(replay_store(redis, clock, replay))

        # 6. Clients over the session and Redis: nothing of their own to close.
        cache = _caches(config, clock, metrics)
        shared = _shared_caches(config, clock, redis, cache)
        aia = None
        if az.aia.enabled:
            aia = AiaFetcher(
                session,
                allowed_prefixes=aia_prefixes,
                max_bytes=az.aia.max_bytes,
                timeout=az.aia.timeout_seconds,
                allow_private=az.aia.allow_private_destinations,
                cache=shared("aia", DerCertificatesCodec()),
                clock=clock,
            )
        jwks = JwksClient(
            session,
            cloud=cloud,
            authority_host=authority,
            clock=clock,
            cache_ttl=config.cache.jwks_ttl_seconds,
            min_refresh_interval=config.cache.jwks_min_refresh_seconds,
            timeout=az.request_timeout_seconds,
            cache=shared("jwks", JsonCodec(keyset_to_json, keyset_from_json)),
            on_refresh=metrics.key_refreshes.inc,
        )
        arm = ArmClient(
            session,
            endpoint=arm_endpoint,
            clock=clock,
            timeout=az.request_timeout_seconds,
            budget=_arm_budget(config, clock),
            observer=metrics,
        )
        # 7. The document verifier owns the thread pool its chain builds run in.
        attested = await stack.enter_async_context(
            attested_verifier(config, trust, aia, cache("chains"), clock)
        )
        yield JoinDeps(
            clock=clock,
            challenge_keys=keys,
            tokens=tokens,
            attested=attested,
            access_tokens=TokenVerifier(
                jwks,
                cloud=cloud,
                clock=clock,
                leeway=az.token_leeway_seconds,
                allowed_tenants=az.allowed_tenants,
            ),
            binder=vm_binder(config, arm, clock, cache, metrics),
            replay=replay_store_,
            auth=auth,
        )
