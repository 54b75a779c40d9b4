"""Every rule of the attested-document verifier, one passing and one failing case each.

Documents are forged with real crypto under a generated root → intermediate → leaf
chain (tests/support/cms_forge.py), byte-shaped like Azure's by default.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
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
from gateway.core.errors import BadRequest, Code, GatewayError, JoinRejected, Overloaded
from tests.support.cms_forge import (
    AZURE_CA_NAME,
    INTERMEDIATE_CN,
    T0,
    Issued,
    Pki,
    azure_content,
    forge,
    huge_exponent_key,
    issue_ca,
    issue_leaf,
    lookalike_cas,
    make_pki,
    with_x509_version,
)
from tests.support.executors import GatedExecutor

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


# ------------------------------------------------------------------ bounded cost (issue 8)

KNOWN_NAME = AZURE_CA_NAME


@pytest.fixture(scope="module")
def huge_key() -> rsa.RSAPrivateKey:
    return huge_exponent_key()


def _public_only_ca(cn: str, public_key: rsa.RSAPublicKey, issuer: Issued) -> bytes:
    """A CA certificate for a key nobody holds (any modulus will do: it is never used)."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer.key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def _signed_by(leaf: Issued, *intermediates: bytes) -> Scenario:
    return Scenario(forge(leaf), intermediates=intermediates)


CostBuild = Callable[[Pki, rsa.RSAPrivateKey], Scenario]


def _reproducer(name: str, *, huge: bool) -> CostBuild:
    """Issue 8: eight self-issued CAs sharing one name and one key; the leaf names them."""

    def build(p: Pki, huge_key: rsa.RSAPrivateKey) -> Scenario:
        cas = lookalike_cas(name, huge_key if huge else p.intermediate.key)
        return _signed_by(issue_leaf(cas[0]), *(c.der for c in cas))

    return build


def _distinct_known(count: int) -> CostBuild:
    def build(p: Pki, huge_key: rsa.RSAPrivateKey) -> Scenario:
        key = p.intermediate.key
        untrusted_root = issue_ca("Microsoft RSA Root Certificate Authority 2017", key=key)
        cas = [issue_ca(KNOWN_NAME, key=key, issuer=untrusted_root) for _ in range(count)]
        return _signed_by(issue_leaf(cas[0]), *(c.der for c in cas))

    return build


def _intermediate_with(public_key: Callable[[], rsa.RSAPublicKey]) -> CostBuild:
    def build(p: Pki, huge_key: rsa.RSAPrivateKey) -> Scenario:
        return _signed_by(p.leaf, _public_only_ca(KNOWN_NAME, public_key(), p.root))

    return build


