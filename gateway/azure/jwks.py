"""Entra ID signing keys per tenant (OIDC discovery → JWKS), cached, and the token verifier.

Why our own client rather than PyJWT's ``PyJWKClient``: that one fetches with ``urllib``
and blocks the event loop, has no single flight and no last-known-good. Here:

* keys are cached per tenant (``MemoryCache``, single flight: N concurrent misses make one
  discovery + one JWKS fetch);
* an unknown ``kid`` triggers one refresh, but never more than once per
  ``min_refresh_interval`` per tenant, so tokens with made-up ``kid`` values cannot turn the
  gateway into a load generator against Entra;
* a failed fetch serves the last keys that worked; with none, the join gets a retryable
  ``503 dependency_unavailable`` (and the failure is remembered briefly, again so that a
  flood does not become a flood of fetches);
* the discovery document may only point ``jwks_uri`` at the authority's own origin, so a
  tampered or misconfigured discovery cannot make us trust keys from elsewhere.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from gateway.azure.token import (
    TokenClaims,
    normalize_guid,
    parse_jwks,
    read_token,
    verify_access_token,
)
from gateway.core.cache import Cache, MemoryCache
from gateway.core.clock import Clock
from gateway.core.cloud import CloudProfile
from gateway.core.errors import Code, JoinRejected, Overloaded
from gateway.core.httputil import read_capped

__all__ = [
    "JwksClient",
    "KeySet",
    "KeySource",
    "StaticKeys",
    "TokenVerifier",
    "keyset_from_json",
    "keyset_to_json",
]

logger = logging.getLogger(__name__)

# Discovery documents and key sets are a few KiB; refuse anything absurd.
_MAX_BODY = 512 * 1024
# After a failed fetch with nothing to fall back on, answer 503 without refetching for this
# long (it is also the Retry-After we send).
_FAILURE_HOLD = 10.0
# A tenant Entra does not know (400/404 on discovery) is remembered this long.
_UNKNOWN_TENANT_TTL = 300.0
# How many tenants' last-known-good key sets we keep (bounded memory).
_MAX_LKG = 10_000


@dataclass(frozen=True)
class KeySet:
    """One tenant's RSA signing keys, when (monotonic) they were fetched, and whether the
    tenant exists at all (``known=False``: discovery said no such tenant)."""

    keys: Mapping[str, RSAPublicKey]
    fetched_at: float
    known: bool = True
    # Order of the load that produced this set (``-1`` for a last-known-good fallback), so
    # a caller can tell "loaded after I started" without trusting clock resolution.
    seq: int = -1


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).decode()


def _int(s: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), "big")


def keyset_to_json(keyset: KeySet) -> dict[str, Any]:
    """A key set as JSON for the shared (Redis) tier: public numbers only."""
    keys = {}
    for kid, key in keyset.keys.items():
        numbers = key.public_numbers()
        keys[kid] = {"n": _b64(numbers.n), "e": _b64(numbers.e)}
    return {"keys": keys, "known": keyset.known}


def keyset_from_json(obj: Any) -> KeySet:
    """The reverse — stamped as *old* (fetched at -inf, seq -1): a copy another replica
    cached must never count as "fetched during this call", or it would suppress the
    refresh an unknown ``kid`` needs."""
    try:
        keys = {
            str(kid): RSAPublicNumbers(_int(k["e"]), _int(k["n"])).public_key()
            for kid, k in obj["keys"].items()
        }
        return KeySet(keys, float("-inf"), known=bool(obj["known"]), seq=-1)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a cached key set: {exc}") from exc


class _FetchError(Exception):
    """A fetch failed for a reason worth retrying (network, 5xx, bad body)."""


class _TenantUnknown(Exception):
    """Discovery answered 400/404: Entra does not know this tenant."""


@dataclass
class _Failure:
    until: float
    reason: str = field(default="")


class JwksClient:
    """Parameters:

    * session — the shared ``aiohttp.ClientSession`` (owned by the caller).
    * cloud — gives the authority host.
    * authority_host — override (the emulator's ``https://127.0.0.1:<port>``).
    * clock — injected; TTLs and rate limits use ``clock.monotonic()``.
    * cache_ttl — how long a key set is used before it is refetched.
    * min_refresh_interval — at most one unknown-``kid`` refresh per tenant per interval.
    * timeout — total seconds per HTTP request.
    * cache — the per-tenant key-set cache (default: a fresh ``MemoryCache`` on ``clock``;
      pass one to share it or to read its ``stats``).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        cloud: CloudProfile,
        authority_host: str | None = None,
        clock: Clock,
        cache_ttl: float = 24 * 3600,
        min_refresh_interval: float = 300.0,
        timeout: float = 5.0,
        cache: Cache[str, KeySet] | None = None,
        on_refresh: Callable[[], None] | None = None,
    ) -> None:
        authority = (authority_host or cloud.authority_host).rstrip("/")
        parts = urlsplit(authority)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"authority_host {authority!r} is not an http(s) URL")
        self._session = session
        self._cloud = cloud
        self._authority = authority
        self._authority_origin = (parts.scheme, parts.hostname.lower(), parts.port)
        self._clock = clock
        self._cache_ttl = cache_ttl
        self._min_refresh = min_refresh_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: Cache[str, KeySet] = (
            cache if cache is not None else MemoryCache("jwks", max_entries=_MAX_LKG, clock=clock)
        )
        self._last_good: dict[str, KeySet] = {}
        self._failures: dict[str, _Failure] = {}
        self._seq = 0
        self.fetches: Counter[str] = Counter()
        self._on_refresh = on_refresh  # a key rotation seen (metrics)

    # -- public -------------------------------------------------------------------------

    async def key_for(self, tid: str, kid: str) -> RSAPublicKey:
        """The tenant's RSA key ``kid``; raises ``JoinRejected(ACCESS_TOKEN_KEY_UNKNOWN)``
        when the tenant does not have it (after at most one rate-limited refresh), or
        ``Overloaded(DEPENDENCY_UNAVAILABLE)`` when Entra cannot be reached and no keys are
        known."""
        tenant = normalize_guid(tid)
        if tenant is None:  # callers pass a peeked tid, but this goes into a URL: check again
            raise JoinRejected(Code.ACCESS_TOKEN_INVALID, "tenant id is not a GUID")
        started = self._clock.monotonic()
        seq_at_start = self._seq
        keyset = await self._keys(tenant)
        key = keyset.keys.get(kid)
        if key is not None:
            return key
        # Unknown kid. Refetch only if what we hold is older than this call and older than
        # the refresh interval; concurrent refreshers share one load (single flight).
        current = self._cache.get(tenant)
        if current is not None and current is not keyset:
            keyset = current  # someone refreshed while we looked
        elif keyset.seq <= seq_at_start and started - keyset.fetched_at >= self._min_refresh:
            logger.info("unknown kid %s for tenant %s: refreshing its keys", kid, tenant)
            if self._on_refresh is not None:
                self._on_refresh()
            self._cache.delete(tenant)
            keyset = await self._keys(tenant)
        key = keyset.keys.get(kid)
        if key is None:
            raise JoinRejected(
                Code.ACCESS_TOKEN_KEY_UNKNOWN,
                f"tenant {tenant} has no signing key {kid!r}"
                + ("" if keyset.known else " (Entra does not know the tenant)"),
            )
        return key

    def __repr__(self) -> str:
        return (
            f"<JwksClient authority={self._authority} tenants={len(self._cache)} "
            f"fetches={dict(self.fetches)}>"
        )

    # -- loading ------------------------------------------------------------------------

    async def _keys(self, tenant: str) -> KeySet:
        async def load() -> tuple[KeySet, float]:
            return await self._load(tenant)

        return await self._cache.get_or_load(tenant, load)

    async def _load(self, tenant: str) -> tuple[KeySet, float]:
        self._seq += 1
        seq = self._seq
        now = self._clock.monotonic()
        failure = self._failures.get(tenant)
        if failure is not None and failure.until > now:
            return self._fallback(tenant, failure.reason, failure.until - now)
        try:
            keys = await self._fetch(tenant)
        except (_TenantUnknown, _FetchError) as exc:
            if isinstance(exc, _TenantUnknown) and tenant not in self._last_good:
                # Entra answers 400 (AADSTS90002) for a tenant that does not exist: a
                # rejection, not an outage. Remembered, so made-up tenants cost one fetch.
                logger.info("Entra does not know tenant %s", tenant)
                ttl = min(_UNKNOWN_TENANT_TTL, self._cache_ttl)
                return KeySet({}, now, known=False, seq=seq), ttl
            # A tenant we had keys for cannot vanish for real: treat it as an outage.
            reason = str(exc) or "discovery says the tenant is unknown"
            logger.warning("fetching keys for tenant %s failed: %s", tenant, reason)
            if len(self._failures) >= _MAX_LKG:  # bounded, even under made-up tenants
                self._failures = {t: f for t, f in self._failures.items() if f.until > now}
                while len(self._failures) >= _MAX_LKG:
                    self._failures.pop(next(iter(self._failures)))
            self._failures[tenant] = _Failure(now + _FAILURE_HOLD, reason)
            return self._fallback(tenant, reason, _FAILURE_HOLD)
        self._failures.pop(tenant, None)
        keyset = KeySet(keys, self._clock.monotonic(), seq=seq)
        if tenant not in self._last_good and len(self._last_good) >= _MAX_LKG:
            self._last_good.pop(next(iter(self._last_good)))
        self._last_good[tenant] = keyset
        return keyset, self._cache_ttl

    def _fallback(self, tenant: str, reason: str, hold: float) -> tuple[KeySet, float]:
        lkg = self._last_good.get(tenant)
        if lkg is None:
            raise Overloaded(
                Code.DEPENDENCY_UNAVAILABLE,
                retry_after=max(1.0, hold),
                detail=f"Entra keys for tenant {tenant} unavailable: {reason}",
            )
        # Serve the last keys that worked, and try again once the hold is over.
        return lkg, hold

    async def _fetch(self, tenant: str) -> dict[str, RSAPublicKey]:
        discovery_url = f"{self._authority}/{tenant}/.well-known/openid-configuration"
        discovery = await self._get_json(discovery_url, "discovery", tenant_lookup=True)
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not self._same_origin(jwks_uri):
            # Not a transient error, but a retry could see a fixed document: 503 + LKG.
            raise _FetchError(f"discovery's jwks_uri {jwks_uri!r} is not on {self._authority}")
        doc = await self._get_json(jwks_uri, "jwks", tenant_lookup=False)
        try:
            keys = parse_jwks(doc)
        except ValueError as exc:
            raise _FetchError(f"JWKS: {exc}") from exc
        if not keys:
            raise _FetchError("JWKS has no usable RSA signing key")
        return keys

    def _same_origin(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            origin = (parts.scheme, (parts.hostname or "").lower(), parts.port)
        except ValueError:
            return False
        return origin == self._authority_origin and not parts.username and not parts.password

    async def _get_json(self, url: str, kind: str, *, tenant_lookup: bool) -> dict[str, Any]:
        self.fetches[kind] += 1
        try:
            async with self._session.get(
                url,
                timeout=self._timeout,
                allow_redirects=False,
                headers={"Accept": "application/json"},
            ) as resp:
                if tenant_lookup and resp.status in (400, 404):
                    raise _TenantUnknown
                if resp.status != 200:
                    raise _FetchError(f"{kind} answered HTTP {resp.status}")
                body = await read_capped(resp, _MAX_BODY)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _FetchError(f"{kind}: {type(exc).__name__}: {exc}") from exc
        try:
            value = json.loads(body)
        # RecursionError is not a ValueError: a deeply nested answer is just not JSON to us.
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise _FetchError(f"{kind} is not JSON") from exc
        if not isinstance(value, dict):
            raise _FetchError(f"{kind} is not a JSON object")
        return value


class KeySource(Protocol):
    """Where ``TokenVerifier`` gets a tenant's signing key: ``JwksClient`` (Entra, cached)
    or ``StaticKeys`` (a JWKS file: ``inspect``, offline)."""

    async def key_for(self, tid: str, kid: str) -> RSAPublicKey: ...


class StaticKeys:
    """A fixed key set for any tenant (``inspect --jwks FILE``): nothing is fetched.
    ``problem`` says why the set is empty when the file held no usable JWKS."""

    def __init__(self, keys: Mapping[str, RSAPublicKey], *, problem: str | None = None) -> None:
        self._keys = dict(keys)
        self._problem = problem

    async def key_for(self, tid: str, kid: str) -> RSAPublicKey:
        key = self._keys.get(kid)
        if key is None:
            why = f" ({self._problem})" if self._problem else ""
            raise JoinRejected(
                Code.ACCESS_TOKEN_KEY_UNKNOWN, f"no key {kid!r} in the JWKS given{why}"
            )
        return key


class TokenVerifier:
    """Verify an access token end to end: peek → the tenant's key → ``verify_access_token``.

    The tenant allow-list is checked right after peeking as well, so a token from an
    unlisted tenant costs no fetch (it is checked again on the verified claims).
    """

    def __init__(
        self,
        jwks: KeySource,
        *,
        cloud: CloudProfile,
        clock: Clock,
        leeway: float = 60.0,
        allowed_tenants: Collection[str] = (),
    ) -> None:
        self._jwks = jwks
        self._cloud = cloud
        self._clock = clock
        self._leeway = leeway
        self._allowed = frozenset(t.lower() for t in allowed_tenants)

    async def verify(self, token: str) -> TokenClaims:
        read = read_token(token)  # decoded once: verify_access_token reuses it
        view = read.view
        if view.alg != "RS256":
            raise JoinRejected(Code.ACCESS_TOKEN_INVALID, f"token alg {view.alg!r} is not RS256")
        if self._allowed and view.tid not in self._allowed:
            raise JoinRejected(Code.TENANT_NOT_ALLOWED, f"tenant {view.tid} is not allowed")
        key = await self._jwks.key_for(view.tid, view.kid)
        # Verification is a single RSA verify (~50 µs): not worth a thread hop.
        return verify_access_token(
            read,
            keys={view.kid: key},
            cloud=self._cloud,
            now=self._clock.time(),
            leeway=self._leeway,
            allowed_tenants=self._allowed,
        )

    def __repr__(self) -> str:
        return f"<TokenVerifier cloud={self._cloud.name} tenants={sorted(self._allowed) or 'any'}>"
