"""The hot path for IMDS attested documents: Azure's one CMS shape, read by strict DER.

Every real Azure document (tests/data/azure-real/README.md) is the same shape: a DER
``ContentInfo`` holding a SignedData with its content embedded, the leaf certificate
only, one SignerInfo naming it by issuer+serial, and no signed attributes. asn1crypto
reads that in ~100 µs of Python per join; walking it with :mod:`gateway.azure.der` and
loading the certificate once per distinct byte string costs a fraction of that.

What this module decides:

* Not strict DER (indefinite lengths, non-minimal lengths, lengths past their parent,
  trailing bytes other than ASCII whitespace), or a required element missing or of the
  wrong type, or content that is not id-data → ``BadRequest(ATTESTED_MALFORMED)``, like
  :func:`parse_signed_data`.
* Well-formed DER using a CMS feature Azure never sends (signed or unsigned attributes,
  a signer named by subject key identifier, CRLs, non-X.509 certificate choices) → the
  general asn1crypto parser, :func:`gateway.azure.cms.parse_signed_data`: the slow path
  keeps those documents verifiable (signed attributes are RFC 5652's other form).
* Otherwise the same :class:`SignedDataView` the general parser returns, field for field
  (tests/security/test_der_differential.py holds the two readers to that, with
  asn1crypto as the oracle). Several certificates or SignerInfos are read too: deciding
  that a document must have exactly one signer stays with the verification steps, which
  answer with their own codes.

Cache: a certificate loaded from some bytes is kept under those exact bytes (bounded,
oldest first out), so the steady stream of joins signed by Azure's few leaves reuses one
``x509.Certificate`` and its parsed public key. The cached value is a pure function of
the key bytes — nothing about trust or time is cached here (the verified chain has its
own cache, bounded by the chain's validity, in :class:`~gateway.azure.attested.AttestedVerifier`).
"""

from __future__ import annotations

from cryptography import x509

from gateway.azure import certs
from gateway.azure.cms import (
    OID_DATA,
    OID_SIGNED_DATA,
    SignedDataView,
    SignerInfoView,
    parse_signed_data,
)
from gateway.azure.der import (
    TAG_CONTEXT_0,
    TAG_CONTEXT_1,
    TAG_INTEGER,
    TAG_OCTET_STRING,
    TAG_OID,
    TAG_SEQUENCE,
    TAG_SET,
    DerError,
    expect,
    read_integer,
    read_oid,
    read_tlv,
)
from gateway.core.errors import BadRequest, Code

__all__ = ["CERT_CACHE_MAX", "cached_certificate", "fingerprint", "read_signed_data"]

# Azure signs with a handful of leaves a year; 64 distinct certificates is plenty for a
# rotation overlap and small enough that an attacker cycling certificates gains nothing.
CERT_CACHE_MAX = 64
_CERTS: dict[bytes, x509.Certificate] = {}
# id(certificate) → (the certificate, its fingerprint), for the certificates in _CERTS.
# The entry holds the object itself, so its id cannot be reused while it is remembered.
_FINGERPRINTS: dict[int, tuple[x509.Certificate, bytes]] = {}
# Exact certificate bytes → the issuer Name's DER inside them (bounded like _CERTS).
_ISSUERS: dict[bytes, bytes] = {}
# A SignerInfo's exact bytes before its signature → (issuer DER, serial, digest and
# signature algorithm OIDs), for headers that read in full. Bounded, oldest out first.
_SIGNER_HEADERS_MAX = 64
_SIGNER_HEADERS: dict[bytes, tuple[bytes, int, str, str]] = {}


class _Unusual(Exception):
    """Well-formed, but a CMS feature outside Azure's shape: hand over to asn1crypto."""


def read_signed_data(der: bytes) -> SignedDataView:
    """Parse a DER CMS ``ContentInfo`` holding a SignedData with embedded content."""
    if not isinstance(der, bytes | bytearray) or not der:
        raise BadRequest(Code.ATTESTED_MALFORMED, detail="empty document")
    der = bytes(der)
    try:
        return _read(der)
    except _Unusual:
        return parse_signed_data(der)
    except DerError as exc:
        detail = f"not a DER CMS SignedData: {exc}"
        raise BadRequest(Code.ATTESTED_MALFORMED, detail=detail) from exc


