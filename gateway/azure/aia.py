"""Fetching intermediates from AIA caIssuers URLs, safely.

The URL comes from a certificate an attacker can put in a join request (the signer is
checked before we get here, but the fetcher does not rely on that), so this is an SSRF
surface. The rules:

* the URL must start with an allowed prefix, compared on parsed parts (scheme, host,
  port, path) — no userinfo, no query or fragment, no ``..`` segments, the prefix's own
  port only;
* redirects are not followed by aiohttp; a redirect to another allowed URL is followed
  by us, at most twice, re-checked each time;
* unless ``allow_private=True`` the destination must be public: we resolve the host
  ourselves, check *every* address, and then connect to the checked address (the URL's
  host becomes the ``Host`` header and TLS ``server_hostname``), so a DNS answer that
  changes between check and connect (rebinding) cannot steer the request inside. That is
  why the check is not a custom resolver on the session: the session is injected and
  shared, and a literal IP in a URL never reaches a resolver at all;
* the body is capped while streaming, the whole fetch (redirects included) has one
  timeout.

Outcomes: a policy refusal, a 4xx, or a body that is not certificates → ``[]`` (cached
for a short time): the chain then fails closed as ``ATTESTED_CHAIN_UNTRUSTED``. A network
error, timeout or 5xx → ``Overloaded(DEPENDENCY_UNAVAILABLE)`` (503, retryable, not
cached): the agent should retry rather than be told its document is untrusted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from yarl import URL

from gateway.azure.certs import CERTIFICATE_ERRORS, CertificateUnreadable, load_der_certificate
from gateway.core.cache import Cache, MemoryCache
from gateway.core.clock import Clock, SystemClock
from gateway.core.errors import Code, Overloaded
from gateway.core.httputil import ResponseTooLarge, read_capped

__all__ = ["DEFAULT_AIA_PREFIXES", "AiaFetcher", "AiaRefused"]

logger = logging.getLogger(__name__)

DEFAULT_AIA_PREFIXES: tuple[str, ...] = (
    "http://www.microsoft.com/pkiops/certs/",
    "https://www.microsoft.com/pkiops/certs/",
    "http://caissuers.microsoft.com/pkiops/certs/",
    "https://caissuers.microsoft.com/pkiops/certs/",
    "http://cacerts.digicert.com/",
    "https://cacerts.digicert.com/",
)

_SUCCESS_TTL = 24 * 3600.0
_FAILURE_TTL = 60.0
_MAX_REDIRECTS = 2


class AiaRefused(Exception):
    """A URL or response the policy refuses (not a transient failure)."""


class _RefusedNow(Exception):
    """Raised out of a load so that a refusal is not stored in the certificate cache."""


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str


def _norm_host(host: str) -> str:
    """One spelling per host: IP literals canonicalised, names lowercased without the root dot."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _parse_prefix(prefix: str) -> _Prefix:
    url = URL(prefix, encoded=True)
    if url.scheme not in ("http", "https") or not url.host or url.port is None:
        raise ValueError(f"bad AIA prefix {prefix!r}")
    return _Prefix(url.scheme, _norm_host(url.host), url.port, url.path)