def _odd_modulus(bits: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(65537, (1 << (bits - 1)) | 0xF00D | 1).public_key()


def _leaf_key(make: Callable[[rsa.RSAPrivateKey], rsa.RSAPrivateKey]) -> CostBuild:
    def build(p: Pki, huge_key: rsa.RSAPrivateKey) -> Scenario:
        return Scenario(forge(issue_leaf(p.intermediate, key=make(huge_key))))

    return build


# (id, build, code, path-builder calls, untrusted candidates handed to it)
COST: list[tuple[str, CostBuild, Code | None, int, int]] = [
    (
        "a signer with a 3,070-bit public exponent is refused before any RSA verify",
        _leaf_key(lambda huge: huge),
        Code.ATTESTED_SIGNER_INVALID,
        0,
        0,
    ),
    (
        "a 1024-bit signer is refused",
        _leaf_key(lambda _: rsa.generate_private_key(public_exponent=65537, key_size=1024)),  # noqa: S505
        Code.ATTESTED_SIGNER_INVALID,
        0,
        0,
    ),
    (
        "a signer with e = 3 is refused",
        _leaf_key(lambda _: rsa.generate_private_key(public_exponent=3, key_size=2048)),
        Code.ATTESTED_SIGNER_INVALID,
        0,
        0,
    ),
    (
        "issue 8's reproducer under a known name: refused on the key, no path search",
        _reproducer(KNOWN_NAME, huge=True),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        0,
        0,
    ),
    (
        "issue 8's reproducer under an unknown name: the CAs are dropped unread",
        _reproducer("Totally Azure Issuing CA", huge=True),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        1,
        0,
    ),
    (
        "eight self-issued known-named CAs with cheap keys are dropped",
        _reproducer(KNOWN_NAME, huge=False),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        1,
        0,
    ),
    (
        "five distinct known-named intermediates are too many",
        _distinct_known(5),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        0,
        0,
    ),
    (
        "four distinct known-named intermediates all reach the path builder",
        _distinct_known(4),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        1,
        4,
    ),
    (
        "a known-named intermediate with a 4,200-bit key is refused",
        _intermediate_with(lambda: _odd_modulus(4200)),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        0,
        0,
    ),
    (
        "a known-named intermediate with a 1,024-bit key is refused",
        _intermediate_with(lambda: _odd_modulus(1024)),
        Code.ATTESTED_CHAIN_UNTRUSTED,
        0,
        0,
    ),
    (
        "a request intermediate claiming X.509 v5 is dropped and the chain still builds",
        lambda p, _: _signed_by(p.leaf, with_x509_version(p.intermediate.der, 4)),
        None,
        1,
        0,
    ),
]


@pytest.mark.parametrize(
    ("build", "code", "calls", "candidates"),
    [c[1:] for c in COST],
    ids=[c[0] for c in COST],
)
async def test_work_is_bounded_before_path_building(
    pki: Pki,
    huge_key: rsa.RSAPrivateKey,
    build: CostBuild,
    code: Code | None,
    calls: int,
    candidates: int,
) -> None:
    s = build(pki, huge_key)
    verifier = _verifier(pki, s)
    try:
        await verifier.verify(s.signature, intermediates=s.intermediates, expected_nonce=s.nonce)
        got: Code | None = None
    except JoinRejected as exc:
        got = exc.code
    assert (got, verifier.path_builder_calls, verifier.untrusted_candidates) == (
        code,
        calls,
        candidates,
    )
    assert verifier.aia_fetches == 0


async def test_a_failed_chain_is_refused_from_memory_for_the_same_leaf_and_intermediates(
    pki: Pki, huge_key: rsa.RSAPrivateKey
) -> None:
    s = _distinct_known(2)(pki, huge_key)
    clock = FixedClock(NOW)
    verifier = _verifier(pki, s, MemoryCache("chains", clock=clock), clock)
    for _ in range(3):
        with pytest.raises(JoinRejected):
            await verifier.verify(s.signature, intermediates=s.intermediates, expected_nonce=NONCE)
    assert (verifier.path_builder_calls, verifier.failed_chain_hits) == (1, 2)
    # Other intermediates are another question: built once more, then remembered too.
    for _ in range(2):
        with pytest.raises(JoinRejected):
            await verifier.verify(
                s.signature, intermediates=s.intermediates[:1], expected_nonce=NONCE
            )
    assert (verifier.path_builder_calls, verifier.failed_chain_hits) == (2, 3)
    # The memory is bounded in time: after a minute the leaf is tried again.
    clock.advance(61)
    with pytest.raises(JoinRejected):
        await verifier.verify(s.signature, intermediates=s.intermediates, expected_nonce=NONCE)
    assert verifier.path_builder_calls == 3


class _CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0
        self.threads: set[str] = set()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1

        def run() -> Any:
            self.threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return super().submit(run)


async def test_path_building_runs_in_the_pool_and_cached_chains_do_not(pki: Pki) -> None:
    executor = _CountingExecutor()
    clock = FixedClock(NOW)
    s = Scenario(forge(pki.leaf))
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates([pki.root.cert, pki.intermediate.cert]),
        aia=None,
        chain_cache=MemoryCache("chains", clock=clock),
        clock=clock,
        executor=executor,
    )
    try:
        for nonce in ("one", "two", "three"):
            await verifier.verify(forge(pki.leaf, azure_content(nonce=nonce)), expected_nonce=nonce)
    finally:
        executor.shutdown()
    assert executor.submitted == 1
    assert executor.threads and threading.current_thread().name not in executor.threads
    assert s.signature


