"""Verification of the IMDS attested document (DESIGN.md §3, step 4, first bullet).

Pure step functions (sync, over bytes and dataclasses) do every check and raise the
typed error for it; :class:`AttestedVerifier` is the async shell that runs them in order
and adds the only I/O there is: fetching a missing intermediate over AIA. ``inspect``
runs the very same steps through :meth:`AttestedVerifier.inspect`, which records each
step instead of stopping at the first failure where later steps still make sense.

Order (cheap first): base64 → CMS parse → one signer → digest algorithm → RSA
signature → signer name → chain (cached per signer) → content (JSON, GUIDs, window,
nonce).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.azure.aia import AiaFetcher
from gateway.azure.certs import (
    AZURE_ISSUING_CA_NAMES,
    PATH_BUILDER_SIGNATURE_BUDGET,
    CertificateUnreadable,
    TrustStore,
    VerifiedChain,
    ca_issuers_urls,
    common_name,
    key_refusal,
    load_der_certificate,
    verify_chain,
)
from gateway.azure.cms import SignedDataView, SignerInfoView
from gateway.azure.cms_shape import fingerprint, read_signed_data
from gateway.core.cache import MemoryCache
from gateway.core.clock import Clock
from gateway.core.cloud import CloudProfile
from gateway.core.errors import BadRequest, Code, JoinRejected, Overloaded
from gateway.core.steps import (
    Detail,
    Skip,
    Step,
    StepResult,
    StepTable,
    run_fail_fast,
    run_recording,
)
from gateway.protocol import is_guid

__all__ = [
    "DOCUMENT_STEPS",
    "MAX_REQUEST_INTERMEDIATES",
    "MAX_SIGNATURE_CHECKS",
    "AttestedContent",
    "AttestedDocument",
    "AttestedVerifier",
    "CheckResult",
    "Inspection",
    "check_content",
    "check_digest_algorithm",
    "check_nonce",
    "check_signature",
    "check_signature_algorithm",
    "check_signer_name",
    "check_single_signer",
    "check_window",
    "decode_signature",
    "find_signer_certificate",
    "parse_azure_time",
    "parse_content",
    "signer_key",
    "verify_signed_content",
]

logger = logging.getLogger(__name__)

OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"

# Azure puts sha256WithRSAEncryption in SignerInfo.digestAlgorithm where RFC 5652 wants a
# plain digest OID; both mean SHA-256. Teleport handles the same quirk:
# https://github.com/gravitational/teleport/blob/master/lib/join/azurejoin/azure.go
# (fixAzureSigningAlgorithm), and the real documents in tests/data/azure-real/ show it.
# Bounded cost per request (README, "Security"). Request intermediates that survive the
# filters (parse, known issuing-CA name, cheap key, not self-issued, distinct) are at most
# this many: an honest agent sends the leaf's issuer and perhaps one cross-certificate.
MAX_REQUEST_INTERMEDIATES = 4
# Signature checks one request can cause: the signer's, then at most two path-builder
# calls (before and after the one AIA fetch), each stopped by cryptography's budget.
MAX_SIGNATURE_CHECKS = 1 + 2 * PATH_BUILDER_SIGNATURE_BUDGET
# A leaf whose chain failed is refused from memory for this long (keyed by the exact leaf,
# its name and the intermediates used), so repeating a costly failure costs a lookup.
_FAILED_CHAIN_TTL = 60.0
_FAILED_CHAIN_ENTRIES = 4096
# Chain builds waiting for or running in the pool; beyond it a build is refused as
# overload (503, retryable) instead of queueing without bound behind hostile ones.
_MAX_PENDING_BUILDS = 32

_SHA256_DIGEST_OIDS = frozenset({OID_SHA256, OID_SHA256_WITH_RSA})
_RSA_SIGNATURE_OIDS = frozenset({OID_RSA_ENCRYPTION, OID_SHA256_WITH_RSA})
# Stateless parameter objects, made once instead of on every verify.
_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())
# Signer certificates whose key and name a verifier remembers (Azure signs with a few
# leaves a year; more distinct signers than this only cost the checks again).
_SIGNERS_MAX = 64

# Azure's timeStamp format, e.g. "07/28/26 13:24:00 -0000" (two-digit year, UTC offset).
# https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#attested-data
_AZURE_TIME = re.compile(r"^(\d{2})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")
# Some captures wrap the base64 in PEM-style armour without spaces or newlines (the real
# fixture negative-taskcluster-wrong-subject-synthetic.json); accept exactly that shape.
_ARMOUR = re.compile(
    r"^-----BEGIN ?PKCS7-----(?P<body>[A-Za-z0-9+/]*)-----END ?PKCS7-----(?P<pad>=*)$"
)


@dataclass(frozen=True)
class AttestedDocument:
    """What a verified document proves. ``signer_fingerprint`` is SHA-256 of the leaf DER."""

    nonce: str
    vm_id: str
    subscription_id: str | None
    sku: str | None
    created_on: datetime
    expires_on: datetime
    signer_cn: str
    signer_fingerprint: bytes
    chain_subjects: tuple[str, ...]


@dataclass(frozen=True)
class AttestedContent:
    """The signed JSON, typed. ``subscription_id`` is None in old api-versions' documents."""

    nonce: str
    vm_id: str
    subscription_id: str | None
    sku: str | None
    created_on: datetime
    expires_on: datetime


