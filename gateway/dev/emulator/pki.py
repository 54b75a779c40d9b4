"""The emulator's certificate authorities, shaped like Azure's.

Two independent PKIs live here, because the real world has two:

* the **attestation PKI** (root -> "Emulated Azure RSA TLS Issuing CA" -> leaf
  ``metadata.azure.com``) that signs IMDS attested documents. Its leaf copies the shape of
  the real 2026 "G2" leaves (RSA-2048, subject C/ST/L/O/CN, SANs ``<region>.<domain>`` and
  ``<domain>``, critical KeyUsage digitalSignature+keyEncipherment, critical
  basicConstraints CA:FALSE, EKU serverAuth only, AIA caIssuers) so that a verifier sees
  the same bytes it will see in production; only the AIA URL points at the emulator.
* the **TLS PKI** for the emulator's HTTPS listener (Entra ID and ARM): its own CA and an
  ECDSA P-256 server certificate for ``127.0.0.1``/``localhost``.

Keys live in memory; everything is generated at start-up, unless a state directory is given:
then the attestation root and intermediate and the TLS material are kept there and reused,
so other processes can pin them across restarts (the leaf is always new: its AIA URL names
the port).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

__all__ = [
    "INTERMEDIATE_CN",
    "ROOT_CN",
    "AttestationCas",
    "AttestationPki",
    "TlsPki",
    "aia_file_name",
    "generate_attestation_cas",
    "generate_attestation_pki",
    "generate_tls_pki",
]

ROOT_CN = "Emulated Azure TLS RSA Root G2"
INTERMEDIATE_CN = "Emulated Azure RSA TLS Issuing CA"
_ORG = "Microsoft Corporation"
# Real Azure certificates encode names as PrintableString (cryptography defaults to UTF8String).
_PRINTABLE = _ASN1Type.PrintableString

# Validity shaped like Azure's: CA certificates last years, the leaf about a year
# (the real 2026 leaves last six months; older ones a year or two).
_ROOT_DAYS = 25 * 365
_INTERMEDIATE_DAYS = 5 * 365
_LEAF_DAYS = 365
# Backdate so a verifier with a little skew, or a test clock moved back, still accepts.
_BACKDATE = timedelta(days=7)


def aia_file_name(cn: str) -> str:
    """The AIA file name Azure uses: the CA's CN, percent-encoded, plus ``.crt``."""
    return quote(cn, safe="") + ".crt"


@dataclass(frozen=True)
class AttestationPki:
    """Root, intermediate and the signing leaf. ``leaf_key`` signs every attested document."""

    root_cert: x509.Certificate
    intermediate_cert: x509.Certificate
    leaf_cert: x509.Certificate
    leaf_key: rsa.RSAPrivateKey
    aia_url: str

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def intermediate_pem(self) -> bytes:
        return self.intermediate_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def intermediate_der(self) -> bytes:
        return self.intermediate_cert.public_bytes(serialization.Encoding.DER)

    @property
    def leaf_der(self) -> bytes:
        return self.leaf_cert.public_bytes(serialization.Encoding.DER)

    def __repr__(self) -> str:
        subject = self.leaf_cert.subject.rfc4514_string()
        return f"AttestationPki(leaf={subject!r}, aia={self.aia_url!r})"


