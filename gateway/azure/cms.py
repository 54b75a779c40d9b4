"""CMS SignedData parsing for IMDS attested documents.

cryptography has no public API to verify PKCS#7/CMS signatures, so the envelope is
parsed here with asn1crypto and the crypto checks are done by ``gateway.azure.attested``
with cryptography. This module only *reads*: it never decides whether a document is
good. Anything that is not a parseable CMS SignedData becomes
``BadRequest(Code.ATTESTED_MALFORMED)``; no asn1crypto or cryptography exception leaves
this module, whatever the input bytes (a hypothesis test holds us to that).

Certificates are read one by one (``.dump()`` and loaded with cryptography): asn1crypto's
``.native`` on a certificate set decodes every extension of every certificate and is very
slow, which matters when garbage is cheap to send.
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import cms as a_cms
from asn1crypto import core as a_core
from cryptography import x509

from gateway.core.errors import BadRequest, Code

__all__ = [
    "OID_CONTENT_TYPE",
    "OID_DATA",
    "OID_MESSAGE_DIGEST",
    "OID_SIGNED_DATA",
    "SignedAttrsView",
    "SignedDataView",
    "SignerInfoView",
    "embedded_certificates",
    "parse_signed_data",
]

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_DATA = "1.2.840.113549.1.7.1"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"

# Everything asn1crypto (lazy parsing: errors surface on field access) or cryptography's
# loaders raise on hostile bytes. Deliberately not ``Exception``: a bug in our own code
# must stay a bug, not become a 400.
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    RecursionError,
    x509.InvalidVersion,  # not a ValueError: an embedded certificate claiming X.509 v5
)


@dataclass(frozen=True)
class SignedAttrsView:
    """Signed attributes of one SignerInfo.

    ``der`` is the attributes re-encoded as a SET (tag 0x31): RFC 5652 §5.4 says the
    signature covers that encoding, not the ``[0] IMPLICIT`` one found in the message.
    """

    der: bytes
    message_digest: bytes | None
    content_type: str | None


@dataclass(frozen=True)
class SignerInfoView:
    """One SignerInfo. ``issuer_der``/``serial`` are None when the signer is named by a
    subject key identifier instead of issuer+serial (Azure never does that)."""

    issuer_der: bytes | None
    serial: int | None
    digest_algorithm: str
    signature_algorithm: str
    signature: bytes
    signed_attrs: SignedAttrsView | None


@dataclass(frozen=True)
class SignedDataView:
    content_type: str
    content: bytes
    certificates: tuple[x509.Certificate, ...]
    # DER of each certificate's issuer Name *as encoded in the certificate*, parallel to
    # ``certificates``: issuer+serial matching compares original bytes, not re-encodings.
    certificate_issuers: tuple[bytes, ...]
    signer_infos: tuple[SignerInfoView, ...]


def _malformed(detail: str) -> BadRequest:
    return BadRequest(Code.ATTESTED_MALFORMED, detail=detail)


def parse_signed_data(der: bytes) -> SignedDataView:
    """Parse DER (or BER) CMS ``ContentInfo`` holding a SignedData with embedded content."""
    try:
        return _parse(der)
    except BadRequest:
        raise
    except _PARSE_ERRORS as exc:
        raise _malformed(f"not a CMS SignedData: {type(exc).__name__}: {exc}") from exc


def embedded_certificates(der: bytes) -> list[x509.Certificate]:
    """The certificates carried in the envelope, in envelope order."""
    return list(parse_signed_data(der).certificates)


def _parse(der: bytes) -> SignedDataView:
    if not isinstance(der, bytes | bytearray) or not der:
        raise _malformed("empty document")
    der = bytes(der)
    info = a_cms.ContentInfo.load(der)
    # Trailing bytes after the DER are outside anything signed. Tolerate ASCII whitespace
    # only (a newline some tools append before base64-encoding, as in the real negative
    # fixture negative-taskcluster-tampered-content-2019-12-13.json); anything else is junk.
    trailing = der[len(info.dump()) :]
    if trailing.strip(b" \t\r\n"):
        raise _malformed(f"{len(trailing)} bytes of trailing data after the CMS structure")
    if info["content_type"].dotted != OID_SIGNED_DATA:
        raise _malformed(f"content type {info['content_type'].dotted} is not SignedData")
    sd = info["content"]
    if not isinstance(sd, a_cms.SignedData):
        raise _malformed("content is not SignedData")
    eci = sd["encap_content_info"]
    content_type = eci["content_type"].dotted
    content = _content_bytes(eci["content"])

    certs: list[x509.Certificate] = []
    issuers: list[bytes] = []
    cert_set = sd["certificates"]
    if not isinstance(cert_set, a_core.Void):
        for choice in cert_set:
            if choice.name != "certificate":
                # attribute certificates and "other" formats: not something a signer can be.
                continue
            a_cert = choice.chosen
            certs.append(x509.load_der_x509_certificate(a_cert.dump()))
            issuers.append(a_cert["tbs_certificate"]["issuer"].dump())

    signers = tuple(_signer_info(si) for si in sd["signer_infos"])
    return SignedDataView(
        content_type=content_type,
        content=content,
        certificates=tuple(certs),
        certificate_issuers=tuple(issuers),
        signer_infos=signers,
    )


def _content_bytes(value: object) -> bytes:
    if isinstance(value, a_core.Void):
        raise _malformed("detached content: the document must embed its content")
    if isinstance(value, a_core.ParsableOctetString):
        data = value.__bytes__()
    elif isinstance(value, a_core.OctetString):
        data = value.native
    else:
        raise _malformed("content is not an OCTET STRING")
    if not isinstance(data, bytes):
        raise _malformed("content is not an OCTET STRING")
    return data


def _signer_info(si: a_cms.SignerInfo) -> SignerInfoView:
    sid = si["sid"]
    issuer_der: bytes | None = None
    serial: int | None = None
    if sid.name == "issuer_and_serial_number":
        issuer_der = sid.chosen["issuer"].dump()
        serial = int(sid.chosen["serial_number"].native)
    signature = si["signature"].native
    if not isinstance(signature, bytes):
        raise _malformed("signature is not an OCTET STRING")
    return SignerInfoView(
        issuer_der=issuer_der,
        serial=serial,
        digest_algorithm=si["digest_algorithm"]["algorithm"].dotted,
        signature_algorithm=si["signature_algorithm"]["algorithm"].dotted,
        signature=signature,
        signed_attrs=_signed_attrs(si["signed_attrs"]),
    )


def _signed_attrs(attrs: object) -> SignedAttrsView | None:
    if isinstance(attrs, a_core.Void):
        return None
    if not isinstance(attrs, a_cms.CMSAttributes):
        raise _malformed("signed attributes are not a SET OF Attribute")
    encoded = attrs.dump()
    # [0] IMPLICIT SET OF → SET OF: only the identifier octet changes (RFC 5652 §5.4).
    set_der = b"\x31" + encoded[1:]
    message_digest: bytes | None = None
    content_type: str | None = None
    seen: set[str] = set()
    for attr in attrs:
        oid = attr["type"].dotted
        if oid in seen:
            raise _malformed(f"signed attribute {oid} appears twice")
        seen.add(oid)
        values = attr["values"]
        if oid in (OID_MESSAGE_DIGEST, OID_CONTENT_TYPE) and len(values) != 1:
            raise _malformed(f"signed attribute {oid} must have exactly one value")
        if oid == OID_MESSAGE_DIGEST:
            md = values[0].native
            if not isinstance(md, bytes):
                raise _malformed("messageDigest is not an OCTET STRING")
            message_digest = md
        elif oid == OID_CONTENT_TYPE:
            content_type = values[0].dotted
    return SignedAttrsView(der=set_der, message_digest=message_digest, content_type=content_type)
