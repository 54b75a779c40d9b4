"""Collecting the attested document's intermediate certificates, to help the gateway.

Azure puts only the leaf in the attested document's CMS envelope (see
tests/data/azure-real/README.md); the gateway has to find the intermediate. The agent can fetch
it from the leaf's AIA caIssuers URL and send it along (untrusted: it only helps path building,
the gateway still chains to its pinned roots). Only URLs under allowed prefixes are fetched,
with no redirects, a size cap and a timeout, so a hostile document cannot make the VM fetch
arbitrary URLs. Failure is never fatal: the gateway has its own ways to find intermediates.

We parse the CMS with asn1crypto here rather than importing ``gateway.azure``: the agent only
needs the certificates, not a verification, and should not depend on the verifier's internals.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable

import aiohttp
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID

from gateway.agent.errors import JoinError
from gateway.agent.transport import read_capped

__all__ = ["IntermediateCollector", "aia_urls", "certificates_from_attested"]

log = logging.getLogger(__name__)

MAX_CERT_BYTES = 64 * 1024


def certificates_from_attested(signature_b64: str) -> list[x509.Certificate]:
    """The certificates embedded in the attested document's CMS SignedData (raises ValueError)."""
    try:
        der = base64.b64decode(signature_b64, validate=False)
        info = cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise ValueError("CMS content is not SignedData")
        certs = info["content"]["certificates"]
        out: list[x509.Certificate] = []
        for choice in certs or []:
            if choice.name == "certificate":
                out.append(x509.load_der_x509_certificate(choice.chosen.dump()))
        return out
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"attested signature does not parse: {exc}") from exc


def aia_urls(cert: x509.Certificate) -> list[str]:
    """The certificate's AIA caIssuers URLs (empty when it has none)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


class IntermediateCollector:
    """Fetches the attested leaf's issuer from allowed AIA URLs only.

    Parameters:
        session: HTTP session for the AIA fetches.
        allowed_prefixes: URL prefixes the agent will fetch from (exact string prefix).
        max_bytes: size cap per certificate.
        timeout: seconds per fetch.
        max_depth: how many issuers up the chain to follow.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        allowed_prefixes: Iterable[str],
        max_bytes: int = MAX_CERT_BYTES,
        timeout: float = 5.0,
        max_depth: int = 2,
    ) -> None:
        self._session = session
        self._prefixes = tuple(allowed_prefixes)
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_depth = max_depth

    def __repr__(self) -> str:
        return f"IntermediateCollector(prefixes={self._prefixes!r})"

    def allowed(self, url: str) -> bool:
        # A bare prefix test would let ".../certs/../../elsewhere" or userinfo tricks through.
        if any(bad in url for bad in ("/..", "\\", "@", "?", "#")):
            return False
        return any(url.startswith(p) for p in self._prefixes)

    async def collect(self, signature_b64: str) -> tuple[bytes, ...]:
        """DER intermediates for the document's leaf; ``()`` when none could be had (logged)."""
        try:
            certs = certificates_from_attested(signature_b64)
        except ValueError as exc:
            log.warning("cannot read the attested document's certificates: %s", exc)
            return ()
        if not certs:
            return ()
        found: list[bytes] = []
        seen: set[str] = set()
        # The leaf is the certificate that issued no other one (Azure sends only the leaf).
        issuers = {c.issuer for c in certs}
        current = next((c for c in certs if c.subject not in issuers), certs[0])
        for _ in range(self._max_depth):
            if _is_self_issued(current):
                break
            issuer = await self._fetch_issuer(current, seen)
            if issuer is None or _is_self_issued(issuer):
                break
            found.append(issuer.public_bytes(serialization.Encoding.DER))
            current = issuer
        return tuple(found)

    async def _fetch_issuer(
        self, cert: x509.Certificate, seen: set[str]
    ) -> x509.Certificate | None:
        for url in aia_urls(cert):
            if url in seen:
                continue
            seen.add(url)
            if not self.allowed(url):
                log.info("not fetching intermediate from %s: not under an allowed prefix", url)
                continue
            try:
                issuer = await self._fetch(url)
            except (aiohttp.ClientError, TimeoutError, JoinError, ValueError) as exc:
                log.warning("cannot fetch intermediate %s: %s", url, exc)
                continue
            if issuer.subject != cert.issuer:
                log.warning("certificate at %s is not the issuer of %s", url, cert.subject)
                continue
            log.info("collected intermediate %s", issuer.subject.rfc4514_string())
            return issuer
        return None

    async def _fetch(self, url: str) -> x509.Certificate:
        async with self._session.get(url, timeout=self._timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            raw = await read_capped(resp, self._max_bytes)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