# ----------------------------------------------------------------------------- steps


def decode_signature(signature_b64: str) -> bytes:
    """Strict base64 (``validate=True``) → DER. Bad input → ``ATTESTED_MALFORMED``."""
    text = signature_b64.strip()
    armoured = _ARMOUR.match(text)
    if armoured:
        text = armoured["body"] + armoured["pad"]
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(Code.ATTESTED_MALFORMED, detail=f"signature is not base64: {exc}") from exc
    if not der:
        raise BadRequest(Code.ATTESTED_MALFORMED, detail="signature is empty")
    return der


def check_single_signer(view: SignedDataView) -> SignerInfoView:
    if len(view.signer_infos) != 1:
        raise JoinRejected(
            Code.ATTESTED_SIGNER_INVALID,
            detail=f"expected exactly one SignerInfo, found {len(view.signer_infos)}",
        )
    return view.signer_infos[0]


def find_signer_certificate(view: SignedDataView, signer: SignerInfoView) -> x509.Certificate:
    """The embedded certificate the SignerInfo names by issuer+serial (never "the first")."""
    if signer.issuer_der is None or signer.serial is None:
        raise JoinRejected(
            Code.ATTESTED_SIGNER_INVALID, detail="signer is not identified by issuer+serial"
        )
    matches: list[x509.Certificate] = []
    for cert, issuer in zip(view.certificates, view.certificate_issuers, strict=True):
        if issuer == signer.issuer_der and cert.serial_number == signer.serial:
            matches.append(cert)
    if not matches:
        raise JoinRejected(
            Code.ATTESTED_SIGNER_INVALID, detail="no embedded certificate matches the SignerInfo"
        )
    if len(matches) > 1 and len({fingerprint(c) for c in matches}) != 1:
        raise JoinRejected(
            Code.ATTESTED_SIGNER_INVALID, detail="several certificates match the SignerInfo"
        )
    return matches[0]


def check_digest_algorithm(signer: SignerInfoView) -> None:
    if signer.digest_algorithm not in _SHA256_DIGEST_OIDS:
        raise JoinRejected(
            Code.ATTESTED_DIGEST_UNSUPPORTED,
            detail=f"digest algorithm {signer.digest_algorithm} is not SHA-256",
        )


def check_signature(view: SignedDataView, signer: SignerInfoView, cert: x509.Certificate) -> None:
    """RSA PKCS#1 v1.5 / SHA-256 over the content, or over the signed attributes (RFC 5652 §5.4)."""
    check_signature_algorithm(signer)
    verify_signed_content(view, signer, signer_key(cert))


def check_signature_algorithm(signer: SignerInfoView) -> None:
    if signer.signature_algorithm not in _RSA_SIGNATURE_OIDS:
        raise JoinRejected(
            Code.ATTESTED_SIGNATURE_INVALID,
            detail=f"signature algorithm {signer.signature_algorithm} is not RSA",
        )


