"""Pinned trust material and chain building for the attested document's signer.

Trust is *pinned*: the roots are the bundled current Azure roots (``gateway/azure/ca/``,
see its README) plus whatever the operator adds; the system store is never consulted, so
a CA that some OS trusts cannot mint a ``metadata.azure.com`` signer.

Path building and policy (validity at the injected time, basic constraints, key usage,
EKU serverAuth, the signer's DNS name in the SAN) are cryptography's
``cryptography.x509.verification`` server verifier: we do not build paths ourselves.
This module is pure and synchronous; gathering intermediates (request, bundle, AIA) is
the async shell's job (``gateway.azure.attested.AttestedVerifier``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.core.errors import Code, JoinRejected

__all__ = [
    "TrustStore",
    "VerifiedChain",
    "bundled_ca_files",
    "ca_issuers_urls",
    "fingerprint",
    "is_self_signed",
    "load_pem_file",
    "verify_chain",
]

logger = logging.getLogger(__name__)


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER: the key of the verified-chain cache."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


def is_self_signed(cert: x509.Certificate) -> bool:
    """Subject == issuer and the certificate's own key verifies its signature."""
    if cert.subject != cert.issuer:
        return False
    # Not ``verify_directly_issued_by``: it refuses SHA-1, and old roots (Baltimore) sign
    # themselves with SHA-1. A root's self-signature carries no trust anyway (trust is the
    # operator's choice of file); the check only sorts roots from intermediates.
    key = cert.public_key()
    hash_alg = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and hash_alg is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey) and hash_alg is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        else:
            cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def load_pem_file(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM file (``ValueError`` if there are none)."""
    return x509.load_pem_x509_certificates(path.read_bytes())


def bundled_ca_files() -> list[Path]:
    """The PEM files shipped in ``gateway/azure/ca/``."""
    root = resources.files("gateway.azure").joinpath("ca")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".pem"))


def ca_issuers_urls(cert: x509.Certificate) -> list[str]:
    """The certificate's AIA caIssuers URIs (where its issuer's certificate is published)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == x509.oid.AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]


@dataclass(frozen=True)
class TrustStore:
    """Pinned roots and known (untrusted-by-themselves) intermediates."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]

    @classmethod
    def from_certificates(cls, certs: Iterable[x509.Certificate]) -> TrustStore:
        """Self-signed certificates become roots, the others intermediates (deduplicated)."""
        roots: dict[bytes, x509.Certificate] = {}
        inters: dict[bytes, x509.Certificate] = {}
        for cert in certs:
            target = roots if is_self_signed(cert) else inters
            target.setdefault(fingerprint(cert), cert)
        return cls(roots=tuple(roots.values()), intermediates=tuple(inters.values()))

    @classmethod
    def load(cls, extra_pem_files: Sequence[Path] = (), include_bundled: bool = True) -> TrustStore:
        """The bundled set (unless ``include_bundled=False``) plus the operator's PEM files.

        Raises ``ValueError`` naming the file when one holds no certificate: a trust file
        that silently adds nothing is an operator error worth failing startup for.
        """
        files = [*(bundled_ca_files() if include_bundled else []), *extra_pem_files]
        certs: list[x509.Certificate] = []
        for path in files:
            try:
                certs.extend(load_pem_file(path))
            except ValueError as exc:
                raise ValueError(f"{path}: no PEM certificate: {exc}") from exc
        store = cls.from_certificates(certs)
        if not store.roots:
            raise ValueError("trust store has no root certificate")
        return store

    def __repr__(self) -> str:
        return f"<TrustStore roots={len(self.roots)} intermediates={len(self.intermediates)}>"


@dataclass(frozen=True)
class VerifiedChain:
    """A chain cryptography built and verified: leaf first, root last."""

    subjects: tuple[str, ...]
    certificates_der: tuple[bytes, ...]
    not_after: datetime  # earliest expiry in the chain: the chain is good until then


def verify_chain(
    trust: TrustStore,
    leaf: x509.Certificate,
    *,
    dns_name: str,
    intermediates: Sequence[x509.Certificate],
    at: datetime,
) -> VerifiedChain:
    """Build and verify leaf → pinned root at time ``at`` for server name ``dns_name``.

    ``intermediates`` are candidates only (path building picks what it needs); they add
    no trust. Raises ``JoinRejected(ATTESTED_CHAIN_UNTRUSTED)``.
    """
    try:
        verifier = (
            PolicyBuilder()
            .store(Store(list(trust.roots)))
            .time(at)
            .build_server_verifier(x509.DNSName(dns_name))
        )
        chain = verifier.verify(leaf, list(intermediates))
    except (VerificationError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise JoinRejected(
            Code.ATTESTED_CHAIN_UNTRUSTED, detail=f"signer chain does not verify: {exc}"
        ) from exc
    return VerifiedChain(
        subjects=tuple(c.subject.rfc4514_string() for c in chain),
        certificates_der=tuple(c.public_bytes(Encoding.DER) for c in chain),
        not_after=min(c.not_valid_after_utc for c in chain),
    )
