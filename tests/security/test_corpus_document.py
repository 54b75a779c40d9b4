"""Hostile attested documents: malformed CMS, forged signers and chains, wrong digests,
bad signed attributes, bad content — each refused with its code over HTTPS, and the
gateway keeps serving.

Documents that must pass every check but one are forged with the emulator's *trusted*
PKI (its intermediate CA and signing leaf), so the failing check is the one named.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asn1crypto import cms as a_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.security.harness import Body, Builder, Harness
from tests.support.cms_forge import (
    AZURE_CA_NAME,
    Issued,
    forge,
    huge_exponent_key,
    issue_ca,
    issue_leaf,
    lookalike_cas,
    make_pki,
    with_x509_version,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOW = datetime.now(UTC)

Forger = Callable[[Harness, str], str]  # (harness, challenge) -> signature field


def doc(forger: Forger, *, intermediates: list[bytes] | None = None) -> Builder:
    async def build(h: Harness) -> Body:
        challenge = await h.challenge()
        body = h.body(challenge, signature=forger(h, challenge))
        if intermediates is not None:
            body["intermediates"] = [base64.b64encode(d).decode() for d in intermediates]
        return body

    return build


def by_leaf(**forge_kwargs: Any) -> Forger:
    """Signed by the emulator's trusted leaf, with one forge knob turned."""

    def make(h: Harness, challenge: str) -> str:
        return forge(h.leaf, h.content(challenge), **forge_kwargs)

    return make


def by_issued(leaf_kwargs: dict[str, Any], **forge_kwargs: Any) -> Forger:
    """Signed by a new leaf that the emulator's trusted intermediate issued."""

    def make(h: Harness, challenge: str) -> str:
        leaf = issue_leaf(h.intermediate, **leaf_kwargs)
        return forge(leaf, h.content(challenge), **forge_kwargs)

    return make


def with_content(**content_kwargs: Any) -> Forger:
    def make(h: Harness, challenge: str) -> str:
        nonce = content_kwargs.pop("nonce", challenge)
        return forge(h.leaf, h.content(nonce, **content_kwargs))

    return make


def raw_content(content: bytes) -> Forger:
    def make(h: Harness, challenge: str) -> str:
        return forge(h.leaf, content)

    return make


def der_edit(edit: Callable[[bytes], bytes]) -> Forger:
    """The emulator's own document for this nonce, its DER edited."""

    def make(h: Harness, challenge: str) -> str:
        der = h.emulator.attested_der_for(h.vm, nonce=challenge)
        return base64.b64encode(edit(der)).decode()

    return make


def text_edit(edit: Callable[[str], str]) -> Forger:
    def make(h: Harness, challenge: str) -> str:
        return edit(h.emulator.attested_document_for(h.vm, nonce=challenge)["signature"])

    return make


def literal(sig: str) -> Forger:
    return lambda h, c: sig


def spire_forgery(h: Harness, challenge: str) -> str:
    """SPIRE 1.15.1's bug: the envelope's first certificate is the real Azure leaf, the
    SignerInfo names (and the signature is by) an attacker's self-signed lookalike."""
    attacker = issue_leaf(None)
    return forge(attacker, h.content(challenge), certificates=[h.leaf, attacker])


def spire_forgery_naming_azure_leaf(h: Harness, challenge: str) -> str:
    """The SignerInfo names the real leaf (issuer+serial) but the attacker's key signed."""
    attacker = issue_leaf(None)
    return forge(
        h.leaf, h.content(challenge), certificates=[h.leaf, attacker], sign_with=attacker.key
    )


def signer_missing(h: Harness, challenge: str) -> str:
    """The envelope carries only some other certificate; the named signer is absent."""
    other = issue_leaf(h.intermediate)
    return forge(h.leaf, h.content(challenge), certificates=[other])


def signer_twice(h: Harness, challenge: str) -> str:
    return forge(h.leaf, h.content(challenge), certificates=[h.leaf, h.leaf])


def signer_lookalike(h: Harness, challenge: str) -> str:
    """An attacker certificate with the real leaf's issuer and serial sits next to it."""
    real = h.leaf.cert
    key = issue_leaf(None).key
    twin = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(real.serial_number)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    return forge(h.leaf, h.content(challenge), certificates=[Issued(key, twin), h.leaf])