def signer_key(cert: x509.Certificate) -> rsa.RSAPublicKey:
    """The signer certificate's RSA key, refused when it does not load, is not RSA, or is
    too costly to verify with. A pure function of the certificate's bytes: the verifier
    remembers its answer per signer (:class:`_Signer`)."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise JoinRejected(
            Code.ATTESTED_SIGNATURE_INVALID, detail=f"signer key unusable: {exc}"
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise JoinRejected(Code.ATTESTED_SIGNATURE_INVALID, detail="signer key is not RSA")
    # Before the verify: a huge public exponent makes one verify cost a private-key
    # operation, and the signer's key is the requester's choice until the chain is built.
    refusal = key_refusal(cert)
    if refusal is not None:
        raise JoinRejected(Code.ATTESTED_SIGNER_INVALID, detail=f"signer key refused: {refusal}")
    return key


def verify_signed_content(
    view: SignedDataView, signer: SignerInfoView, key: rsa.RSAPublicKey
) -> None:
    """The RSA verify itself (per document, never remembered): over the content's digest,
    or over the signed attributes' once their messageDigest is the content's."""
    content_digest = hashlib.sha256(view.content).digest()
    attrs = signer.signed_attrs
    if attrs is None:
        signed_digest = content_digest
    else:
        if attrs.message_digest is None or not hmac.compare_digest(
            attrs.message_digest, content_digest
        ):
            raise JoinRejected(
                Code.ATTESTED_SIGNATURE_INVALID, detail="messageDigest does not match the content"
            )
        if attrs.content_type != view.content_type:
            raise JoinRejected(
                Code.ATTESTED_SIGNATURE_INVALID,
                detail="contentType attribute does not match the content type",
            )
        signed_digest = hashlib.sha256(attrs.der).digest()
    try:
        key.verify(signer.signature, signed_digest, _PKCS1V15, _PREHASHED_SHA256)
    except (InvalidSignature, ValueError) as exc:
        raise JoinRejected(
            Code.ATTESTED_SIGNATURE_INVALID, detail="RSA signature does not verify"
        ) from exc


def check_signer_name(cert: x509.Certificate, cloud: CloudProfile) -> str:
    """CN and at least one DNS SAN under the cloud's metadata domain; returns the CN."""
    try:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        sans = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound as exc:
        raise JoinRejected(Code.ATTESTED_SIGNER_INVALID, detail="signer has no SAN") from exc
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise JoinRejected(Code.ATTESTED_SIGNER_INVALID, detail=f"signer name: {exc}") from exc
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise JoinRejected(Code.ATTESTED_SIGNER_INVALID, detail="signer needs exactly one CN")
    cn = cns[0].value
    if not cloud.signer_name_ok(cn):
        raise JoinRejected(
            Code.ATTESTED_SIGNER_INVALID,
            detail=f"signer CN {cn!r} is not under {cloud.metadata_domain}",
        )
    if not any(cloud.signer_name_ok(san) for san in sans):
        raise JoinRejected(
            Code.ATTESTED_SIGNER_INVALID,
            detail=f"no signer SAN is under {cloud.metadata_domain}",
        )
    return cn.lower().rstrip(".")


def parse_azure_time(value: object) -> datetime:
    """``MM/DD/YY HH:MM:SS -0000`` → aware datetime. Anything else → CONTENT_INVALID."""
    if not isinstance(value, str):
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail=f"bad timestamp {value!r}")
    return _parse_azure_time(value)


# A pure function of the exact text: documents fetched in the same second (a storm's
# thousands of VMs) carry the same stamps. Bounded; a refusal raises and is not kept.
@functools.lru_cache(maxsize=256)
def _parse_azure_time(value: str) -> datetime:
    match = _AZURE_TIME.fullmatch(value)
    if match is None:
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail=f"bad timestamp {value!r}")
    mo, d, y, h, mi, s, sign, oh, om = match.groups()
    # strptime's %y pivot (69-99 → 19xx), without strptime's cost on every join.
    year = int(y) + (1900 if int(y) >= 69 else 2000)
    try:
        if oh == "00" and om == "00":  # Azure's "-0000": already UTC, nothing to convert
            return datetime(year, int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
        offset = timedelta(hours=int(oh), minutes=int(om)) * (-1 if sign == "-" else 1)
        return datetime(
            year, int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone(offset)
        ).astimezone(UTC)
    except ValueError as exc:
        raise JoinRejected(
            Code.ATTESTED_CONTENT_INVALID, detail=f"bad timestamp {value!r}"
        ) from exc


def _guid(value: object, name: str) -> str:
    # The protocol's one GUID rule (fullmatch): re.match with "$" let "<vmId>\n" through.
    if not is_guid(value):
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail=f"{name} is not a GUID")
    return value


def parse_content(content: bytes, *, require_subscription: bool = True) -> AttestedContent:
    """The signed JSON. Not JSON → ``ATTESTED_MALFORMED`` (400); JSON without the fields →
    ``ATTESTED_CONTENT_INVALID`` (403)."""
    try:
        doc: Any = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(Code.ATTESTED_MALFORMED, detail=f"content is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail="content is not a JSON object")
    nonce = doc.get("nonce")
    if not isinstance(nonce, str):
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail="nonce missing")
    vm_id = _guid(doc.get("vmId"), "vmId")
    sub_raw = doc.get("subscriptionId")
    subscription_id: str | None
    if sub_raw is None and not require_subscription:
        subscription_id = None
    else:
        subscription_id = _guid(sub_raw, "subscriptionId")
    sku = doc.get("sku")
    if sku is not None and not isinstance(sku, str):
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail="sku is not a string")
    stamp = doc.get("timeStamp")
    if not isinstance(stamp, dict):
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail="timeStamp missing")
    created = parse_azure_time(stamp.get("createdOn"))
    expires = parse_azure_time(stamp.get("expiresOn"))
    if expires < created:
        raise JoinRejected(Code.ATTESTED_CONTENT_INVALID, detail="expiresOn before createdOn")
    return AttestedContent(
        nonce=nonce,
        vm_id=vm_id,
        subscription_id=subscription_id,
        sku=sku,
        created_on=created,
        expires_on=expires,
    )