def cached_certificate(der: bytes) -> x509.Certificate:
    """The certificate these exact bytes encode, loaded once while they keep arriving."""
    cert = _CERTS.get(der)
    if cert is None:
        try:
            cert = certs.load_der_certificate(der)
        except certs.CertificateUnreadable as exc:
            raise DerError(f"embedded certificate does not load: {exc}") from exc
        if len(_CERTS) >= CERT_CACHE_MAX:
            _FINGERPRINTS.pop(id(_CERTS.pop(next(iter(_CERTS)))), None)
        _CERTS[der] = cert
        _FINGERPRINTS[id(cert)] = (cert, certs.fingerprint(cert))
    return cert


def fingerprint(cert: x509.Certificate) -> bytes:
    """:func:`gateway.azure.certs.fingerprint`, remembered for the cached certificates.

    ``public_bytes`` re-encodes the whole certificate (~20 µs, twice per join in the
    verifier): a certificate that came out of :func:`cached_certificate` had it computed
    once, when it was loaded."""
    hit = _FINGERPRINTS.get(id(cert))
    if hit is not None and hit[0] is cert:
        return hit[1]
    return certs.fingerprint(cert)


def _read(buf: bytes) -> SignedDataView:
    # ContentInfo ::= SEQUENCE { contentType OID, content [0] EXPLICIT ANY }
    _, ci_start, ci_end = read_tlv(buf, 0, len(buf))
    if buf[0] != TAG_SEQUENCE:
        raise DerError("ContentInfo is not a SEQUENCE")
    # Trailing bytes are outside anything signed. ASCII whitespace only, as cms.py allows
    # (a newline some tools append before base64-encoding, as in the real negative
    # fixture negative-taskcluster-tampered-content-2019-12-13.json).
    if buf[ci_end:].strip(b" \t\r\n"):
        raise DerError(f"{len(buf) - ci_end} bytes of trailing data after the CMS structure")
    oid_start, oid_end = expect(buf, ci_start, ci_end, TAG_OID, "ContentInfo.contentType")
    content_type = read_oid(buf, oid_start, oid_end)
    if content_type != OID_SIGNED_DATA:
        raise DerError(f"content type {content_type} is not SignedData")
    wrap_start, wrap_end = expect(buf, oid_end, ci_end, TAG_CONTEXT_0, "ContentInfo.content")
    _only(wrap_end, ci_end, "ContentInfo")
    sd_start, sd_end = expect(buf, wrap_start, wrap_end, TAG_SEQUENCE, "SignedData")
    _only(sd_end, wrap_end, "ContentInfo.content")

    # SignedData ::= SEQUENCE { version, digestAlgorithms SET, encapContentInfo,
    #   certificates [0] IMPLICIT OPTIONAL, crls [1] IMPLICIT OPTIONAL, signerInfos SET }
    _, pos = expect(buf, sd_start, sd_end, TAG_INTEGER, "SignedData.version")
    _, pos = expect(buf, pos, sd_end, TAG_SET, "SignedData.digestAlgorithms")
    eci_start, pos = expect(buf, pos, sd_end, TAG_SEQUENCE, "SignedData.encapContentInfo")
    econtent_type, content = _encap_content(buf, eci_start, pos)

    certificates: list[x509.Certificate] = []
    issuers: list[bytes] = []
    tag, start, end = read_tlv(buf, pos, sd_end)
    if tag == TAG_CONTEXT_0:
        while start < end:
            cert_tag, cert_start, cert_end = read_tlv(buf, start, end)
            if cert_tag != TAG_SEQUENCE:
                raise _Unusual  # an attribute or "other" certificate choice
            cert, issuer = _embedded_certificate(buf, start, cert_start, cert_end)
            certificates.append(cert)
            issuers.append(issuer)
            start = cert_end
        tag, start, end = read_tlv(buf, end, sd_end)
    if tag == TAG_CONTEXT_1:
        raise _Unusual  # CRLs
    if tag != TAG_SET:
        raise DerError(f"SignedData.signerInfos: expected a SET, found 0x{tag:02x}")
    _only(end, sd_end, "SignedData")
    signers: list[SignerInfoView] = []
    while start < end:
        si_start, si_end = expect(buf, start, end, TAG_SEQUENCE, "SignerInfo")
        signers.append(_signer_info(buf, si_start, si_end))
        start = si_end
    return SignedDataView(
        content_type=econtent_type,
        content=content,
        certificates=tuple(certificates),
        certificate_issuers=tuple(issuers),
        signer_infos=tuple(signers),
    )


