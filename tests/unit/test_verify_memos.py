"""What the document and token checks remember between joins, and what they never do.

Each memo is keyed by exact bytes (or their SHA-256), bounded, and holds only what is a
pure function of those bytes: a remembered answer must be the answer the full check gives
on the same bytes, a refusal is worked out again every time, and the two signature
verifications (the document's RSA, the token's RS256) run on every call.
"""

from __future__ import annotations

import base64
import time
from datetime import timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.azure import attested, cms_shape, token
from gateway.azure.attested import AttestedVerifier, parse_azure_time
from gateway.azure.certs import TrustStore
from gateway.azure.cms import parse_signed_data
from gateway.azure.cms_shape import read_signed_data
from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, Code, JoinRejected
from tests.security.test_properties import Tlv
from tests.security.test_properties import _parse as tlv_tree
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
TID = "0b5a7d1e-1111-4222-8333-944445555666"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def _verifier(pki: Pki) -> AttestedVerifier:
    clock = FixedClock(NOW)
    return AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates([pki.root.cert, pki.intermediate.cert]),
        aia=None,
        chain_cache=MemoryCache("chains", clock=clock),
        clock=clock,
        known_issuer_names=(INTERMEDIATE_CN,),
    )


def _der(signature_b64: str) -> bytes:
    return base64.b64decode(signature_b64)


def _encode(t: Tlv) -> bytes:
    return t.encode()


def _signer_info(roots: list[Tlv]) -> Tlv:
    signed_data = roots[0].children[1].children[0]  # type: ignore[index]
    return signed_data.children[-1].children[0]  # type: ignore[index]


# ------------------------------------------------------------------- cms_shape memos


def test_a_remembered_signer_header_reads_as_the_full_reader_does(pki: Pki) -> None:
    der = _der(forge(pki.leaf, azure_content(nonce="header-1")))
    cms_shape._SIGNER_HEADERS.clear()
    cms_shape._ISSUERS.clear()
    cold = read_signed_data(der)
    assert len(cms_shape._SIGNER_HEADERS) == 1 and len(cms_shape._ISSUERS) == 1
    # Another document of the same leaf: other content and signature, same header bytes.
    other = _der(forge(pki.leaf, azure_content(nonce="header-2")))
    warm = read_signed_data(other)
    assert len(cms_shape._SIGNER_HEADERS) == 1 and len(cms_shape._ISSUERS) == 1
    assert warm.signer_infos[0].signature != cold.signer_infos[0].signature
    assert warm == parse_signed_data(other)  # field for field, as asn1crypto reads it


def test_a_header_that_differs_by_one_byte_is_read_again(pki: Pki) -> None:
    der = _der(forge(pki.leaf))
    read_signed_data(der)
    roots = tlv_tree(der)
    sid = _signer_info(roots).children[1]  # type: ignore[index]
    serial = sid.children[1]  # type: ignore[index]
    serial.content = serial.content[:-1] + bytes([serial.content[-1] ^ 1])
    changed = _encode(roots[0])
    view = read_signed_data(changed)
    assert view == parse_signed_data(changed)
    assert view.signer_infos[0].serial != read_signed_data(der).signer_infos[0].serial


def test_signer_headers_that_do_not_read_are_never_remembered(pki: Pki) -> None:
    roots = tlv_tree(_der(forge(pki.leaf)))
    info = _signer_info(roots)
    info.children[2].children[0].tag = 0x04  # type: ignore[index]  # digest OID → OCTET STRING
    broken = _encode(roots[0])
    cms_shape._SIGNER_HEADERS.clear()
    for _ in range(2):
        with pytest.raises(BadRequest) as err:
            read_signed_data(broken)
        assert err.value.code == Code.ATTESTED_MALFORMED
    assert cms_shape._SIGNER_HEADERS == {}


def test_signer_headers_and_issuers_are_bounded(pki: Pki) -> None:
    leaves = [issue_leaf(pki.intermediate, key=pki.leaf.key) for _ in range(70)]
    for leaf in leaves:
        read_signed_data(_der(forge(leaf)))
    assert len(cms_shape._SIGNER_HEADERS) <= cms_shape._SIGNER_HEADERS_MAX
    assert len(cms_shape._ISSUERS) <= cms_shape.CERT_CACHE_MAX


# ------------------------------------------------------------------ the verifier's signers


async def test_a_remembered_signer_still_has_every_signature_verified(pki: Pki) -> None:
    verifier = _verifier(pki)
    good = forge(pki.leaf, azure_content(nonce=NONCE))
    assert (await verifier.verify(good, expected_nonce=NONCE)).vm_id
    assert len(verifier._signers) == 1
    for bad in (
        forge(pki.leaf, azure_content(nonce=NONCE), tamper_signature=True),
        forge(pki.leaf, azure_content(nonce=NONCE), tamper_content=True),
        forge(pki.leaf, azure_content(nonce=NONCE), sign_with=pki.intermediate.key),
    ):
        with pytest.raises(JoinRejected) as err:
            await verifier.verify(bad, expected_nonce=NONCE)
        assert err.value.code == Code.ATTESTED_SIGNATURE_INVALID