def check_window(content: AttestedContent, now: datetime, skew: float) -> None:
    slack = timedelta(seconds=skew)
    if not content.created_on - slack <= now <= content.expires_on + slack:
        raise JoinRejected(
            Code.ATTESTED_EXPIRED,
            detail=f"now {now.isoformat()} outside {content.created_on.isoformat()}"
            f"..{content.expires_on.isoformat()}",
        )


def check_nonce(content: AttestedContent, expected: str) -> None:
    if not hmac.compare_digest(content.nonce.encode("utf-8"), expected.encode("utf-8")):
        raise JoinRejected(Code.NONCE_MISMATCH, detail="document nonce is not the challenge")


def check_content(
    content_bytes: bytes,
    *,
    now: datetime,
    skew: float,
    expected_nonce: str | None,
    require_subscription: bool,
) -> AttestedContent:
    """Parse, window, nonce (``expected_nonce=None`` skips the nonce: inspect only)."""
    content = parse_content(content_bytes, require_subscription=require_subscription)
    check_window(content, now, skew)
    if expected_nonce is not None:
        check_nonce(content, expected_nonce)
    return content


# ----------------------------------------------------------------------- the steps

# ``inspect`` rows are the shared step rows; the old name stays importable.
CheckResult = StepResult


@dataclass(frozen=True)
class Inspection:
    """Every step's outcome, for ``inspect``. ``content`` is shown even when unverified,
    ``document`` only when everything passed."""

    checks: tuple[StepResult, ...]
    document: AttestedDocument | None
    content: AttestedContent | None
    signer_cn: str | None
    chain: VerifiedChain | None

    @property
    def code(self) -> Code | None:
        """The verdict: the first failed step's code, None when nothing failed."""
        return next((c.code for c in self.checks if c.status == "failed"), None)


@dataclass
class _DocRun:
    """One document's evidence as the steps establish it (one per call, never shared)."""

    verifier: AttestedVerifier
    signature: str
    intermediates: Sequence[bytes]
    expected_nonce: str | None
    der: bytes = b""
    view: SignedDataView | None = None
    signer: SignerInfoView | None = None
    cert: x509.Certificate | None = None
    signer_checks: _Signer | None = None
    cn: str | None = None
    signer_fingerprint: bytes = b""
    chain: VerifiedChain | None = None
    content: AttestedContent | None = None

    # Accessors for steps that run only after the step that set the field (``needs``).
    def _view(self) -> SignedDataView:
        assert self.view is not None
        return self.view

    def _signed_by(self) -> tuple[SignerInfoView, x509.Certificate]:
        assert self.signer is not None and self.cert is not None
        return self.signer, self.cert

    def _content(self) -> AttestedContent:
        assert self.content is not None
        return self.content

    def document(self) -> AttestedDocument:
        assert self.cn is not None and self.chain is not None
        return _document(self._content(), self.cn, self.signer_fingerprint, self.chain)


async def _step_base64(run: _DocRun) -> str:
    run.der = decode_signature(run.signature)
    return f"{len(run.der)} bytes"


async def _step_cms(run: _DocRun) -> Detail:
    view = run.view = read_signed_data(run.der)
    return lambda: (
        f"SignedData, {len(view.certificates)} certificate(s), "
        f"{len(view.signer_infos)} signer(s), content {len(view.content)} bytes"
    )


async def _step_signer(run: _DocRun) -> Detail:
    view = run._view()
    run.signer = check_single_signer(view)
    cert = run.cert = find_signer_certificate(view, run.signer)
    return lambda: f"{_subject(cert)} (serial {cert.serial_number:x})"


def _subject(cert: x509.Certificate) -> str:
    # cryptography parses a subject lazily: a name it cannot parse fails only here, and a
    # report line must not turn a readable document into a crash.
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "(unparseable subject)"


async def _step_digest(run: _DocRun) -> str:
    signer, _ = run._signed_by()
    check_digest_algorithm(signer)
    return f"{signer.digest_algorithm} means SHA-256"