def _encap_content(buf: bytes, start: int, end: int) -> tuple[str, bytes]:
    # EncapsulatedContentInfo ::= SEQUENCE { eContentType OID,
    #   eContent [0] EXPLICIT OCTET STRING OPTIONAL }
    oid_start, oid_end = expect(buf, start, end, TAG_OID, "encapContentInfo.eContentType")
    content_type = read_oid(buf, oid_start, oid_end)
    # Azure signs id-data. Without signed attributes eContentType is outside the
    # signature, so any other value is only something an attacker could have changed.
    if content_type != OID_DATA:
        raise DerError(f"encapsulated content type {content_type} is not id-data")
    if oid_end == end:
        raise DerError("detached content: the document must embed its content")
    wrap_start, wrap_end = expect(buf, oid_end, end, TAG_CONTEXT_0, "encapContentInfo.eContent")
    _only(wrap_end, end, "encapContentInfo")
    # A primitive OCTET STRING: DER forbids the constructed (BER, chunked) form.
    os_start, os_end = expect(buf, wrap_start, wrap_end, TAG_OCTET_STRING, "eContent")
    _only(os_end, wrap_end, "eContent")
    return content_type, buf[os_start:os_end]


def _embedded_certificate(
    buf: bytes, start: int, cert_start: int, cert_end: int
) -> tuple[x509.Certificate, bytes]:
    """The certificate at ``buf[start:cert_end]`` and its issuer's DER. The issuer follows
    from the certificate's bytes alone: read once per byte string, like the certificate."""
    der = buf[start:cert_end]
    issuer = _ISSUERS.get(der)
    if issuer is None:
        issuer = _certificate_issuer(buf, cert_start, cert_end)
        cert = cached_certificate(der)  # loads after the issuer read, as without the memo
        if len(_ISSUERS) >= CERT_CACHE_MAX:
            del _ISSUERS[next(iter(_ISSUERS))]
        _ISSUERS[der] = issuer
        return cert, issuer
    return cached_certificate(der), issuer


def _certificate_issuer(buf: bytes, start: int, end: int) -> bytes:
    """The issuer Name's DER as encoded in the certificate (issuer+serial matching
    compares original bytes, never re-encodings)."""
    # Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    #   serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name, ... }, ... }
    tbs_start, tbs_end = expect(buf, start, end, TAG_SEQUENCE, "tbsCertificate")
    tag, _, pos = read_tlv(buf, tbs_start, tbs_end)
    if tag == TAG_CONTEXT_0:
        tag, _, pos = read_tlv(buf, pos, tbs_end)
    if tag != TAG_INTEGER:
        raise DerError("tbsCertificate.serialNumber is not an INTEGER")
    _, pos = expect(buf, pos, tbs_end, TAG_SEQUENCE, "tbsCertificate.signature")
    _, issuer_end = expect(buf, pos, tbs_end, TAG_SEQUENCE, "tbsCertificate.issuer")
    return buf[pos:issuer_end]


def _signer_info(buf: bytes, start: int, end: int) -> SignerInfoView:
    """One SignerInfo. Its elements before the signature (version, sid, both algorithms)
    are the same bytes on every document a leaf signs: read once per byte string, then
    looked up, the signature itself read as the full reader reads it."""
    header_end = _signer_header_end(buf, start, end)
    known = None if header_end is None else _SIGNER_HEADERS.get(buf[start:header_end])
    if header_end is None or known is None:
        return _read_signer_info(buf, start, end)
    issuer_der, serial, digest_algorithm, signature_algorithm = known
    return _signer_view(
        buf, header_end, end, issuer_der, serial, digest_algorithm, signature_algorithm
    )