def content_tampered(h: Harness, challenge: str) -> str:
    """One character of the signed vmId changed in the DER after signing."""
    der = base64.b64decode(forge(h.leaf, h.content(challenge)))
    vm_id = h.vm.vm_id.encode()
    changed = vm_id[:-1] + (b"0" if vm_id[-1:] != b"0" else b"1")
    assert der.count(vm_id) == 1
    return base64.b64encode(der.replace(vm_id, changed)).decode()


def two_signers(h: Harness, challenge: str) -> str:
    return forge(h.leaf, h.content(challenge), extra_signers=[issue_leaf(h.intermediate)])


def two_signers_same_leaf(h: Harness, challenge: str) -> str:
    return forge(h.leaf, h.content(challenge), extra_signers=[h.leaf])


def no_signers(h: Harness, challenge: str) -> str:
    der = base64.b64decode(forge(h.leaf, h.content(challenge)))
    ci = a_cms.ContentInfo.load(der)
    sd = ci["content"]
    rebuilt = a_cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": sd["digest_algorithms"],
            "encap_content_info": sd["encap_content_info"],
            "certificates": sd["certificates"],
            "signer_infos": [],
        }
    )
    out = a_cms.ContentInfo({"content_type": "signed_data", "content": rebuilt}).dump()
    return base64.b64encode(out).decode()


def self_signed(h: Harness, challenge: str) -> str:
    leaf = issue_leaf(None)
    return forge(leaf, h.content(challenge))


def foreign_pki(h: Harness, challenge: str) -> str:
    pki = make_pki()
    return forge(pki.leaf, h.content(challenge), certificates=[pki.leaf, pki.intermediate])


def emulator_leaf_key_other_cert(h: Harness, challenge: str) -> str:
    """A leaf whose issuer name claims the trusted intermediate, but which the
    attacker signed with a key of their own: the name alone must not make a chain."""
    fake_issuer = Issued(issue_leaf(None).key, h.intermediate.cert)
    leaf = issue_leaf(fake_issuer)
    return forge(leaf, h.content(challenge))


def non_rsa_signer(h: Harness, challenge: str) -> str:
    """The SignerInfo claims ECDSA: RSA is the only signer key Azure uses."""
    return forge(h.leaf, h.content(challenge), signature_algorithm="sha256_ecdsa")


_LONG_AGO = NOW - timedelta(days=800)
_FUTURE = NOW + timedelta(days=30)