async def _step_signature(run: _DocRun) -> str:
    # check_signature, with the signer's key checks remembered per certificate.
    signer, cert = run._signed_by()
    check_signature_algorithm(signer)
    checks = run.signer_checks = run.verifier.signer_checks(cert)
    verify_signed_content(run._view(), signer, checks.key())
    attrs = "signed attributes" if signer.signed_attrs else "content (no signed attributes)"
    return f"RSA PKCS#1 v1.5 over {attrs}"


async def _step_signer_name(run: _DocRun) -> str:
    checks = run.signer_checks
    assert checks is not None
    run.cn, run.signer_fingerprint = checks.name(), checks.fingerprint
    return f"CN {run.cn} under {run.verifier.cloud.metadata_domain}"


async def _step_chain(run: _DocRun) -> Detail:
    _, cert = run._signed_by()
    assert run.cn is not None
    chain = run.chain = await run.verifier.chain_for(cert, run.cn, run.intermediates)
    return lambda: " > ".join(chain.subjects)


async def _step_content(run: _DocRun) -> Detail:
    content = run.content = parse_content(
        run._view().content, require_subscription=run.verifier.require_subscription
    )
    return lambda: f"vmId {content.vm_id}, subscriptionId {content.subscription_id}"


async def _step_window(run: _DocRun) -> Detail:
    now = run.verifier.clock.now()
    skew = run.verifier.skew
    check_window(run._content(), now, skew)
    return lambda: f"{now.isoformat()} within createdOn..expiresOn (±{skew:g}s)"


async def _step_nonce(run: _DocRun) -> str:
    content = run._content()
    if run.expected_nonce is None:
        raise Skip(f"no expected nonce given (document has {content.nonce!r})")
    check_nonce(content, run.expected_nonce)
    return "matches"


_C = Code
# The document's checks, cheap first (DESIGN §3 step 4). ``verify`` runs them fail-fast,
# ``inspect`` records them all: the crypto steps stop at the first failure (each needs the
# one before), the content steps need only the envelope, so an operator sees the
# vmId/nonce/window of a document whose signature is bad.
DOCUMENT_STEPS: StepTable[_DocRun] = (
    Step("base64", _step_base64, codes=frozenset({_C.ATTESTED_MALFORMED})),
    Step("cms", _step_cms, ("base64",), frozenset({_C.ATTESTED_MALFORMED})),
    Step("signer", _step_signer, ("cms",), frozenset({_C.ATTESTED_SIGNER_INVALID})),
    Step("digest", _step_digest, ("signer",), frozenset({_C.ATTESTED_DIGEST_UNSUPPORTED})),
    Step(
        "signature",
        _step_signature,
        ("digest",),
        # A signer key refused before the verify (its exponent or size) is a signer fault.
        frozenset({_C.ATTESTED_SIGNATURE_INVALID, _C.ATTESTED_SIGNER_INVALID}),
    ),
    Step("signer_name", _step_signer_name, ("signature",), frozenset({_C.ATTESTED_SIGNER_INVALID})),
    Step(
        "chain",
        _step_chain,
        ("signer_name",),
        # AIA (when on) may fail to fetch, and the build pool may be full: both are ours
        # to retry (503), not the VM's fault.
        frozenset({_C.ATTESTED_CHAIN_UNTRUSTED, _C.DEPENDENCY_UNAVAILABLE, _C.OVERLOADED}),
    ),
    Step(
        "content",
        _step_content,
        ("cms",),
        frozenset({_C.ATTESTED_MALFORMED, _C.ATTESTED_CONTENT_INVALID}),
    ),
    Step("window", _step_window, ("content",), frozenset({_C.ATTESTED_EXPIRED})),
    Step("nonce", _step_nonce, ("content",), frozenset({_C.NONCE_MISMATCH})),
)


# --------------------------------------------------------------------------- shell