class AiaFetcher:
    """Parameters:

    * session — shared aiohttp session (its connector; we never change it).
    * allowed_prefixes — URL prefixes a caIssuers URL must start with.
    * max_bytes — body cap.
    * timeout — seconds for the whole fetch, redirects included.
    * allow_private — permit private/loopback/link-local destinations (tests only).
    * cache — certificates per URL, for a day.
    * refused_entries — refusals are remembered for a minute in their own bounded cache,
      so URLs a requester invents (each request may name a new one) cannot evict the
      certificates real leaves need.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        allowed_prefixes: Sequence[str] = DEFAULT_AIA_PREFIXES,
        max_bytes: int = 64 * 1024,
        timeout: float = 5.0,
        allow_private: bool = False,
        cache: Cache[str, tuple[x509.Certificate, ...]] | None = None,
        clock: Clock | None = None,
        refused_entries: int = 1000,
    ) -> None:
        self._session = session
        self._prefixes = tuple(_parse_prefix(p) for p in allowed_prefixes)
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._allow_private = allow_private
        self._clock = clock or SystemClock()
        self._cache: Cache[str, tuple[x509.Certificate, ...]] = (
            cache if cache is not None else MemoryCache("aia", max_entries=1000, clock=self._clock)
        )
        self._refused: MemoryCache[str, str] = MemoryCache(
            "aia_refused", max_entries=refused_entries, clock=self._clock
        )

    def __repr__(self) -> str:
        return f"<AiaFetcher prefixes={len(self._prefixes)} cache={self._cache!r}>"

    def allowed(self, url: str) -> bool:
        """Whether ``url`` passes the prefix policy (no network)."""
        try:
            self._check_url(URL(url, encoded=True))
        except (AiaRefused, ValueError):
            return False
        return True

    async def fetch(self, url: str) -> list[x509.Certificate]:
        """The certificates published at ``url`` ([] when refused); cached, single flight."""
        if self._refused.get(url) is not None:
            return []

        async def load() -> tuple[tuple[x509.Certificate, ...], float]:
            try:
                async with asyncio.timeout(self._timeout):
                    certs = await self._fetch_following(url)
            except AiaRefused as exc:
                logger.warning("AIA fetch of %s refused: %s", url, exc)
                self._refused.set(url, str(exc), _FAILURE_TTL)
                raise _RefusedNow from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                logger.warning("AIA fetch of %s failed: %s", url, exc)
                raise Overloaded(
                    Code.DEPENDENCY_UNAVAILABLE,
                    retry_after=_FAILURE_TTL / 6,
                    detail=f"AIA fetch failed: {type(exc).__name__}",
                ) from exc
            return certs, _SUCCESS_TTL

        try:
            return list(await self._cache.get_or_load(url, load))
        except _RefusedNow:
            return []

    # ------------------------------------------------------------------ internals

    def _check_url(self, url: URL) -> _Prefix:
        if url.user is not None or url.password is not None:
            raise AiaRefused("userinfo in URL")
        if url.raw_query_string or url.raw_fragment:
            raise AiaRefused("query or fragment in URL")
        if url.scheme not in ("http", "https") or not url.host:
            raise AiaRefused("not an absolute http(s) URL")
        path = url.path
        if "\\" in url.raw_path or any(seg in (".", "..") for seg in path.split("/")):
            raise AiaRefused("dot segments in path")
        host = _norm_host(url.host)
        for prefix in self._prefixes:
            if (
                url.scheme == prefix.scheme
                and host == prefix.host
                and url.port == prefix.port
                and path.startswith(prefix.path)
            ):
                return prefix
        raise AiaRefused("URL is not under an allowed prefix")

    async def _destination(self, host: str, port: int) -> str:
        """A checked IP address to connect to for ``host``."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        else:
            addresses = [literal]
        if not addresses:
            raise AiaRefused(f"{host} does not resolve")
        if not self._allow_private:
            # ::ffff:127.0.0.1 is loopback in disguise: judge the IPv4 address it maps.
            unmapped = [
                a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a
                for a in addresses
            ]
            bad = [a for a in unmapped if not a.is_global or a.is_multicast]
            if bad:
                raise AiaRefused(f"{host} resolves to non-public address {bad[0]}")
        return str(addresses[0])

    async def _fetch_following(self, url_text: str) -> tuple[x509.Certificate, ...]:
        url = URL(url_text, encoded=True)
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_url(url)
            assert url.host is not None and url.port is not None
            ip = await self._destination(url.host, url.port)
            target = URL.build(
                scheme=url.scheme, host=ip, port=url.port, path=url.raw_path, encoded=True
            )
            host_header = url.host if url.is_default_port() else f"{url.host}:{url.port}"
            async with self._session.get(
                target,
                allow_redirects=False,
                headers={"Host": host_header, "Accept": "*/*"},
                server_hostname=url.host if url.scheme == "https" else None,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise AiaRefused("redirect without Location")
                    url = url.join(URL(location, encoded=True))
                    continue
                if resp.status >= 500:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message="server error"
                    )
                if resp.status != 200:
                    raise AiaRefused(f"HTTP {resp.status}")
                try:
                    body = await read_capped(resp, self._max_bytes)
                except ResponseTooLarge as exc:  # a policy refusal (cached), not an outage
                    raise AiaRefused(str(exc)) from exc
                return _parse_certificates(body)
        raise AiaRefused("too many redirects")


_LOAD_ERRORS: tuple[type[Exception], ...] = (*CERTIFICATE_ERRORS, CertificateUnreadable)


def _load_der_certificate(data: bytes) -> list[x509.Certificate]:
    return [load_der_certificate(data)]


def _parse_certificates(body: bytes) -> tuple[x509.Certificate, ...]:
    """DER certificate, PEM certificate(s), or PKCS#7 certs-only (DER or PEM)."""
    # Whitespace is stripped only to recognise PEM: DER is binary, and a certificate whose
    # last byte happens to be 0x09-0x0d or 0x20 (about 1 in 40) must not lose it.
    stripped = body.strip()
    loaders: list[Callable[[bytes], list[x509.Certificate]]]
    if stripped.startswith(b"-----BEGIN"):
        data = stripped
        if b"PKCS7" in stripped[:40]:
            loaders = [pkcs7.load_pem_pkcs7_certificates]
        else:
            loaders = [x509.load_pem_x509_certificates]
    else:
        data = body
        loaders = [_load_der_certificate, pkcs7.load_der_pkcs7_certificates]
    for loader in loaders:
        try:
            certs = loader(data)
        # Every library error on hostile bytes (InvalidVersion is not a ValueError), and
        # ours for the DER loader: the body is then "not a certificate", never a 500.
        except _LOAD_ERRORS:
            continue
        if certs:
            return tuple(certs)
    raise AiaRefused("body is not a certificate")