@dataclass(frozen=True)
class TlsPki:
    """The HTTPS listener's CA and server certificate (PEM), ready for ``ssl.SSLContext``."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return "TlsPki(ca=..., cert=..., key=<hidden>)"

    _FILES = ("tls-ca.pem", "tls-server.pem", "tls-server.key")

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in zip(self._FILES, (self.ca_pem, self.cert_pem, self.key_pem), strict=True):
            (directory / name).write_bytes(data)
        (directory / self._FILES[2]).chmod(0o600)

    @classmethod
    def load(cls, directory: Path) -> TlsPki | None:
        paths = [directory / name for name in cls._FILES]
        if not all(p.is_file() for p in paths):
            return None
        ca, cert, key = (p.read_bytes() for p in paths)
        return cls(ca_pem=ca, cert_pem=cert, key_pem=key)


def _name(cn: str, *, full: bool = False) -> x509.Name:
    """A subject/issuer as Azure writes them: every attribute a PrintableString."""
    pairs = [(NameOID.COUNTRY_NAME, "US")]
    if full:
        pairs += [(NameOID.STATE_OR_PROVINCE_NAME, "WA"), (NameOID.LOCALITY_NAME, "Redmond")]
    pairs += [(NameOID.ORGANIZATION_NAME, _ORG), (NameOID.COMMON_NAME, cn)]
    return x509.Name([x509.NameAttribute(oid, value, _PRINTABLE) for oid, value in pairs])


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class AttestationCas:
    """Root and intermediate with their keys: what :func:`issue_leaf` needs, and what
    ``state_dir`` persists so a restarted emulator keeps the same trust anchor."""

    root_cert: x509.Certificate
    root_key: rsa.RSAPrivateKey
    intermediate_cert: x509.Certificate
    intermediate_key: rsa.RSAPrivateKey

    def __repr__(self) -> str:
        return f"AttestationCas(root={self.root_cert.subject.rfc4514_string()!r})"

    def save(self, directory: Path) -> None:
        """Write the CAs as PEM (keys unencrypted, mode 0600: test material only)."""
        directory.mkdir(parents=True, exist_ok=True)
        for stem, cert, key in (
            ("attestation-root", self.root_cert, self.root_key),
            ("attestation-intermediate", self.intermediate_cert, self.intermediate_key),
        ):
            key_path = directory / f"{stem}.key"
            key_path.write_bytes(_key_pem(key))
            key_path.chmod(0o600)
            (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load(cls, directory: Path) -> AttestationCas | None:
        """The CAs saved by :meth:`save`, or None when the directory has none."""
        paths = [
            directory / name
            for name in (
                "attestation-root.pem",
                "attestation-root.key",
                "attestation-intermediate.pem",
                "attestation-intermediate.key",
            )
        ]
        if not all(p.is_file() for p in paths):
            return None
        root_key = serialization.load_pem_private_key(paths[1].read_bytes(), password=None)
        int_key = serialization.load_pem_private_key(paths[3].read_bytes(), password=None)
        if not isinstance(root_key, rsa.RSAPrivateKey) or not isinstance(
            int_key, rsa.RSAPrivateKey
        ):
            raise ValueError(f"{directory}: attestation CA keys must be RSA")
        return cls(
            root_cert=x509.load_pem_x509_certificate(paths[0].read_bytes()),
            root_key=root_key,
            intermediate_cert=x509.load_pem_x509_certificate(paths[2].read_bytes()),
            intermediate_key=int_key,
        )


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_attestation_cas(*, now: datetime, ca_key_size: int = 2048) -> AttestationCas:
    """A self-signed RSA root and the "Emulated Azure RSA TLS Issuing CA" under it."""
    start = now - _BACKDATE
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=ca_key_size)
    root_name = _name(ROOT_CN)
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=_ROOT_DAYS))
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA384())
    )
    int_key = rsa.generate_private_key(public_exponent=65537, key_size=ca_key_size)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(_name(INTERMEDIATE_CN))
        .issuer_name(root_name)
        .public_key(int_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=_INTERMEDIATE_DAYS))
        .add_extension(_ca_usage(), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(int_key.public_key()), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA384())
    )
    return AttestationCas(
        root_cert=root, root_key=root_key, intermediate_cert=intermediate, intermediate_key=int_key
    )


def generate_attestation_pki(
    *,
    now: datetime,
    aia_prefix: str,
    domain: str = "metadata.azure.com",
    region: str = "westeurope",
    ca_key_size: int = 2048,
    cas: AttestationCas | None = None,
) -> AttestationPki:
    """Generate (or reuse ``cas``) root and intermediate, and issue a fresh leaf.

    Parameters:
        now: the emulator clock's time; validity starts a week before it.
        aia_prefix: ``http://127.0.0.1:PORT/pkiops/certs/``; the leaf's caIssuers URL is
            this plus the intermediate's file name, and the emulator serves it.
        domain: the leaf CN (``metadata.azure.us`` / ``.cn`` for the sovereign clouds).
        region: the first SAN is ``<region>.<domain>``, as on real leaves.
        ca_key_size: RSA size of root and intermediate (the leaf is always RSA-2048, like
            Azure's). 2048 keeps start-up fast; the real CAs use 4096.
        cas: existing CAs (a persisted state directory); the leaf is always new because
            its AIA URL names this run's port.
    """
    if cas is None:
        cas = generate_attestation_cas(now=now, ca_key_size=ca_key_size)
    start = now - _BACKDATE
    int_name = cas.intermediate_cert.subject
    int_ski = x509.SubjectKeyIdentifier.from_public_key(cas.intermediate_key.public_key())
    int_key = cas.intermediate_key
    aia_url = aia_prefix + aia_file_name(INTERMEDIATE_CN)
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(domain, full=True))
        .issuer_name(int_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=_LEAF_DAYS))
        .add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(aia_url),
                    )
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        # The real leaf: KeyUsage critical, digitalSignature + keyEncipherment (03 02 05 A0).
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"{region}.{domain}"), x509.DNSName(domain)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(int_ski),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(int_key, hashes.SHA384())
    )
    return AttestationPki(
        root_cert=cas.root_cert,
        intermediate_cert=cas.intermediate_cert,
        leaf_cert=leaf,
        leaf_key=leaf_key,
        aia_url=aia_url,
    )


def generate_tls_pki(
    *, now: datetime, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TlsPki:
    """A private CA and an ECDSA P-256 server certificate for the HTTPS listener."""
    start = now - _BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Azure emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Azure emulator TLS CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return TlsPki(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
    )