class AttestedVerifier:
    """Parameters:

    * cloud — sets the signer's metadata domain.
    * trust — pinned roots and known intermediates (never the system store).
    * aia — fetches a missing intermediate from the leaf's caIssuers URL (None: offline);
      at most one fetch per request, and only when no known certificate is the leaf's
      issuer.
    * chain_cache — verified chains by signer fingerprint, kept until the chain expires,
      so a steady stream of joins costs one RSA verify each, not a chain build.
    * known_issuer_names — subject CNs accepted from request intermediates besides the
      trust store's and the cloud's documented Azure issuing CAs (the emulator's CA).
    * executor — where path building runs (off the event loop); None: a pool of two
      threads this verifier owns and :meth:`close` shuts down.
    * clock — time for the chain's validity and the document's window.
    * skew — seconds of slack on createdOn/expiresOn.
    * require_subscription — reject documents without subscriptionId (old api-versions).
    """

    def __init__(
        self,
        *,
        cloud: CloudProfile,
        trust: TrustStore,
        aia: AiaFetcher | None,
        chain_cache: MemoryCache[bytes, VerifiedChain] | None,
        clock: Clock,
        skew: float = 60.0,
        require_subscription: bool = True,
        known_issuer_names: Collection[str] = (),
        executor: Executor | None = None,
    ) -> None:
        self._cloud = cloud
        self._trust = trust
        self._aia = aia
        self._chain_cache = chain_cache
        self._clock = clock
        self._skew = skew
        self._require_subscription = require_subscription
        # Per signer certificate, by fingerprint (Azure signs with a few leaves a year):
        # its checked key and name, so a steady stream of joins does not redo them.
        self._signers: dict[bytes, _Signer] = {}
        # Request intermediates reach the path builder only under these subject names:
        # a thousand lookalike CAs named anything else cost a parse each, no search.
        self._known_names = (
            AZURE_ISSUING_CA_NAMES.get(cloud.name, frozenset())
            | trust.subject_names()
            | frozenset(known_issuer_names)
        )
        self._trusted_subjects = frozenset(c.subject for c in (*trust.roots, *trust.intermediates))
        self._owns_executor = executor is None
        self._executor: Executor = (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="chain-build")
            if executor is None
            else executor
        )
        self._pending_builds = 0
        self._failed: MemoryCache[bytes, str] = MemoryCache(
            "failed_chains", max_entries=_FAILED_CHAIN_ENTRIES, clock=clock
        )
        # Work counters, for tests and the benchmark (they count work, never time).
        self.chain_builds = 0  # chains built (not served from either cache)
        self.path_builder_calls = 0  # verify_chain calls (each ≤ the library's budget)
        self.untrusted_candidates = 0  # request/AIA certificates handed to the path builder
        self.aia_fetches = 0  # AIA fetches started by this verifier
        self.failed_chain_hits = 0  # requests refused from the failed-chain cache

    def close(self) -> None:
        """Shut down the pool this verifier started (an injected executor is the caller's)."""
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"<AttestedVerifier cloud={self._cloud.name} builds={self.chain_builds} "
            f"pending={self._pending_builds} failed_cached={len(self._failed)}>"
        )

    @property
    def cloud(self) -> CloudProfile:
        return self._cloud

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def skew(self) -> float:
        return self._skew

    @property
    def require_subscription(self) -> bool:
        return self._require_subscription

    def signer_checks(self, cert: x509.Certificate) -> _Signer:
        """The remembered checks of this signer certificate, by its fingerprint (SHA-256 of
        its exact bytes): at most :data:`_SIGNERS_MAX` certificates, oldest out first."""
        digest = fingerprint(cert)
        known = self._signers.get(digest)
        if known is None:
            known = _Signer(cert, digest, self._cloud)
            if len(self._signers) >= _SIGNERS_MAX:
                del self._signers[next(iter(self._signers))]
            self._signers[digest] = known
        return known

    async def verify(
        self,
        signature_b64: str,
        *,
        intermediates: Sequence[bytes] = (),
        expected_nonce: str,
    ) -> AttestedDocument:
        """Every check of :data:`DOCUMENT_STEPS`, in order; the first failure raises."""
        run = _DocRun(self, signature_b64, intermediates, expected_nonce)
        await run_fail_fast(DOCUMENT_STEPS, run)
        return run.document()

    async def inspect(
        self,
        signature_b64: str,
        *,
        intermediates: Sequence[bytes] = (),
        expected_nonce: str | None,
    ) -> Inspection:
        """The same steps as :meth:`verify`, each recorded instead of raised."""
        run = _DocRun(self, signature_b64, intermediates, expected_nonce)
        checks = await run_recording(DOCUMENT_STEPS, run)
        passed = not any(c.status == "failed" for c in checks)
        return Inspection(
            checks=checks,
            document=run.document() if passed else None,
            content=run.content,
            signer_cn=run.cn,
            chain=run.chain,
        )

    async def chain_for(
        self, leaf: x509.Certificate, dns_name: str, request_intermediates: Sequence[bytes] = ()
    ) -> VerifiedChain:
        """The verified chain for this signer: from the cache, refused from the failed-chain
        cache, or built now (off the event loop)."""
        usable = self._usable_intermediates(request_intermediates)
        candidates = list(usable.values())
        failed_key = _failed_key(leaf, dns_name, usable)
        failure = self._failed.get(failed_key)
        if failure is not None:
            self.failed_chain_hits += 1
            raise JoinRejected(Code.ATTESTED_CHAIN_UNTRUSTED, detail=f"(cached) {failure}")

        async def build() -> VerifiedChain:
            try:
                return await self._build(leaf, dns_name, candidates)
            except JoinRejected as exc:
                self._failed.set(failed_key, exc.detail, _FAILED_CHAIN_TTL)
                raise

        if self._chain_cache is None:
            return await build()

        async def load() -> tuple[VerifiedChain, float]:
            chain = await build()
            return chain, (chain.not_after - self._clock.now()).total_seconds()

        # Keyed by the leaf *and* the name: the cached fact is "this leaf chains for this name".
        return await self._chain_cache.get_or_load(fingerprint(leaf) + dns_name.encode(), load)

    def _usable_intermediates(self, ders: Sequence[bytes]) -> dict[bytes, x509.Certificate]:
        """Request-supplied intermediates that may reach the path builder: candidates only,
        never trust. Dropped: what does not parse, subjects that are no known issuing CA
        name, self-issued certificates (they can only make the search loop) and
        duplicates. Refused (403): a known-named one with a costly key, or more than
        :data:`MAX_REQUEST_INTERMEDIATES` left."""
        usable: dict[bytes, x509.Certificate] = {}
        for der in ders:
            facts = _request_certificate(der)
            if facts.cert is None:
                # It could only have helped the requester: dropping it is safe.
                logger.info("dropping an unreadable request intermediate: %s", facts.unreadable)
                continue
            name = facts.name
            if name is None or name not in self._known_names:
                logger.info("dropping a request intermediate named %r: not an Azure CA", name)
                continue
            refusal, digest = facts.checks()
            if refusal is not None:
                raise JoinRejected(
                    Code.ATTESTED_CHAIN_UNTRUSTED,
                    detail=f"request intermediate {name!r} refused: {refusal}",
                )
            if facts.self_issued:
                continue
            usable.setdefault(digest, facts.cert)
        if len(usable) > MAX_REQUEST_INTERMEDIATES:
            raise JoinRejected(
                Code.ATTESTED_CHAIN_UNTRUSTED,
                detail=f"{len(usable)} usable request intermediates "
                f"(at most {MAX_REQUEST_INTERMEDIATES})",
            )
        return usable  # by fingerprint

    async def _build(
        self, leaf: x509.Certificate, dns_name: str, untrusted: list[x509.Certificate]
    ) -> VerifiedChain:
        self.chain_builds += 1
        at = self._clock.now()
        logger.debug("building chain for signer %s at %s", dns_name, at.isoformat())
        refusal = key_refusal(leaf)
        if refusal is not None:  # check_signature refused it already; never build for it
            raise JoinRejected(Code.ATTESTED_SIGNER_INVALID, detail=f"signer key: {refusal}")
        try:
            return await self._verify_off_loop(leaf, dns_name, untrusted, at)
        except JoinRejected:
            if self._aia is None or self._issuer_known(leaf, untrusted):
                raise
        # Last resort, once per request: the issuer published at the leaf's first allowed
        # caIssuers URL (Azure leaves list the same file at two hosts). A certificate
        # listing hundreds of URLs still costs one fetch.
        url = next((u for u in ca_issuers_urls(leaf) if self._aia.allowed(u)), None)
        if url is None:
            raise JoinRejected(
                Code.ATTESTED_CHAIN_UNTRUSTED,
                detail="signer chain does not verify and no allowed caIssuers URL",
            )
        self.aia_fetches += 1
        fetched = [c for c in await self._aia.fetch(url) if _may_issue(c, leaf)]
        if not fetched:
            raise JoinRejected(
                Code.ATTESTED_CHAIN_UNTRUSTED,
                detail=f"signer chain does not verify; {url} has no usable issuer",
            )
        return await self._verify_off_loop(
            leaf, dns_name, [*untrusted, *fetched[:MAX_REQUEST_INTERMEDIATES]], at
        )

    def _issuer_known(self, leaf: x509.Certificate, untrusted: list[x509.Certificate]) -> bool:
        """Whether a certificate we already hold carries the leaf's issuer name: then AIA
        would only fetch what the path builder already tried."""
        try:
            issuer = leaf.issuer
        except ValueError:  # an issuer Name that does not decode: nothing could chain it
            return True
        return issuer in self._trusted_subjects or any(c.subject == issuer for c in untrusted)

    async def _verify_off_loop(
        self,
        leaf: x509.Certificate,
        dns_name: str,
        untrusted: list[x509.Certificate],
        at: datetime,
    ) -> VerifiedChain:
        """One path-builder call, in the pool: a search can take milliseconds (up to the
        library's signature budget), which the event loop must not spend."""
        if self._pending_builds >= _MAX_PENDING_BUILDS:
            raise Overloaded(
                Code.OVERLOADED,
                retry_after=1.0,
                detail=f"{self._pending_builds} chain builds pending",
            )
        self.path_builder_calls += 1
        self.untrusted_candidates += len(untrusted)
        candidates = [*untrusted, *self._trust.intermediates]
        call = functools.partial(
            verify_chain, self._trust, leaf, dns_name=dns_name, intermediates=candidates, at=at
        )
        self._pending_builds += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self._pending_builds -= 1