CASES = [
    pytest.param(doc(by_leaf()), 200, None, id="a forged copy of the emulator's document joins"),
    pytest.param(
        doc(by_leaf(digest="sha256")), 200, None, id="the plain sha256 digest OID is accepted"
    ),
    pytest.param(
        doc(by_leaf(signed_attrs="correct")),
        200,
        None,
        id="correct signed attributes are verified and accepted",
    ),
    pytest.param(
        doc(by_issued({"cn": "eastus.metadata.azure.com", "sans": ("eastus.metadata.azure.com",)})),
        200,
        None,
        id="a regional subdomain signer of the trusted CA is accepted",
    ),
    # --- encoding ---------------------------------------------------------------------
    pytest.param(
        doc(der_edit(lambda d: d[: len(d) // 2])),
        400,
        "attested_malformed",
        id="a signature truncated to half",
    ),
    pytest.param(
        doc(der_edit(lambda d: d[:-1])),
        400,
        "attested_malformed",
        id="a signature missing its last byte",
    ),
    pytest.param(
        doc(der_edit(lambda d: d[:1])), 400, "attested_malformed", id="a one-byte signature"
    ),
    pytest.param(
        doc(der_edit(lambda d: d + b"\x00" * 16)),
        400,
        "attested_malformed",
        id="a signature with trailing bytes",
    ),
    pytest.param(
        doc(der_edit(lambda d: b"\x30\x84\xff\xff\xff\xff" + d[2:])),
        400,
        "attested_malformed",
        id="a DER length of four gigabytes",
    ),
    pytest.param(
        doc(der_edit(lambda d: bytes(range(256)) * 4)),
        400,
        "attested_malformed",
        id="base64 of bytes that are not DER",
    ),
    pytest.param(
        doc(der_edit(lambda d: a_cms.ContentInfo({"content_type": "data", "content": d}).dump())),
        400,
        "attested_malformed",
        id="a ContentInfo that is data, not SignedData",
    ),
    pytest.param(
        doc(text_edit(lambda s: s[:-3] + "!!=")),
        400,
        "attested_malformed",
        id="a signature with non-base64 characters",
    ),
    pytest.param(
        doc(text_edit(lambda s: s[:-1] if s.endswith("=") else s[:-2])),
        400,
        "attested_malformed",
        id="a signature with broken base64 padding",
    ),
    pytest.param(
        doc(text_edit(lambda s: s[:100] + "\n" + s[100:])),
        400,
        "attested_malformed",
        id="a signature with an embedded newline",
    ),
    pytest.param(doc(literal("")), 400, "invalid_request", id="an empty signature"),
    pytest.param(doc(literal("====")), 400, "attested_malformed", id="a signature of padding"),
    pytest.param(
        doc(literal("A" * 32769)), 400, "invalid_request", id="an oversize signature field"
    ),
    pytest.param(
        doc(literal(base64.b64encode(b"\x00" * 20000).decode())),
        400,
        "attested_malformed",
        id="twenty kilobytes of zeros",
    ),
    # --- signers ----------------------------------------------------------------------
    pytest.param(doc(two_signers), 403, "attested_signer_invalid", id="CMS with two signers"),
    pytest.param(
        doc(two_signers_same_leaf),
        403,
        "attested_signer_invalid",
        id="CMS with the same signer twice",
    ),
    pytest.param(doc(no_signers), 403, "attested_signer_invalid", id="CMS with no signer"),
    pytest.param(
        doc(spire_forgery),
        403,
        "attested_chain_untrusted",
        id="the Azure leaf first in the set while an attacker's certificate signed",
    ),
    pytest.param(
        doc(spire_forgery_naming_azure_leaf),
        403,
        "attested_signature_invalid",
        id="a SignerInfo naming the Azure leaf but signed by another key",
    ),
    pytest.param(
        doc(signer_missing),
        403,
        "attested_signer_invalid",
        id="the named signer is not in the certificate set",
    ),
    pytest.param(
        doc(signer_twice), 200, None, id="the signer certificate listed twice is unambiguous"
    ),
    pytest.param(
        doc(signer_lookalike),
        403,
        "attested_signer_invalid",
        id="two different certificates carry the signer's issuer and serial",
    ),
    pytest.param(
        doc(by_issued({"cn": "evil.example.com", "sans": ("evil.example.com",)})),
        403,
        "attested_signer_invalid",
        id="a trusted-CA signer with the wrong CN and SAN",
    ),
    pytest.param(
        doc(by_issued({"cn": "evil.example.com"})),
        403,
        "attested_signer_invalid",
        id="a trusted-CA signer with the wrong CN but right SANs",
    ),
    pytest.param(
        doc(by_issued({"sans": ("evil.example.com",)})),
        403,
        "attested_signer_invalid",
        id="a trusted-CA signer with the right CN but wrong SAN",
    ),
    pytest.param(
        doc(by_issued({"sans": ()})),
        403,
        "attested_signer_invalid",
        id="a trusted-CA signer without SANs",
    ),
    pytest.param(
        doc(
            by_issued(
                {
                    "cn": "metadata.azure.com.evil.com",
                    "sans": ("metadata.azure.com.evil.com",),
                }
            )
        ),
        403,
        "attested_signer_invalid",
        id="a signer named metadata.azure.com.evil.com",
    ),
    pytest.param(
        doc(by_issued({"cn": "evilmetadata.azure.com", "sans": ("evilmetadata.azure.com",)})),
        403,
        "attested_signer_invalid",
        id="a signer named evilmetadata.azure.com",
    ),
    pytest.param(
        doc(by_issued({"cn": "metadata.azure.us", "sans": ("metadata.azure.us",)})),
        403,
        "attested_signer_invalid",
        id="a sovereign-cloud signer in the public cloud",
    ),
    pytest.param(
        doc(by_issued({"cn": "*.azure.com", "sans": ("*.azure.com",)})),
        403,
        "attested_signer_invalid",
        id="a wildcard signer",
    ),
    # --- chains -----------------------------------------------------------------------
    pytest.param(
        doc(self_signed),
        403,
        "attested_chain_untrusted",
        id="a valid signature under a self-signed leaf",
    ),
    pytest.param(
        doc(foreign_pki),
        403,
        "attested_chain_untrusted",
        id="a valid signature under an untrusted root with its chain embedded",
    ),
    pytest.param(
        doc(foreign_pki, intermediates=[make_pki().intermediate.der]),
        403,
        "attested_chain_untrusted",
        id="request intermediates of another PKI do not help",
    ),
    pytest.param(
        doc(emulator_leaf_key_other_cert),
        403,
        "attested_chain_untrusted",
        id="a leaf naming the trusted intermediate but signed by another key",
    ),
    pytest.param(
        doc(by_issued({"not_before": _LONG_AGO, "days": 30})),
        403,
        "attested_chain_untrusted",
        id="an expired signer of the trusted CA",
    ),
    pytest.param(
        doc(by_issued({"not_before": _FUTURE, "days": 30})),
        403,
        "attested_chain_untrusted",
        id="a not-yet-valid signer of the trusted CA",
    ),
    # --- digests and signatures -------------------------------------------------------
    pytest.param(
        doc(by_leaf(digest="sha1")), 403, "attested_digest_unsupported", id="a SHA-1 digest OID"
    ),
    pytest.param(
        doc(by_leaf(digest="sha512")),
        403,
        "attested_digest_unsupported",
        id="a SHA-512 digest OID",
    ),
    pytest.param(
        doc(by_leaf(digest="md5")), 403, "attested_digest_unsupported", id="an MD5 digest OID"
    ),
    pytest.param(
        doc(by_leaf(signed_attrs="wrong_digest")),
        403,
        "attested_signature_invalid",
        id="signed attributes with a wrong messageDigest",
    ),
    pytest.param(
        doc(by_leaf(signed_attrs="wrong_content_type")),
        403,
        "attested_signature_invalid",
        id="signed attributes with a wrong contentType",
    ),
    pytest.param(
        doc(content_tampered),
        403,
        "attested_signature_invalid",
        id="content changed after signing",
    ),
    pytest.param(
        doc(by_leaf(tamper_signature=True)),
        403,
        "attested_signature_invalid",
        id="a signature with one bit flipped",
    ),
    pytest.param(
        doc(by_leaf(sign_with=issue_leaf(None).key)),
        403,
        "attested_signature_invalid",
        id="a trusted signer certificate but another key signed",
    ),
    pytest.param(
        doc(non_rsa_signer),
        403,
        "attested_signature_invalid",
        id="a SignerInfo claiming ECDSA",
    ),
    # --- content ----------------------------------------------------------------------
    pytest.param(
        doc(with_content(nonce="A" * 32)),
        403,
        "nonce_mismatch",
        id="a trusted document with another nonce",
    ),
    pytest.param(
        doc(with_content(drop=("nonce",))),
        403,
        "attested_content_invalid",
        id="a trusted document without a nonce",
    ),
    pytest.param(
        doc(with_content(overrides={"vmId": "not-a-guid"})),
        403,
        "attested_content_invalid",
        id="a vmId that is not a GUID",
    ),
    pytest.param(
        doc(with_content(overrides={"vmId": 42})),
        403,
        "attested_content_invalid",
        id="a vmId that is a number",
    ),
    pytest.param(
        doc(with_content(overrides={"subscriptionId": "../../etc"})),
        403,
        "attested_content_invalid",
        id="a subscriptionId with a path",
    ),
    pytest.param(
        doc(with_content(drop=("timeStamp",))),
        403,
        "attested_content_invalid",
        id="a document without timestamps",
    ),
    pytest.param(
        doc(with_content(overrides={"timeStamp": {"createdOn": "yesterday", "expiresOn": "x"}})),
        403,
        "attested_content_invalid",
        id="timestamps that do not parse",
    ),
    pytest.param(
        doc(with_content(created_on=NOW - timedelta(hours=7))),
        403,
        "attested_expired",
        id="a document past its six-hour window",
    ),
    pytest.param(
        doc(with_content(created_on=NOW + timedelta(hours=1))),
        403,
        "attested_expired",
        id="a document created in the future",
    ),
    pytest.param(
        doc(with_content(hours=-1)),
        403,
        "attested_content_invalid",
        id="a document that expires before it is created",
    ),
    pytest.param(
        doc(raw_content(b"not json at all")),
        400,
        "attested_malformed",
        id="signed content that is not JSON",
    ),
    pytest.param(
        doc(raw_content(b"[1,2,3]")),
        403,
        "attested_content_invalid",
        id="signed content that is a JSON array",
    ),
    pytest.param(
        doc(raw_content(b"\xff\xfe\x00")),
        400,
        "attested_malformed",
        id="signed content that is not UTF-8",
    ),
    pytest.param(
        doc(raw_content(b"[" * 5000 + b"]" * 5000)),
        400,
        "attested_malformed",
        id="signed content nested five thousand deep",
    ),
]


@pytest.mark.parametrize(("build", "status", "code"), CASES)
async def test_document_corpus(
    harness: Harness, build: Builder, status: int, code: str | None
) -> None:
    assert (await harness.join(await build(harness))) == (status, code)
    await harness.assert_alive()


async def test_another_vms_document_is_not_this_vms(harness: Harness) -> None:
    """A valid document of a neighbour VM with this VM's token: the binding refuses it."""
    challenge = await harness.challenge()
    sig = harness.emulator.attested_document_for(harness.neighbour, nonce=challenge)["signature"]
    assert await harness.join(harness.body(challenge, signature=sig)) == (
        403,
        "vm_binding_failed",
    )
    await harness.assert_alive()


# ------------------------------------------------------------ bounded cost (issue 8)
#
# Each case counts the work it caused in the gateway's verifier (path-builder calls and the
# untrusted candidates handed to it, AIA fetches) and at the emulator (AIA requests).

KNOWN_NAME = AZURE_CA_NAME


@dataclass(frozen=True)
class Work:
    path_builder_calls: int = 0
    untrusted_candidates: int = 0
    aia_fetches: int = 0
    aia_requests_at_emulator: int = 0

    @classmethod
    def now(cls, h: Harness) -> Work:
        v = h.stack.gateway.deps.attested
        return cls(
            v.path_builder_calls,
            v.untrusted_candidates,
            v.aia_fetches,
            h.emulator.counters.get("aia", 0),
        )

    def __sub__(self, other: Work) -> Work:
        return Work(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


_HUGE_KEY: list[rsa.RSAPrivateKey] = []


def _huge_key() -> rsa.RSAPrivateKey:
    """One RSA-3072 key with a ~3,070-bit public exponent per module (it takes a moment)."""
    if not _HUGE_KEY:
        _HUGE_KEY.append(huge_exponent_key())
    return _HUGE_KEY[0]


def reproducer_cas(name: str, *, huge: bool, count: int = 8) -> list[Issued]:
    return lookalike_cas(name, _huge_key() if huge else issue_leaf(None).key, count)


def reproducer(name: str, *, huge: bool) -> Builder:
    async def build(h: Harness) -> Body:
        cas = reproducer_cas(name, huge=huge)
        leaf = issue_leaf(cas[0])
        challenge = await h.challenge()
        body = h.body(challenge, signature=forge(leaf, h.content(challenge)))
        body["intermediates"] = [base64.b64encode(c.der).decode() for c in cas]
        return body

    return build


def many_ca_issuers(*, trusted_issuer: bool) -> Builder:
    """A leaf listing 300 unique caIssuers URLs under an allowed prefix (the emulator's)."""

    async def build(h: Harness) -> Body:
        # Short unique names: 300 of them must fit the attested_data size limit.
        tag = secrets.token_hex(3)
        urls = [f"{h.emulator.aia_prefix}{tag}{i:x}" for i in range(300)]
        issuer = h.intermediate if trusted_issuer else issue_ca("Forged Issuing CA 77")
        leaf = issue_leaf(issuer, aia_urls=urls)
        challenge = await h.challenge()
        body = h.body(challenge, signature=forge(leaf, h.content(challenge)))
        if not trusted_issuer:
            body["intermediates"] = []
        return body

    return build


def huge_exponent_signer(h: Harness, challenge: str) -> str:
    leaf = issue_leaf(h.intermediate, key=_huge_key())
    return forge(leaf, h.content(challenge))


def v5_request_intermediate() -> Builder:
    async def build(h: Harness) -> Body:
        # A valid join first, so the emulator leaf's chain is cached whatever ran before.
        assert await h.join(h.body(await h.challenge())) == (200, None)
        body = h.body(await h.challenge())
        valid = base64.b64decode(body["intermediates"][0])
        body["intermediates"].append(base64.b64encode(with_x509_version(valid, 4)).decode())
        return body

    return build


COST_CASES = [
    pytest.param(
        reproducer(KNOWN_NAME, huge=True),
        403,
        "attested_chain_untrusted",
        Work(),
        id="issue 8's reproducer under an Azure name: refused on the key, no path search",
    ),
    pytest.param(
        reproducer("Forged Issuing CA 13", huge=True),
        403,
        "attested_chain_untrusted",
        Work(path_builder_calls=1),
        id="issue 8's reproducer under another name: its CAs never reach the path builder",
    ),
    pytest.param(
        reproducer(KNOWN_NAME, huge=False),
        403,
        "attested_chain_untrusted",
        Work(path_builder_calls=1),
        id="self-issued lookalikes with cheap keys are dropped",
    ),
    pytest.param(
        doc(huge_exponent_signer),
        403,
        "attested_signer_invalid",
        Work(),
        id="a signer with a 3,070-bit public exponent is refused before its RSA verify",
    ),
    pytest.param(
        many_ca_issuers(trusted_issuer=False),
        403,
        "attested_chain_untrusted",
        Work(path_builder_calls=1, aia_fetches=1, aia_requests_at_emulator=1),
        id="a leaf with 300 caIssuers URLs costs one AIA fetch",
    ),
    pytest.param(
        many_ca_issuers(trusted_issuer=True),
        200,
        None,
        Work(path_builder_calls=1, untrusted_candidates=1),
        id="no AIA fetch at all when the request carries the leaf's issuer",
    ),
    pytest.param(
        v5_request_intermediate(),
        200,
        None,
        Work(path_builder_calls=0),
        id="a request intermediate claiming X.509 v5 is dropped (it was a 500)",
    ),
    pytest.param(
        doc(der_edit(lambda d: with_x509_version(d, 4))),
        400,
        "attested_malformed",
        Work(),
        id="an embedded signer certificate claiming X.509 v5",
    ),
]


@pytest.mark.parametrize(("build", "status", "code", "work"), COST_CASES)
async def test_bounded_cost_corpus(
    harness: Harness, build: Builder, status: int, code: str | None, work: Work
) -> None:
    body = await build(harness)
    before = Work.now(harness)
    assert (await harness.join(body)) == (status, code)
    assert Work.now(harness) - before == work
    await harness.assert_alive()


async def test_a_repeated_hostile_chain_is_refused_from_memory(harness: Harness) -> None:
    """The same forged leaf and intermediates again: no second path search."""
    cas = reproducer_cas("Forged Issuing CA 21", huge=False, count=1)
    other_root = issue_ca("Microsoft RSA Root Certificate Authority 2017")
    inter = issue_ca(KNOWN_NAME, issuer=other_root)
    leaf = issue_leaf(inter)
    verifier = harness.stack.gateway.deps.attested
    before = Work.now(harness)
    hits = verifier.failed_chain_hits
    for _ in range(3):
        challenge = await harness.challenge()
        body = harness.body(challenge, signature=forge(leaf, harness.content(challenge)))
        body["intermediates"] = [base64.b64encode(c.der).decode() for c in (*cas, inter)]
        assert await harness.join(body) == (403, "attested_chain_untrusted")
    assert Work.now(harness) - before == Work(path_builder_calls=1, untrusted_candidates=1)
    assert verifier.failed_chain_hits - hits == 2
    await harness.assert_alive()
