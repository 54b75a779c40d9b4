"""Test-only forger of Azure-shaped attested documents (real crypto, generated CA chain).

By default a document is byte-shaped like Azure's (see tests/data/azure-real/README.md):
CMS SignedData with embedded content, one SignerInfo whose digestAlgorithm is
sha256WithRSAEncryption (the quirk), no signed attributes, the leaf only in the envelope,
compact sorted JSON content with ``MM/DD/YY HH:MM:SS -0000`` dates and a 6-hour window.
Every knob breaks exactly one thing, so each rule of the verifier has a failing case.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from asn1crypto import cms as a_cms
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "AZURE_CA_NAME",
    "DIGEST_OIDS",
    "INTERMEDIATE_CN",
    "T0",
    "Issued",
    "Pki",
    "azure_content",
    "azure_time",
    "forge",
    "huge_exponent_key",
    "issue_ca",
    "issue_leaf",
    "lookalike_cas",
    "make_pki",
    "with_x509_version",
]

DIGEST_OIDS = {
    "sha256WithRSAEncryption": "1.2.840.113549.1.1.11",  # what Azure sends
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha1": "1.3.14.3.2.26",
    "sha512": "2.16.840.1.101.3.4.2.3",
    "md5": "1.2.840.113549.2.5",
}
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256WithRSAEncryption": hashes.SHA256(),
    "sha256": hashes.SHA256(),
    "sha1": hashes.SHA1(),  # noqa: S303 - forging a rejected document on purpose
    "sha512": hashes.SHA512(),
    "md5": hashes.MD5(),  # noqa: S303
}

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Forged Test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class Issued:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)


def _ca(
    cn: str, key: rsa.RSAPrivateKey, issuer: Issued | None, not_before: datetime, days: int
) -> Issued:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True
        )
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
    )
    signer = issuer.key if issuer else key
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
    )
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def issue_leaf(
    issuer: Issued | None,
    *,
    cn: str = "metadata.azure.com",
    sans: Sequence[str] = ("eastus.metadata.azure.com", "metadata.azure.com"),
    not_before: datetime = T0 - timedelta(days=30),
    days: int = 365,
    aia_urls: Sequence[str] = (),
    key: rsa.RSAPrivateKey | None = None,
) -> Issued:
    """A signer leaf shaped like Azure's; ``issuer=None`` makes it self-signed."""
    key = key or _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
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
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    if aia_urls:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(u),
                    )
                    for u in aia_urls
                ]
            ),
            critical=False,
        )
    signer = issuer.key if issuer else key
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
    )
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def issue_ca(
    cn: str,
    *,
    key: rsa.RSAPrivateKey | None = None,
    issuer: Issued | None = None,
    not_before: datetime = T0 - timedelta(days=365),
) -> Issued:
    """A CA certificate ``cn`` issued by ``issuer``; ``issuer=None`` makes it self-issued and
    self-signed with ``key`` (each call a new serial: same name, same key, new certificate)."""
    return _ca(cn, key or _key(), issuer, not_before, 1825)


# A documented Azure issuing CA name: request intermediates under it reach path building.
AZURE_CA_NAME = "Microsoft Azure RSA TLS Issuing CA 03"


def lookalike_cas(name: str, key: rsa.RSAPrivateKey, count: int = 8) -> list[Issued]:
    """Issue 8's reproducer: ``count`` self-issued CAs sharing one name and one key."""
    return [issue_ca(name, key=key) for _ in range(count)]


def huge_exponent_key(bits: int = 3072) -> rsa.RSAPrivateKey:
    """A real RSA key pair whose public exponent is about ``bits`` long: every verify with
    it costs as much as a private-key operation (issue 8's chain-building CPU sink).
    cryptography only generates e = 3 or 65537, so the exponent is chosen here and ``d``
    derived from the primes of a normally generated key."""
    base = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_numbers()
    p, q = base.p, base.q
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    while True:
        e = (secrets.randbits(bits) | 1 | (1 << (bits - 2))) % lam
        if e.bit_length() > bits - 16 and math.gcd(e, lam) == 1:
            break
    d = pow(e, -1, lam)
    public = rsa.RSAPublicNumbers(e, p * q)
    return rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public
    ).private_key()


def with_x509_version(der: bytes, version: int) -> bytes:
    """``der`` with its TBSCertificate's version INTEGER set to ``version`` (0 = v1 ... 4 =
    the "v5" that ``load_der_x509_certificate`` answers with ``InvalidVersion``)."""
    marker = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2 (v3), first in the TBS
    at = der.index(marker)
    return der[:at] + marker[:-1] + bytes([version]) + der[at + len(marker) :]


@dataclass(frozen=True)
class Pki:
    root: Issued
    intermediate: Issued
    leaf: Issued
    extra: dict[str, Issued] = field(default_factory=dict)

    @property
    def root_pem(self) -> bytes:
        return self.root.pem


# The forged intermediate's CN: not an Azure name, so verifiers that should accept it from a
# request are told it (``AttestedVerifier(known_issuer_names=...)``).
INTERMEDIATE_CN = "Forged Azure Issuing CA 99"


