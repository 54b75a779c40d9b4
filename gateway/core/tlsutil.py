"""Dev/test PKI and the project's TLS settings in one place.

Everything that talks TLS (the gateway's listener, its client for the auth service, the
reference auth service, the emulator, tests, the demo) builds its ``SSLContext`` here, so
the policy of DESIGN §6 — TLS 1.2+, ECDHE with AEAD ciphers for 1.2, session tickets off,
verification always on for clients — is written once and cannot drift between parts.

The PKI half makes real certificates with ``cryptography``: a CA (``generate_ca``), leaves
signed by it (``issue_cert``, or ``sign_public_key`` when the key belongs to someone else,
as when the auth service certifies a node's key), PEM files with private keys at 0600, and
the ``sha256:<hex>`` SPKI pin operators copy into node configs (DESIGN §7).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core.clock import Clock, SystemClock
from gateway.core.files import write_atomic

__all__ = [
    "CaMaterial",
    "CertMaterial",
    "CertifiablePublicKey",
    "KeyType",
    "PrivateKey",
    "client_ssl_context",
    "generate_ca",
    "generate_private_key",
    "issue_cert",
    "load_ca",
    "server_ssl_context",
    "sign_public_key",
    "spki_pin",
    "ssh_key_pin",
    "write_pem_files",
]

KeyType = Literal["ecdsa-p256", "rsa-2048"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# Keys a CA here will put in a certificate it signs (a node may bring any of these).
CertifiablePublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites are all AEAD+PFS
# and are not affected by set_ciphers().
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# Certificates are backdated a little so a peer whose clock runs slightly behind accepts
# a certificate issued a moment ago.
_BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class CertMaterial:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class CaMaterial(CertMaterial):
    """A CA certificate and its signing key."""


def generate_private_key(key_type: KeyType = "ecdsa-p256") -> PrivateKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ecdsa-p256' or 'rsa-2048', not {key_type!r}")


def _now(clock: Clock | None) -> datetime:
    return (clock or SystemClock()).now()


def _random_serial() -> int:
    return x509.random_serial_number()


def generate_ca(
    common_name: str,
    *,
    key_type: KeyType = "ecdsa-p256",
    days: int = 3650,
    organization: str | None = None,
    clock: Clock | None = None,
) -> CaMaterial:
    """A self-signed CA that may sign leaves only (path length 0)."""
    key = generate_private_key(key_type)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attrs)
    now = _now(clock)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CaMaterial(cert=cert, key=key)


def sign_public_key(
    ca: CaMaterial,
    public_key: CertifiablePublicKey,
    *,
    common_name: str,
    organization: str | None = None,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    uri_names: Iterable[str] = (),
    server: bool = True,
    client: bool = False,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A leaf certificate for someone else's public key, signed by ``ca``.

    Names are de-duplicated in order; an entry of ``dns_names`` that is an IP literal is
    put in the certificate as an IP address (clients compare IPs only against IP SANs).
    """
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for value in [*dns_names, *ip_addresses]:
        if value in seen:
            continue
        seen.add(value)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            sans.append(x509.DNSName(value))
    sans += [x509.UniformResourceIdentifier(uri) for uri in uri_names]
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if not usages:
        raise ValueError("a certificate needs server=True or client=True")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange is off (ECDHE only) but some verifiers still expect it.
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def issue_cert(
    ca: CaMaterial,
    *,
    common_name: str,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    server: bool = True,
    client: bool = False,
    key_type: KeyType = "ecdsa-p256",
    days: int = 825,
    organization: str | None = None,
    clock: Clock | None = None,
) -> CertMaterial:
    """A fresh key pair and a leaf certificate for it, signed by ``ca``."""
    key = generate_private_key(key_type)
    now = _now(clock)
    cert = sign_public_key(
        ca,
        key.public_key(),
        common_name=common_name,
        organization=organization,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        server=server,
        client=client,
        not_before=now - _BACKDATE,
        not_after=now + timedelta(days=days),
    )
    return CertMaterial(cert=cert, key=key)


def write_pem_files(
    material: CertMaterial, directory: str | os.PathLike[str], stem: str
) -> tuple[Path, Path]:
    """Write ``<stem>.pem`` (certificate, 0644) and ``<stem>-key.pem`` (key, 0600)."""
    d = Path(directory)
    cert_path = d / f"{stem}.pem"
    key_path = d / f"{stem}-key.pem"
    write_atomic(key_path, material.key_pem(), mode=0o600, make_parents=True)
    write_atomic(cert_path, material.cert_pem(), mode=0o644, make_parents=True)
    return cert_path, key_path


def load_ca(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> CaMaterial:
    """Read a CA written by :func:`write_pem_files`; the key must match the certificate."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{key_file}: CA key must be ECDSA or RSA")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
        raise ValueError(f"{key_file} does not match {cert_file}")
    return CaMaterial(cert=cert, key=key)


def spki_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo DER (Teleport's CA pin)."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def ssh_key_pin(key: serialization.SSHPublicKeyTypes) -> str:
    """``sha256:<hex>`` of an SSH public key's wire-format blob (the agent's ``ssh_ca_pin``).

    The blob is what ``ssh-keygen -l`` hashes too (it prints the digest as base64); hex
    keeps one pin format with :func:`spki_pin`.
    """
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION


def server_ssl_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    client_ca_file: str | os.PathLike[str] | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context: TLS 1.2+, ECDHE+AEAD for 1.2, no session tickets.

    Tickets are off because their key lives in each worker process: with several workers
    or replicas a ticket rarely resumes, and a long-lived ticket key weakens forward
    secrecy. ``OP_NO_TICKET`` alone only does that for TLS 1.2: under TLS 1.3 OpenSSL then
    sends two *stateful* tickets per handshake (sessions kept in this process's cache),
    which no client of ours ever presents — aiohttp and the agent do not resume — so
    ``num_tickets = 0`` stops them (~45 µs of ~580 µs of server CPU per handshake). With
    ``client_ca_file`` client certificates are verified against it;
    ``require_client_cert`` refuses the handshake of a client without one.
    """
    if require_client_cert and client_ca_file is None:
        raise ValueError("require_client_cert needs client_ca_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=os.fspath(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(
    ca_file: str | os.PathLike[str] | None = None,
    cafile_data: str | bytes | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A client context: TLS 1.2+, hostname and chain verification always on.

    ``ca_file``/``cafile_data`` (PEM) pin the trusted CAs; with neither, the system store
    is used. ``cert_file``/``key_file`` present a client certificate (mTLS).
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    _harden(ctx)
    if ca_file is None and cafile_data is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    if cafile_data is not None:
        data = cafile_data.decode("ascii") if isinstance(cafile_data, bytes) else cafile_data
        ctx.load_verify_locations(cadata=data)
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    return ctx
