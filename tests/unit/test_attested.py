"""Every rule of the attested-document verifier, one passing and one failing case each.

Documents are forged with real crypto under a generated root → intermediate → leaf
chain (tests/support/cms_forge.py), byte-shaped like Azure's by default.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.azure.attested import (
    AttestedDocument,
    AttestedVerifier,
    decode_signature,
    parse_azure_time,
)
from gateway.azure.certs import TrustStore, VerifiedChain
from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, Code, GatewayError, JoinRejected
from tests.support.cms_forge import (
    INTERMEDIATE_CN,
    T0,
    Pki,
    azure_content,
    forge,
    issue_leaf,
    make_pki,
)

NONCE = "nonce-0123456789"
NOW = T0 + timedelta(hours=1)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@dataclass
class Scenario:
    signature: str
    intermediates: tuple[bytes, ...] = ()
    nonce: str | None = NONCE
    now: datetime = NOW
    trust: str = "root+intermediate"
    cloud: str = "public"
    require_subscription: bool = True


def _verifier(
    pki: Pki,
    s: Scenario,
    cache: MemoryCache[bytes, VerifiedChain] | None = None,
    clock: FixedClock | None = None,
) -> AttestedVerifier:
    certs = [pki.root.cert] + ([pki.intermediate.cert] if s.trust == "root+intermediate" else [])
    return AttestedVerifier(
        cloud=CLOUDS[s.cloud],
        trust=TrustStore.from_certificates(certs),
        aia=None,
        chain_cache=cache,
        clock=clock or FixedClock(s.now),
        require_subscription=s.require_subscription,
        known_issuer_names=(INTERMEDIATE_CN,),
    )


async def _run(pki: Pki, s: Scenario) -> AttestedDocument:
    return await _verifier(pki, s).verify(
        s.signature, intermediates=s.intermediates, expected_nonce=s.nonce
    )


Build = Callable[[Pki], Scenario]

ACCEPTED: list[tuple[str, Build]] = [
    (
        "an Azure-shaped document from a trusted chain is accepted",
        lambda p: Scenario(forge(p.leaf)),
    ),
    (
        "the plain sha256 digest OID means SHA-256 too",
        lambda p: Scenario(forge(p.leaf, digest="sha256")),
    ),
    (
        "correct signed attributes are verified over the DER SET",
        lambda p: Scenario(forge(p.leaf, signed_attrs="correct")),
    ),
    (
        "the signer is found by issuer and serial even when a decoy certificate comes first",
        lambda p: Scenario(forge(p.leaf, certificates=[issue_leaf(p.intermediate), p.leaf])),
    ),
    (
        "a document without subscriptionId passes when the subscription is not required",
        lambda p: Scenario(
            forge(p.leaf, azure_content(subscription_id=None)), require_subscription=False
        ),
    ),
    (
        "an intermediate supplied in the request completes the chain",
        lambda p: Scenario(forge(p.leaf), intermediates=(p.intermediate.der,), trust="root"),
    ),
    (
        "a clock up to the skew before createdOn is accepted",
        lambda p: Scenario(forge(p.leaf), now=T0 - timedelta(seconds=59)),
    ),
    (
        "a clock up to the skew after expiresOn is accepted",
        lambda p: Scenario(forge(p.leaf), now=T0 + timedelta(hours=6, seconds=59)),
    ),
    (
        "a signer named by a regional subdomain is accepted",
        lambda p: Scenario(
            forge(
                issue_leaf(
                    p.intermediate,
                    cn="eastus.metadata.azure.com",
                    sans=("eastus.metadata.azure.com",),
                )
            )
        ),
    ),
    (
        "a US Government document is accepted by the usgov cloud",
        lambda p: Scenario(
            forge(issue_leaf(p.intermediate, cn="metadata.azure.us", sans=("metadata.azure.us",))),
            cloud="usgov",
        ),
    ),
]


@pytest.mark.parametrize(("build"), [b for _, b in ACCEPTED], ids=[i for i, _ in ACCEPTED])
async def test_accepted(pki: Pki, build: Build) -> None:
    s = build(pki)
    doc = await _run(pki, s)
    assert doc.nonce == NONCE
    assert doc.vm_id == "b1310a36-d400-46f6-82cb-6217df846586"
    assert doc.created_on == T0
    assert doc.expires_on == T0 + timedelta(hours=6)
    assert doc.chain_subjects[-1] == pki.root.cert.subject.rfc4514_string()


def _decoy_first_evil_signer(p: Pki) -> Scenario:
    # A genuine leaf first, the actual signer (self-issued, right name) second: a verifier
    # that takes "the first certificate" would check the wrong chain.
    evil = issue_leaf(None)
    return Scenario(forge(evil, certificates=[p.leaf, evil]))


REJECTED: list[tuple[str, Build, Code]] = [
    ("bad base64 is malformed", lambda p: Scenario("not base64 !!"), Code.ATTESTED_MALFORMED),
    (
        "base64 of something that is not CMS is malformed",
        lambda p: Scenario("aGVsbG8gd29ybGQ="),
        Code.ATTESTED_MALFORMED,
    ),
    (
        "two signer infos are rejected",
        lambda p: Scenario(forge(p.leaf, extra_signers=[issue_leaf(p.intermediate)])),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a signer whose certificate is not in the envelope is rejected",
        lambda p: Scenario(forge(p.leaf, certificates=[issue_leaf(p.intermediate)])),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a decoy genuine leaf first does not lend its chain to a self-signed signer",
        _decoy_first_evil_signer,
        Code.ATTESTED_CHAIN_UNTRUSTED,
    ),
    (
        "a decoy genuine leaf first does not lend its name to a wrongly named signer",
        lambda p: Scenario(
            forge(
                (w := issue_leaf(p.intermediate, cn="evil.example", sans=("evil.example",))),
                certificates=[p.leaf, w],
            )
        ),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a SHA-1 digest is unsupported",
        lambda p: Scenario(forge(p.leaf, digest="sha1")),
        Code.ATTESTED_DIGEST_UNSUPPORTED,
    ),
    (
        "a SHA-512 digest is unsupported",
        lambda p: Scenario(forge(p.leaf, digest="sha512")),
        Code.ATTESTED_DIGEST_UNSUPPORTED,
    ),
    (
        "an MD5 digest is unsupported",
        lambda p: Scenario(forge(p.leaf, digest="md5")),
        Code.ATTESTED_DIGEST_UNSUPPORTED,
    ),
    (
        "signed attributes with a wrong messageDigest are rejected",
        lambda p: Scenario(forge(p.leaf, signed_attrs="wrong_digest")),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "signed attributes with a wrong contentType are rejected",
        lambda p: Scenario(forge(p.leaf, signed_attrs="wrong_content_type")),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "tampered content fails the signature",
        lambda p: Scenario(forge(p.leaf, tamper_content=True)),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "a tampered signature fails",
        lambda p: Scenario(forge(p.leaf, tamper_signature=True)),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "a signature by another key than the signer certificate's fails",
        lambda p: Scenario(forge(p.leaf, sign_with=p.intermediate.key)),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "a non-RSA signature algorithm is rejected",
        lambda p: Scenario(forge(p.leaf, signature_algorithm="sha256_ecdsa")),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "a signer CN outside the metadata domain is rejected",
        lambda p: Scenario(
            forge(issue_leaf(p.intermediate, cn="metadata.azure.org", sans=("metadata.azure.org",)))
        ),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a CN that merely ends with the domain's text is rejected",
        lambda p: Scenario(
            forge(
                issue_leaf(
                    p.intermediate, cn="evilmetadata.azure.com", sans=("evilmetadata.azure.com",)
                )
            )
        ),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a right CN without a SAN under the domain is rejected",
        lambda p: Scenario(forge(issue_leaf(p.intermediate, sans=("www.example.com",)))),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a right CN without any SAN is rejected",
        lambda p: Scenario(forge(issue_leaf(p.intermediate, sans=()))),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a public-cloud signer is rejected by the usgov cloud",
        lambda p: Scenario(forge(p.leaf), cloud="usgov"),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a self-signed signer is untrusted",
        lambda p: Scenario(forge(issue_leaf(None))),
        Code.ATTESTED_CHAIN_UNTRUSTED,
    ),
    (
        "an expired signer is untrusted",
        lambda p: Scenario(
            forge(issue_leaf(p.intermediate, not_before=T0 - timedelta(days=400), days=30))
        ),
        Code.ATTESTED_CHAIN_UNTRUSTED,
    ),
    (
        "a missing intermediate leaves the chain untrusted",
        lambda p: Scenario(forge(p.leaf), trust="root"),
        Code.ATTESTED_CHAIN_UNTRUSTED,
    ),
    (
        "content that is not JSON is malformed",
        lambda p: Scenario(forge(p.leaf, b"{not json")),
        Code.ATTESTED_MALFORMED,
    ),
    (
        "a vmId that is not a GUID is invalid content",
        lambda p: Scenario(forge(p.leaf, azure_content(vm_id="some-vm"))),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a missing vmId is invalid content",
        lambda p: Scenario(forge(p.leaf, azure_content(drop=["vmId"]))),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a missing subscriptionId is invalid when the subscription is required",
        lambda p: Scenario(forge(p.leaf, azure_content(subscription_id=None))),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a subscriptionId that is not a GUID is invalid content",
        lambda p: Scenario(forge(p.leaf, azure_content(subscription_id="sub-1"))),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "an ISO date instead of Azure's format is invalid content",
        lambda p: Scenario(
            forge(
                p.leaf,
                azure_content(
                    overrides={
                        "timeStamp": {
                            "createdOn": "2026-01-01T00:00:00Z",
                            "expiresOn": "2026-01-01T06:00:00Z",
                        }
                    }
                ),
            )
        ),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a missing timeStamp is invalid content",
        lambda p: Scenario(forge(p.leaf, azure_content(drop=["timeStamp"]))),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a JSON array is invalid content",
        lambda p: Scenario(forge(p.leaf, b"[]")),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a clock beyond the skew before createdOn is rejected",
        lambda p: Scenario(forge(p.leaf), now=T0 - timedelta(seconds=61)),
        Code.ATTESTED_EXPIRED,
    ),
    (
        "a clock beyond the skew after expiresOn is rejected",
        lambda p: Scenario(forge(p.leaf), now=T0 + timedelta(hours=6, seconds=61)),
        Code.ATTESTED_EXPIRED,
    ),
    (
        "another nonce than the challenge is rejected",
        lambda p: Scenario(forge(p.leaf), nonce="another-nonce"),
        Code.NONCE_MISMATCH,
    ),
    (
        "a nonce differing only in case is rejected",
        lambda p: Scenario(forge(p.leaf), nonce=NONCE.upper()),
        Code.NONCE_MISMATCH,
    ),
]


@pytest.mark.parametrize(
    ("build", "code"), [(b, c) for _, b, c in REJECTED], ids=[i for i, _, _ in REJECTED]
)
async def test_rejected(pki: Pki, build: Build, code: Code) -> None:
    s = build(pki)
    with pytest.raises(GatewayError) as info:
        await _run(pki, s)
    assert info.value.code == code
    expected_type = BadRequest if code == Code.ATTESTED_MALFORMED else JoinRejected
    assert isinstance(info.value, expected_type)


async def test_chain_is_built_once_per_signer(pki: Pki) -> None:
    s = Scenario(forge(pki.leaf))
    clock = FixedClock(NOW)
    cache: MemoryCache[bytes, VerifiedChain] = MemoryCache("chains", clock=clock)
    verifier = _verifier(pki, s, cache)
    first = await verifier.verify(forge(pki.leaf), expected_nonce=NONCE)
    other = forge(pki.leaf, azure_content(nonce="second-nonce"))
    second = await verifier.verify(other, expected_nonce="second-nonce")
    assert verifier.chain_builds == 1
    assert cache.stats.hits == 1
    assert first.signer_fingerprint == second.signer_fingerprint
    # A cached chain never excuses a bad signature: the RSA check runs every time.
    with pytest.raises(JoinRejected) as info:
        await verifier.verify(forge(pki.leaf, tamper_signature=True), expected_nonce=NONCE)
    assert info.value.code == Code.ATTESTED_SIGNATURE_INVALID
    assert verifier.chain_builds == 1


async def test_cached_chain_expires_with_the_signer(pki: Pki) -> None:
    clock = FixedClock(NOW)
    cache: MemoryCache[bytes, VerifiedChain] = MemoryCache("chains", clock=clock)
    verifier = _verifier(pki, Scenario(""), cache, clock)
    await verifier.chain_for(pki.leaf.cert, "metadata.azure.com")
    leaf_left = (pki.leaf.cert.not_valid_after_utc - NOW).total_seconds()
    clock.advance(leaf_left - 1)
    await verifier.chain_for(pki.leaf.cert, "metadata.azure.com")
    assert verifier.chain_builds == 1
    clock.advance(2)
    with pytest.raises(JoinRejected) as info:
        await verifier.chain_for(pki.leaf.cert, "metadata.azure.com")
    assert info.value.code == Code.ATTESTED_CHAIN_UNTRUSTED
    assert verifier.chain_builds == 2


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("07/28/26 13:24:00 -0000", True),
        ("12/31/99 23:59:59 +0100", True),
        ("2026-07-28T13:24:00Z", False),
        ("7/28/26 13:24:00 -0000", False),
        ("13/28/26 13:24:00 -0000", False),
        ("07/28/26 13:24:00", False),
    ],
    ids=[
        "Azure's format parses",
        "an explicit offset is honoured",
        "RFC 3339 is not Azure's format",
        "a one-digit month is not Azure's format",
        "month 13 is invalid",
        "a missing offset is invalid",
    ],
)
def test_azure_time(text: str, ok: bool) -> None:
    if ok:
        assert parse_azure_time(text).tzinfo is not None
    else:
        with pytest.raises(JoinRejected) as info:
            parse_azure_time(text)
        assert info.value.code == Code.ATTESTED_CONTENT_INVALID


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
async def test_mutated_documents_only_ever_raise_gateway_errors(
    pki: Pki, data: st.DataObject
) -> None:
    # Whatever the bytes, the verifier answers with one of our codes, never a library error.
    der = bytearray(
        base64.b64decode(
            forge(pki.leaf, signed_attrs=data.draw(st.sampled_from([None, "correct"])))
        )
    )
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    verifier = _verifier(pki, Scenario(""))
    with contextlib.suppress(GatewayError):
        await verifier.verify(base64.b64encode(bytes(der)).decode(), expected_nonce=NONCE)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_decode_signature_only_raises_malformed(text: str) -> None:
    try:
        decode_signature(text)
    except BadRequest as exc:
        assert exc.code == Code.ATTESTED_MALFORMED
