"""IMDS attested documents, byte for byte in Azure's shape.

Azure's document (see ``tests/data/azure-real/README.md`` and
https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#attested-data)
is a CMS SignedData with quirks a generic CMS library would "fix", so the DER is assembled
here by hand from precomputed pieces; only the content and the signature change per
document:

* ``SignedData.version`` 1, ``digestAlgorithms`` = { sha256WithRSAEncryption, NULL } —
  the *signature* OID where a digest OID belongs (Azure's quirk);
* ``encapContentInfo`` = id-data with the content embedded as one primitive OCTET STRING;
* ``certificates`` = the leaf only (no intermediates), no CRLs;
* one ``SignerInfo``, version 1, ``sid`` = issuerAndSerialNumber, ``digestAlgorithm``
  sha256WithRSAEncryption again, **no signed attributes**, ``signatureAlgorithm``
  rsaEncryption (with NULL), signature = RSA PKCS#1 v1.5 over SHA-256 of the content;
  no unsigned attributes.

The content is compact JSON with keys in ASCII order, dates ``MM/DD/YY HH:MM:SS -0000``, a
six-hour window, and, when no nonce was asked for, ``nonce`` = ``expiresOn`` as
``YYYYMMDD-HHMMSS``.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "DOCUMENT_LIFETIME",
    "AttestedSigner",
    "attested_content",
    "format_azure_date",
]

DOCUMENT_LIFETIME = timedelta(hours=6)

# DER of the object identifiers Azure uses (tag 06, length, value).
_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2
_OID_DATA = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_SHA256_RSA = bytes.fromhex("06092a864886f70d01010b")  # 1.2.840.113549.1.1.11
_OID_RSA = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1
_NULL = b"\x05\x00"


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _len(len(body)) + body


def _der_int(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
    # minimal two's complement: drop redundant leading 0x00 (keeps the sign bit clear)
    while len(raw) > 1 and raw[0] == 0 and raw[1] < 0x80:
        raw = raw[1:]
    return _tlv(0x02, raw)


def format_azure_date(when: datetime) -> str:
    """Azure's ``timeStamp`` format: ``MM/DD/YY HH:MM:SS -0000`` (always UTC)."""
    return when.astimezone(UTC).strftime("%m/%d/%y %H:%M:%S -0000")


def attested_content(
    *,
    vm_id: str,
    subscription_id: str,
    created_on: datetime,
    nonce: str | None,
    sku: str = "",
    license_type: str = "",
    plan: tuple[str, str, str] = ("", "", ""),
) -> bytes:
    """The signed JSON, as the newest real documents have it.

    ``created_on`` is truncated to the second. Without a nonce Azure puts ``expiresOn`` in
    ``YYYYMMDD-HHMMSS`` form there (every real document without a nonce shows this).
    """
    created = created_on.astimezone(UTC).replace(microsecond=0)
    expires = created + DOCUMENT_LIFETIME
    doc = {
        "licenseType": license_type,
        "nonce": nonce if nonce else expires.strftime("%Y%m%d-%H%M%S"),
        "plan": {"name": plan[0], "product": plan[1], "publisher": plan[2]},
        "sku": sku,
        "subscriptionId": subscription_id,
        "timeStamp": {
            "createdOn": format_azure_date(created),
            "expiresOn": format_azure_date(expires),
        },
        "vmId": vm_id,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("ascii")


class AttestedSigner:
    """Signs attested documents with the emulator's leaf; the constant DER is built once.

    Parameters:
        leaf_key: the leaf's RSA private key.
        leaf_cert: the leaf; it is the only certificate in every envelope, and its issuer
            and serial form the SignerInfo's ``sid``.
    """

    def __init__(self, leaf_key: rsa.RSAPrivateKey, leaf_cert: x509.Certificate) -> None:
        self._key = leaf_key
        self._cert = leaf_cert
        alg = _tlv(0x30, _OID_SHA256_RSA + _NULL)
        self._head = (
            _der_int(1)  # SignedData.version
            + _tlv(0x31, alg)  # digestAlgorithms: the sha256WithRSAEncryption quirk
        )
        self._certs = _tlv(0xA0, leaf_cert.public_bytes(serialization.Encoding.DER))
        sid = _tlv(0x30, leaf_cert.issuer.public_bytes() + _der_int(leaf_cert.serial_number))
        self._signer_prefix = _der_int(1) + sid + alg + _tlv(0x30, _OID_RSA + _NULL)

    def sign(self, content: bytes) -> bytes:
        """The CMS ContentInfo (DER) for ``content``."""
        signature = self._key.sign(content, padding.PKCS1v15(), hashes.SHA256())
        signer_info = _tlv(0x30, self._signer_prefix + _tlv(0x04, signature))
        encap = _tlv(0x30, _OID_DATA + _tlv(0xA0, _tlv(0x04, content)))
        signed_data = _tlv(0x30, self._head + encap + self._certs + _tlv(0x31, signer_info))
        return _tlv(0x30, _OID_SIGNED_DATA + _tlv(0xA0, signed_data))

    def response(self, content: bytes) -> bytes:
        """IMDS's response body: ``{"encoding":"pkcs7","signature":"<base64 DER>"}``."""
        b64 = base64.b64encode(self.sign(content))
        return b'{"encoding":"pkcs7","signature":"' + b64 + b'"}'

    def __repr__(self) -> str:
        return f"AttestedSigner(leaf={self._cert.subject.rfc4514_string()!r})"
