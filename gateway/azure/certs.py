"""Pinned trust material and chain building for the attested document's signer.

Trust is *pinned*: the roots are the bundled current Azure roots (``gateway/azure/ca/``,
see its README) plus whatever the operator adds; the system store is never consulted, so
a CA that some OS trusts cannot mint a ``metadata.azure.com`` signer.

Path building and policy (validity at the injected time, basic constraints, key usage,
EKU serverAuth, the signer's DNS name in the SAN) are cryptography's
``cryptography.x509.verification`` server verifier: we do not build paths ourselves.
This module is pure and synchronous; gathering intermediates (request, bundle, AIA) is
the async shell's job (``gateway.azure.attested.AttestedVerifier``).

Bounded cost (README, "Security"): path building is a search, and a hostile request picks
its candidates. So before anything reaches the path builder every key must be cheap to
verify with (:func:`key_refusal`: RSA 2048-4096 bits with e = 65537, or EC P-256/P-384),
chains are at most :data:`MAX_CHAIN_DEPTH` intermediates deep, and cryptography's own
per-call budget (:data:`PATH_BUILDER_SIGNATURE_BUDGET`) caps the signature checks of one
:func:`verify_chain` call.
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
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.core.errors import Code, JoinRejected

__all__ = [
    "AZURE_ISSUING_CA_NAMES",
    "CERTIFICATE_ERRORS",
    "MAX_CHAIN_DEPTH",
    "PATH_BUILDER_SIGNATURE_BUDGET",
    "CertificateUnreadable",
    "TrustStore",
    "VerifiedChain",
    "bundled_ca_files",
    "ca_issuers_urls",
    "common_name",
    "fingerprint",
    "is_self_signed",
    "key_refusal",
    "load_der_certificate",
    "load_pem_file",
    "verify_chain",
]

logger = logging.getLogger(__name__)

# Intermediates between the leaf and a pinned root. Azure's deepest chain has two: leaf →
# Microsoft TLS G2 RSA CA OCSP 0x → Microsoft TLS RSA Root G2 (cross-signed) → DigiCert
# Global Root G2 (gateway/azure/ca/README.md). cryptography's default is 8.
MAX_CHAIN_DEPTH = 2
# cryptography.x509.verification stops a path search after this many signature checks
# (a fixed limit in its Rust chain builder, "DEFAULT_SIGNATURE_CHECK_LIMIT", 1 << 7, like Go
# and rustls-webpki). Our filtering keeps honest searches far below it; it is the ceiling
# the README states for a hostile one.
PATH_BUILDER_SIGNATURE_BUDGET = 128

_RSA_EXPONENT = 65537
_RSA_MIN_BITS = 2048
_RSA_MAX_BITS = 4096
# A public-key operation costs with the modulus size and, for RSA, the exponent's bit
# length: a 3,072-bit exponent makes each verify as slow as a private-key operation.
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)

# Azure's issuing CA names that the bundle does not carry (rotated or per-cloud), by cloud:
# request intermediates are path-building candidates only when their subject CN is one of
# these or of a pinned/known certificate's (``AttestedVerifier``). Names, not trust: a
# certificate carrying one still has to chain to a pinned root.
# https://learn.microsoft.com/azure/security/fundamentals/azure-ca-details
_MICROSOFT_ISSUING = frozenset(
    {
        *(f"Microsoft Azure RSA TLS Issuing CA 0{n}" for n in (3, 4, 7, 8)),
        *(f"Microsoft Azure ECC TLS Issuing CA 0{n}" for n in (3, 4, 7, 8)),
        *(f"Microsoft Azure TLS Issuing CA 0{n}" for n in (1, 2, 5, 6)),
        *(f"Microsoft Azure ECC TLS Issuing CA 0{n}" for n in (1, 2, 5, 6)),
        *(f"Microsoft TLS G2 RSA CA OCSP {n:02d}" for n in (2, 4, 6, 8, 10, 12, 14, 16)),
        *(f"Microsoft TLS G2 ECC CA OCSP {n:02d}" for n in (1, 3, 5, 7, 9, 11, 13, 15)),
        "Microsoft TLS RSA Root G2",
        "Microsoft TLS ECC Root G2",
        "Microsoft RSA TLS CA 01",
        "Microsoft RSA TLS CA 02",
        *(f"Microsoft IT TLS CA {n}" for n in (1, 2, 4, 5)),
    }
)
AZURE_ISSUING_CA_NAMES: dict[str, frozenset[str]] = {
    "public": _MICROSOFT_ISSUING,
    "usgov": _MICROSOFT_ISSUING,
    # Azure operated by 21Vianet: DigiCert's China issuing CAs under DigiCert Global Root CA.
    "china": frozenset({"DigiCert Basic RSA CN CA G2", "DigiCert Basic ECC CN CA G2"}),
}


# What cryptography raises on hostile certificate bytes, at load or on a lazily decoded
# field. ``InvalidVersion`` (an X.509 "v5") is not a ValueError: it once escaped as a 500.
CERTIFICATE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
)


class CertificateUnreadable(Exception):
    """Certificate bytes that do not load (any of :data:`CERTIFICATE_ERRORS`)."""


def load_der_certificate(der: bytes) -> x509.Certificate:
    """One DER certificate, its subject, issuer and public key decoded (they are read next
    anyway). Raises :class:`CertificateUnreadable`, never a library error.

    The key too: a certificate whose key algorithm no library here knows (a mutated OID)
    is not one Azure sends, and the asn1crypto reader refuses such an envelope whole, so
    the strict reader must not carry it along unread (``tests/security/
    test_der_differential.py``); the callers load each distinct certificate once."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.subject, cert.issuer  # noqa: B018 - decode now: lazily, they raise later
        cert.public_key()
    except CERTIFICATE_ERRORS as exc:
        raise CertificateUnreadable(f"{type(exc).__name__}: {exc}") from exc
    return cert