class _Signer:
    """One signer certificate's checks that follow from its exact bytes alone (and, for
    the name, the verifier's cloud): its RSA key once :func:`signer_key` accepted it, its
    CN once :func:`check_signer_name` did. Only passes are remembered: a refusal is worked
    out and raised again on each document, exactly as without the record. Nothing about
    trust or time is here (the chain has its own cache, bounded by its validity), and
    the signature is verified per document with the remembered key."""

    __slots__ = ("_cloud", "_cn", "_key", "cert", "fingerprint")

    def __init__(self, cert: x509.Certificate, digest: bytes, cloud: CloudProfile) -> None:
        self.cert = cert
        self.fingerprint = digest
        self._cloud = cloud
        self._key: rsa.RSAPublicKey | None = None
        self._cn: str | None = None

    def key(self) -> rsa.RSAPublicKey:
        """:func:`signer_key` of the certificate (raises as it does)."""
        if self._key is None:
            self._key = signer_key(self.cert)
        return self._key

    def name(self) -> str:
        """:func:`check_signer_name` of the certificate (raises as it does)."""
        if self._cn is None:
            self._cn = check_signer_name(self.cert, self._cloud)
        return self._cn


def _may_issue(cert: x509.Certificate, leaf: x509.Certificate) -> bool:
    """An AIA-fetched certificate is a candidate only if it names the leaf's issuer, is
    not self-issued and has a cheap key (a PKCS#7 bundle may carry anything)."""
    try:
        return (
            cert.subject == leaf.issuer
            and cert.subject != cert.issuer
            and key_refusal(cert) is None
        )
    except ValueError:
        return False