async def test_a_refused_signer_key_is_refused_on_every_document(pki: Pki) -> None:
    weak = issue_leaf(
        pki.intermediate,
        key=rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
    )
    verifier = _verifier(pki)
    for _ in range(3):
        with pytest.raises(JoinRejected) as err:
            await verifier.verify(forge(weak, azure_content(nonce=NONCE)), expected_nonce=NONCE)
        assert err.value.code == Code.ATTESTED_SIGNER_INVALID
        assert "1024 bits" in err.value.detail
    assert verifier.signer_checks(weak.cert)._key is None  # nothing remembered for it


async def test_a_signer_outside_the_metadata_domain_is_refused_on_every_document(
    pki: Pki,
) -> None:
    other = issue_leaf(pki.intermediate, cn="evil.example.com", sans=("evil.example.com",))
    verifier = _verifier(pki)
    for _ in range(2):
        with pytest.raises(JoinRejected) as err:
            await verifier.verify(forge(other, azure_content(nonce=NONCE)), expected_nonce=NONCE)
        assert err.value.code == Code.ATTESTED_SIGNER_INVALID


def test_the_remembered_signers_are_bounded(pki: Pki) -> None:
    verifier = _verifier(pki)
    leaves = [issue_leaf(pki.intermediate, key=pki.leaf.key) for _ in range(70)]
    for leaf in leaves:
        verifier.signer_checks(leaf.cert).key()
    assert len(verifier._signers) == attested._SIGNERS_MAX
    # The newest are kept; each record is its own certificate's.
    for leaf in leaves[-attested._SIGNERS_MAX :]:
        record = verifier._signers[cms_shape.fingerprint(leaf.cert)]
        assert record.cert is leaf.cert


def test_a_refused_timestamp_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(JoinRejected) as err:
            parse_azure_time("02/30/26 10:00:00 -0000")
        assert err.value.code == Code.ATTESTED_CONTENT_INVALID
    with pytest.raises(JoinRejected):
        parse_azure_time(["01/01/26 00:00:00 -0000"])  # not a string: never reaches the memo
    first = parse_azure_time("01/01/26 00:00:00 -0000")
    assert parse_azure_time("01/01/26 00:00:00 -0000") is first
    assert attested._parse_azure_time.cache_info().maxsize == 256


# ------------------------------------------------------------------------ token headers


def _token(key: rsa.RSAPrivateKey, **headers: Any) -> str:
    cloud = CLOUDS["public"]
    now = int(time.time())
    claims = {
        "aud": cloud.arm_audience,
        "iss": cloud.issuer_for(TID),
        "tid": TID,
        "oid": TID,
        "sub": TID,
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1", **headers})


def test_a_remembered_header_still_has_every_signature_verified() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token._HEADERS.clear()
    good, forged = _token(key), _token(other)
    assert good.split(".")[0] == forged.split(".")[0]  # the same header text
    keys = {"k1": key.public_key()}
    cloud, now = CLOUDS["public"], time.time()
    assert token.verify_access_token(good, keys=keys, cloud=cloud, now=now).tid == TID
    assert len(token._HEADERS) == 1
    with pytest.raises(JoinRejected) as err:
        token.verify_access_token(forged, keys=keys, cloud=cloud, now=now)
    assert err.value.code == Code.ACCESS_TOKEN_INVALID
    # A header without a usable kid is refused every time (remembered decoded or not).
    for _ in range(2):
        with pytest.raises(JoinRejected) as err:
            token.peek_token(_token(key, kid=""))
        assert err.value.code == Code.ACCESS_TOKEN_INVALID


def test_headers_that_do_not_decode_are_never_remembered() -> None:
    token._HEADERS.clear()
    for _ in range(2):
        with pytest.raises(BadRequest) as err:
            token.peek_token("bm90IGpzb24." + "e30." + "c2ln")  # "not json"
        assert err.value.code == Code.ACCESS_TOKEN_MALFORMED
    assert token._HEADERS == {}


def test_remembered_headers_are_bounded_and_short() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token._HEADERS.clear()
    for i in range(token._HEADERS_MAX + 5):
        token.peek_token(_token(key, kid=f"k{i}"))
    assert len(token._HEADERS) == token._HEADERS_MAX
    token._HEADERS.clear()
    token.peek_token(_token(key, x5t="A" * token._HEADER_MAX_CHARS))
    assert token._HEADERS == {}