def common_name(name: x509.Name) -> str | None:
    """The first CN of ``name`` as text (None when there is none, or it is not text)."""
    try:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def key_refusal(cert: x509.Certificate) -> str | None:
    """Why ``cert``'s key is too costly (or too odd) to verify with; None when it is fine.

    RSA 2048-4096 bits with e = 65537 (every Azure CA and leaf), or EC P-256/P-384 (the
    Microsoft ECC root and issuing CAs). Anything else is refused before it can reach a
    signature check: the cost of one check is then bounded by RSA-4096's.
    """
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        return f"key does not load: {exc}"
    if isinstance(key, rsa.RSAPublicKey):
        e = key.public_numbers().e
        if e != _RSA_EXPONENT:
            return f"RSA public exponent is {e.bit_length()} bits, not 65537"
        if not _RSA_MIN_BITS <= key.key_size <= _RSA_MAX_BITS:
            return f"RSA key of {key.key_size} bits (2048-4096 allowed)"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            return f"EC curve {key.curve.name} (P-256 or P-384 allowed)"
        return None
    return f"{type(key).__name__} keys are not used by Azure"


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
    try:
        # Inside the try: a key or algorithm that does not load means "not self-signed"
        # (the fuzzer found a certificate whose key raised ValueError here).
        key = cert.public_key()
        hash_alg = cert.signature_hash_algorithm
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
    # Everything the extension holds is looked at once here; the caller decides how many
    # URLs it follows (AttestedVerifier: one per certificate).
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

    def subject_names(self) -> frozenset[str]:
        """The subject CNs of every certificate here: bundled and operator-added names are
        "known issuing CA names" for request intermediates."""
        names = (common_name(c.subject) for c in (*self.roots, *self.intermediates))
        return frozenset(n for n in names if n is not None)

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
            .max_chain_depth(MAX_CHAIN_DEPTH)
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