class _RequestCertificate:
    """What ``_usable_intermediates`` reads of one request intermediate: all of it follows
    from its bytes. The key check and the fingerprint are worked out when first asked
    (only for a certificate under a known CA name)."""

    __slots__ = ("_checks", "cert", "name", "self_issued", "unreadable")

    def __init__(self, der: bytes) -> None:
        self._checks: tuple[str | None, bytes] | None = None
        self.cert: x509.Certificate | None = None  # None: does not load (``unreadable``)
        self.unreadable = ""
        self.name: str | None = None
        self.self_issued = False
        try:
            cert = load_der_certificate(der)
            self.name = common_name(cert.subject)
            self.self_issued = cert.subject == cert.issuer
        except CertificateUnreadable as exc:
            self.unreadable = str(exc)
        else:
            self.cert = cert

    def checks(self) -> tuple[str | None, bytes]:
        """(``key_refusal``, ``fingerprint``) of the certificate (it loaded)."""
        if self._checks is None:
            assert self.cert is not None
            self._checks = (key_refusal(self.cert), fingerprint(self.cert))
        return self._checks


# Every VM of a fleet sends the same intermediate with each join: what its bytes say is
# worked out once (loading, names, key check, fingerprint: more than the document's RSA
# verify) and kept by the exact bytes, at most this many (oldest out first; a miss only
# costs the work again).
_REQUEST_CERTS_MAX = 64
_request_certs: dict[bytes, _RequestCertificate] = {}


def _request_certificate(der: bytes) -> _RequestCertificate:
    facts = _request_certs.get(der)
    if facts is None:
        facts = _RequestCertificate(der)
        if len(_request_certs) >= _REQUEST_CERTS_MAX:
            del _request_certs[next(iter(_request_certs))]
        _request_certs[bytes(der)] = facts
    return facts


def _failed_key(leaf: x509.Certificate, dns_name: str, untrusted: Iterable[bytes]) -> bytes:
    """The exact leaf, its name and the request intermediates used (their fingerprints): a
    different set of intermediates is a different question."""
    digest = hashlib.sha256()
    for der in sorted(untrusted):
        digest.update(der)
    return fingerprint(leaf) + digest.digest() + dns_name.encode()


def _document(
    content: AttestedContent, cn: str, signer_fingerprint: bytes, chain: VerifiedChain
) -> AttestedDocument:
    return AttestedDocument(
        nonce=content.nonce,
        vm_id=content.vm_id,
        subscription_id=content.subscription_id,
        sku=content.sku,
        created_on=content.created_on,
        expires_on=content.expires_on,
        signer_cn=cn,
        signer_fingerprint=signer_fingerprint,
        chain_subjects=chain.subjects,
    )