async def test_builds_beyond_the_pending_cap_are_refused_as_overload(pki: Pki) -> None:
    executor = GatedExecutor()
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates([pki.root.cert, pki.intermediate.cert]),
        aia=None,
        chain_cache=None,
        clock=FixedClock(NOW),
        executor=executor,
    )
    try:
        builds = [
            asyncio.ensure_future(verifier.chain_for(pki.leaf.cert, "metadata.azure.com"))
            for _ in range(32)
        ]
        await asyncio.sleep(0)  # every build is now waiting for the pool
        with pytest.raises(Overloaded) as info:
            await verifier.chain_for(pki.leaf.cert, "metadata.azure.com")
        assert info.value.code == Code.OVERLOADED and info.value.retry_after
        executor.gate.set()
        chains = await asyncio.gather(*builds)
        assert len(chains) == 32 and verifier.path_builder_calls == 32
        # The queue drained: the next build is accepted again.
        await verifier.chain_for(pki.leaf.cert, "metadata.azure.com")
    finally:
        executor.gate.set()
        executor.shutdown()


@pytest.mark.parametrize(
    "text",
    [
        "07/28/26 13:24:00 -0000",
        "07/28/26 13:24:00 +0000",
        "12/31/99 23:59:59 +0100",
        "01/01/69 00:30:00 -0130",
        "02/29/28 23:59:59 +0000",
        "01/01/00 00:00:00 -0000",
    ],
)
def test_azure_time_is_strptime_in_utc(text: str) -> None:
    # The UTC stamps Azure writes take a shorter path; every stamp is the same instant
    # as strptime reads it, in UTC.
    got = parse_azure_time(text)
    want = datetime.strptime(text, "%m/%d/%y %H:%M:%S %z").astimezone(UTC)
    assert got == want and got.utcoffset() == timedelta(0) and got.tzinfo is UTC
    assert got.isoformat() == want.isoformat()


def test_a_utc_stamp_that_is_no_date_is_refused() -> None:
    with pytest.raises(JoinRejected) as info:
        parse_azure_time("02/30/26 10:00:00 -0000")
    assert info.value.code == Code.ATTESTED_CONTENT_INVALID


async def test_a_request_intermediate_is_read_once_for_all_joins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every VM sends the same intermediate: its bytes are loaded and checked once, and a
    # document whose chain cache misses (a second verifier) still builds with it.
    from gateway.azure import attested

    fresh = make_pki()
    loaded: list[bytes] = []
    real = attested.load_der_certificate

    def counting(der: bytes) -> x509.Certificate:
        loaded.append(der)
        return real(der)

    monkeypatch.setattr(attested, "load_der_certificate", counting)
    s = Scenario(forge(fresh.leaf, azure_content()), intermediates=(fresh.intermediate.der,))
    s.trust = "root"
    verifier = _verifier(fresh, s, cache=MemoryCache("chains", clock=FixedClock(NOW)))
    for _ in range(3):
        doc = await verifier.verify(
            s.signature, intermediates=s.intermediates, expected_nonce=NONCE
        )
        assert doc.vm_id
    other = await _verifier(fresh, s).verify(
        s.signature, intermediates=s.intermediates, expected_nonce=NONCE
    )
    assert other.vm_id and verifier.chain_builds == 1
    assert loaded == [fresh.intermediate.der]
    # Unreadable bytes are dropped each time (logged), and read once too.
    junk = b"\x30\x03\x02\x01\x00"
    assert verifier._usable_intermediates([junk, junk]) == {}
    assert loaded == [fresh.intermediate.der, junk]