def make_pki(*, leaf_aia_urls: Sequence[str] = (), root_cn: str = "Forged Root G9") -> Pki:
    """root → intermediate → leaf ``metadata.azure.com`` (SANs, serverAuth), valid around T0."""
    root = _ca(root_cn, _key(), None, T0 - timedelta(days=3650), 7300)
    inter = _ca(INTERMEDIATE_CN, _key(), root, T0 - timedelta(days=365), 1825)
    leaf = issue_leaf(inter, aia_urls=leaf_aia_urls)
    return Pki(root=root, intermediate=inter, leaf=leaf)


def azure_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%m/%d/%y %H:%M:%S -0000")


def azure_content(
    *,
    nonce: str = "nonce-0123456789",
    vm_id: str | None = "b1310a36-d400-46f6-82cb-6217df846586",
    subscription_id: str | None = "8a205152-b25a-417f-a676-80465535a6c9",
    created_on: datetime = T0,
    hours: float = 6.0,
    overrides: dict[str, Any] | None = None,
    drop: Sequence[str] = (),
) -> bytes:
    """Azure's compact, key-sorted JSON."""
    doc: dict[str, Any] = {
        "licenseType": "",
        "nonce": nonce,
        "plan": {"name": "", "product": "", "publisher": ""},
        "sku": "",
        "subscriptionId": subscription_id,
        "timeStamp": {
            "createdOn": azure_time(created_on),
            "expiresOn": azure_time(created_on + timedelta(hours=hours)),
        },
        "vmId": vm_id,
    }
    if subscription_id is None:
        del doc["subscriptionId"]
    doc.update(overrides or {})
    for key in drop:
        doc.pop(key, None)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _certificate_set_in_order(ders: Sequence[bytes]) -> a_cms.CertificateSet:
    """A CertificateSet in *our* order: asn1crypto sorts SET OF on encode (DER rules), which
    would undo "decoy first". Loading pre-encoded bytes keeps them as they are."""
    body = b"".join(ders)
    return a_cms.CertificateSet.load(b"\x31" + _der_length(len(body)) + body)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _sign(key: rsa.RSAPrivateKey, data: bytes, digest: str) -> bytes:
    return key.sign(data, padding.PKCS1v15(), _HASHES[digest])


def forge(
    signer: Issued,
    content: bytes | None = None,
    *,
    digest: str = "sha256WithRSAEncryption",
    signed_attrs: Literal[None, "correct", "wrong_digest", "wrong_content_type"] = None,
    certificates: Sequence[Issued] | None = None,
    extra_signers: Sequence[Issued] = (),
    sign_with: rsa.RSAPrivateKey | None = None,
    tamper_content: bool = False,
    tamper_signature: bool = False,
    signature_algorithm: str = "rsassa_pkcs1v15",
) -> str:
    """Base64 of a CMS SignedData, as IMDS's ``signature`` field.

    * ``certificates`` — envelope certificates in order (default: the signer leaf only).
    * ``extra_signers`` — more SignerInfos (each signing correctly with its own key).
    * ``sign_with`` — a different private key than the signer's (signature mismatch).
    """
    content = azure_content() if content is None else content
    certs = [signer] if certificates is None else list(certificates)

    def signer_info(who: Issued, key: rsa.RSAPrivateKey) -> a_cms.SignerInfo:
        a_cert = a_x509.Certificate.load(who.der)
        attrs = None
        if signed_attrs is None:
            signature = _sign(key, content, digest)
        else:
            md = _HASHES[digest]
            h = hashes.Hash(md)
            h.update(content if signed_attrs != "wrong_digest" else content + b" ")
            attrs = a_cms.CMSAttributes(
                [
                    {
                        "type": "content_type",
                        "values": [
                            "signed_data" if signed_attrs == "wrong_content_type" else "data"
                        ],
                    },
                    {"type": "message_digest", "values": [h.finalize()]},
                ]
            )
            signature = _sign(key, attrs.dump(), digest)
        if tamper_signature:
            signature = signature[:-1] + bytes([signature[-1] ^ 0x01])
        info: dict[str, Any] = {
            "version": "v1",
            "sid": a_cms.SignerIdentifier(
                name="issuer_and_serial_number",
                value={
                    "issuer": a_cert["tbs_certificate"]["issuer"],
                    "serial_number": a_cert["tbs_certificate"]["serial_number"],
                },
            ),
            "digest_algorithm": {"algorithm": DIGEST_OIDS[digest]},
            "signature_algorithm": {"algorithm": signature_algorithm},
            "signature": signature,
        }
        if attrs is not None:
            info["signed_attrs"] = attrs
        return a_cms.SignerInfo(info)

    infos = [signer_info(signer, sign_with or signer.key)]
    infos += [signer_info(s, s.key) for s in extra_signers]
    body = content
    if tamper_content:
        body = content.replace(b'"vmId":"b', b'"vmId":"c', 1)
        assert body != content
    sd = a_cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": DIGEST_OIDS[digest]}],
            "encap_content_info": {"content_type": "data", "content": body},
            "certificates": _certificate_set_in_order([c.der for c in certs]),
            "signer_infos": infos,
        }
    )
    ci = a_cms.ContentInfo({"content_type": "signed_data", "content": sd})
    return base64.b64encode(ci.dump()).decode()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
