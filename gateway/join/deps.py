"""``production_deps(config)``: the real ``JoinDeps`` for a config (our checkAndSetDefaults).

Tests build ``JoinDeps`` themselves with fakes that do real crypto; the server uses this.
Every outbound client shares one aiohttp session whose TLS trust is the system store
plus ``azure.outbound_ca_file`` (the emulator's CA in tests and demos).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

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
from gateway.core.tlsutil import client_ssl_context
from gateway.join.binding import VmBinder
from gateway.join.challenge import ChallengeCodec, load_keys_file
from gateway.join.forward import AuthClient, CircuitBreaker
from gateway.join.pipeline import JoinDeps
from gateway.join.replay import MemoryReplayStore, RedisReplayStore, ReplayStore
from gateway.join.rules import TokenRegistry, load_token_files

__all__ = ["TokenHolder", "load_tokens", "outbound_ssl_context", "production_deps"]

log = logging.getLogger(__name__)


class TokenHolder:
    """The current token registry; ``reload`` swaps it whole, so a join sees one version."""

    def __init__(self, paths: Sequence[Path], registry: TokenRegistry) -> None:
        self.paths = tuple(paths)
        self._registry = registry

    @property
    def registry(self) -> TokenRegistry:
        return self._registry

    def reload(self) -> None:
        """Re-read the token files; on any error keep the old registry and raise."""
        self._registry = load_token_files(self.paths)


def load_tokens(config: Config) -> TokenHolder:
    paths = [config.path(p) for p in config.tokens.files]
    return TokenHolder(paths, load_token_files(paths))


def outbound_ssl_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.azure.outbound_ca_file:
        ctx.load_verify_locations(cafile=str(config.path(config.azure.outbound_ca_file)))
    return ctx


def _caches(
    config: Config, clock: Clock, metrics: Metrics
) -> Callable[[str], MemoryCache[Any, Any]]:
    """A named cache factory: in-process TTL caches with single flight, or with
    ``cache.enabled: false`` (the benchmark's naive baseline) caches that keep nothing."""

    def make(name: str) -> MemoryCache[Any, Any]:
        cls = MemoryCache if config.cache.enabled else NullCache
        return cls(name, clock=clock, observer=metrics.cache_observer(name))

    return make


@asynccontextmanager
async def production_deps(
    config: Config,
    *,
    clock: Clock | None = None,
    replay: ReplayStore | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[JoinDeps]:
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    cache = _caches(config, clock, metrics)
    az = config.azure
    cloud = config.cloud
    authority = (az.authority_host or cloud.authority_host).rstrip("/")
    arm_endpoint = (az.arm_endpoint or cloud.arm_endpoint).rstrip("/")
    aia_prefixes = (*DEFAULT_AIA_PREFIXES, *az.aia.extra_allowed_prefixes)
    trace = metrics.trace_config(
        [(authority, "entra"), (arm_endpoint, "arm"), (config.upstream.url, "auth")]
        + [(prefix, "aia") for prefix in aia_prefixes]
    )
    challenges = ChallengeCodec(
        load_keys_file(config.path(config.challenge.keys_file)),
        ttl=config.challenge.ttl_seconds,
        clock=clock,
    )
    tokens = load_tokens(config)
    trust = TrustStore.load(
        extra_pem_files=[config.path(p) for p in az.extra_ca_files],
        include_bundled=az.bundled_roots,
    )
    connector = aiohttp.TCPConnector(ssl=outbound_ssl_context(config), limit=256, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, trust_env=False, trace_configs=[trace])
    upstream = config.upstream
    upstream_ssl = client_ssl_context(
        ca_file=config.path(upstream.ca_file) if upstream.ca_file else None,
        cert_file=config.path(upstream.client_cert_file) if upstream.client_cert_file else None,
        key_file=config.path(upstream.client_key_file) if upstream.client_key_file else None,
    )
    auth_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=upstream.max_connections, ssl=upstream_ssl),
        trust_env=False,
        trace_configs=[trace],
    )
    auth = AuthClient(
        url=upstream.url,
        ssl_context=upstream_ssl,
        clock=clock,
        timeout=upstream.timeout_seconds,
        max_connections=upstream.max_connections,
        session=auth_session,
        breaker=CircuitBreaker(
            failure_threshold=upstream.breaker_failures,
            reset_timeout=upstream.breaker_reset_seconds,
            clock=clock,
        ),
    )
    # One Redis client per process (bounded blocking pool, fail-fast timeouts), shared by
    # the replay store and the cache tiers; closed last, after everything using it.
    redis = redis_client(config.cache.redis_url) if config.cache.backend == "redis" else None
    replay_store: ReplayStore
    if replay is not None:
        replay_store = replay
    elif redis is not None:
        replay_store = RedisReplayStore(redis)
    else:
        replay_store = MemoryReplayStore(clock=clock)

    def shared(name: str, codec: Codec[Any]) -> Cache[str, Any]:
        """With Redis, a cache whose loads other replicas reuse (JWKS, AIA); else the
        in-process one. VM maps stay per process: they are cheap to rebuild from one
        listing, and their refresh logic depends on when *this* process loaded them."""
        if redis is None or not config.cache.enabled:
            return cache(name)
        return TieredCache(cache(name), SharedTier(redis, name, clock=clock), codec)

    try:
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
        # The naive baseline (caches off) spends without a budget, as a gateway without
        # one would; otherwise every ARM request is paid for from our own bucket first.
        budget: ArmBudget = NoBudget()
        if config.cache.enabled:
            b = az.arm_budget
            budget = SubscriptionBudget(
                burst=b.burst,
                refill_per_s=b.refill_per_second,
                list_per_minute=b.list_per_minute,
                safety_margin=b.safety_margin,
                max_wait=b.max_wait_seconds,
                clock=clock,
            )
        arm = ArmClient(
            session,
            endpoint=arm_endpoint,
            clock=clock,
            timeout=az.request_timeout_seconds,
            budget=budget,
            observer=metrics,
        )
        yield JoinDeps(
            clock=clock,
            challenges=challenges,
            tokens=tokens,
            attested=AttestedVerifier(
                cloud=cloud,
                trust=trust,
                aia=aia,
                chain_cache=cache("chains"),
                clock=clock,
                skew=az.clock_skew_seconds,
                known_issuer_names=az.known_issuer_names,
            ),
            access_tokens=TokenVerifier(
                jwks,
                cloud=cloud,
                clock=clock,
                leeway=az.token_leeway_seconds,
                allowed_tenants=az.allowed_tenants,
            ),
            binder=VmBinder(
                VmDirectory(
                    arm,
                    clock=clock,
                    vm_cache_ttl=config.cache.vm_ttl_seconds,
                    negative_ttl=config.cache.negative_ttl_seconds,
                    refresh_interval=config.cache.map_refresh_seconds,
                    list_window=config.cache.list_window_seconds,
                    # Without caches a listing would be redone per join: naive mode reads VMs.
                    list_threshold=config.cache.list_threshold if config.cache.enabled else 10**9,
                    list_wait=az.arm_budget.max_wait_seconds,
                    cache_maps=config.cache.enabled,
                    vm_cache=cache("vms"),
                    group_observer=metrics.cache_observer("resource_group_maps"),
                    set_observer=metrics.cache_observer("scale_set_maps"),
                ),
                enabled=az.vm_binding,
            ),
            replay=replay_store,
            auth=auth,
        )
    finally:
        await auth.aclose()
        await auth_session.close()
        await session.close()
        await replay_store.aclose()
        if redis is not None:
            await redis.aclose()