def _signer_header_end(buf: bytes, start: int, end: int) -> int | None:
    """Where the SignerInfo's fifth element starts (after four of any kind), or None
    when four elements do not read: the full reader then judges the bytes, so what it
    would answer first stays the answer."""
    pos = start
    try:
        for _ in range(4):
            pos = read_tlv(buf, pos, end)[2]
    except DerError:
        return None
    return pos


def _read_signer_info(buf: bytes, start: int, end: int) -> SignerInfoView:
    # SignerInfo ::= SEQUENCE { version, sid, digestAlgorithm, signedAttrs [0] IMPLICIT
    #   OPTIONAL, signatureAlgorithm, signature OCTET STRING, unsignedAttrs [1] OPTIONAL }
    _, pos = expect(buf, start, end, TAG_INTEGER, "SignerInfo.version")
    tag, sid_start, sid_end = read_tlv(buf, pos, end)
    if tag != TAG_SEQUENCE:
        raise _Unusual  # subjectKeyIdentifier [0], which Azure never uses
    # IssuerAndSerialNumber ::= SEQUENCE { issuer Name, serialNumber INTEGER }
    _, issuer_end = expect(buf, sid_start, sid_end, TAG_SEQUENCE, "sid.issuer")
    serial_start, serial_end = expect(buf, issuer_end, sid_end, TAG_INTEGER, "sid.serialNumber")
    _only(serial_end, sid_end, "IssuerAndSerialNumber")
    digest_algorithm, pos = _algorithm(buf, sid_end, end, "SignerInfo.digestAlgorithm")
    if buf[pos : pos + 1] == bytes([TAG_CONTEXT_0]):
        raise _Unusual  # signed attributes: RFC 5652's other form, for the general parser
    signature_algorithm, pos = _algorithm(buf, pos, end, "SignerInfo.signatureAlgorithm")
    issuer_der = buf[sid_start:issuer_end]  # the Name is the first element of the sid
    serial = read_integer(buf, serial_start, serial_end)
    view = _signer_view(buf, pos, end, issuer_der, serial, digest_algorithm, signature_algorithm)
    # Only a header that read in full is remembered (keyed by its exact bytes).
    if len(_SIGNER_HEADERS) >= _SIGNER_HEADERS_MAX:
        del _SIGNER_HEADERS[next(iter(_SIGNER_HEADERS))]
    _SIGNER_HEADERS[buf[start:pos]] = (issuer_der, serial, digest_algorithm, signature_algorithm)
    return view


def _signer_view(
    buf: bytes,
    pos: int,
    end: int,
    issuer_der: bytes,
    serial: int,
    digest_algorithm: str,
    signature_algorithm: str,
) -> SignerInfoView:
    """The SignerInfo's signature at ``pos``, its last element, and the view."""
    sig_start, sig_end = expect(buf, pos, end, TAG_OCTET_STRING, "SignerInfo.signature")
    if sig_end != end:
        read_tlv(buf, sig_end, end)  # still DER, whatever follows
        raise _Unusual  # unsigned attributes (or junk): let the general parser judge
    return SignerInfoView(
        issuer_der=issuer_der,
        serial=serial,
        digest_algorithm=digest_algorithm,
        signature_algorithm=signature_algorithm,
        signature=buf[sig_start:sig_end],
        signed_attrs=None,
    )


def _algorithm(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL }."""
    alg_start, alg_end = expect(buf, pos, end, TAG_SEQUENCE, what)
    oid_start, oid_end = expect(buf, alg_start, alg_end, TAG_OID, what)
    if oid_end != alg_end:
        _, _, params_end = read_tlv(buf, oid_end, alg_end)
        _only(params_end, alg_end, what)
    return read_oid(buf, oid_start, oid_end), alg_end


def _only(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise DerError(f"{what}: {end - pos} unexpected bytes after its last element")
