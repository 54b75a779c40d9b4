"""Differential: the strict DER reader against asn1crypto, with verification as the judge.

The product reads attested documents with ``gateway.azure.cms_shape.read_signed_data``
(strict DER, Azure's shape; other CMS features fall back to asn1crypto). The oracle is
the general parser, ``gateway.azure.cms.parse_signed_data`` (asn1crypto), followed by
every verification step run by hand. Over mutated real Azure documents and mutated
emulated ones (with and without signed attributes, with the chain embedded):

* the product never accepts a document the oracle rejects, and when both accept they
  extract the same document (nonce, vmId, subscription, window, signer, chain);
* whenever both readers parse the envelope, they agree on every field;
* the reader's own refusals are all ``attested_malformed``.

Mutations: the structured ones of tests/security/test_properties.py (whole TLV nodes
dropped, duplicated, swapped, re-tagged, re-encoded with BER lengths ...) and byte-level
ones (flip, insert, delete, truncate). The same property under atheris is the ``der``
target of tests/fuzz/targets.py (run briefly by tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.azure.attested import (
    AttestedDocument,
    AttestedVerifier,
    check_content,
    check_digest_algorithm,
    check_signature,
    check_signer_name,
    check_single_signer,
    find_signer_certificate,
)
from gateway.azure.certs import TrustStore, fingerprint, verify_chain
from gateway.azure.cms import SignedDataView, parse_signed_data
from gateway.azure.cms_shape import read_signed_data
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, Code, GatewayError
from tests.security.test_properties import _mutate as mutate_tree
from tests.security.test_properties import _parse as tlv_tree
from tests.support.cms_forge import T0, Pki, azure_content, forge, make_pki
from tests.support.data import REAL, REAL_ATTESTED

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Source:
    """A document that verifies, and what it takes to verify it."""

    name: str
    der: bytes
    trust: TrustStore
    now: datetime
    nonce: str
    require_subscription: bool


def _real(file: str) -> Source:
    index = {e["file"]: e for e in json.loads((REAL / "index.json").read_text())}
    entry = index[file]
    signature = json.loads((REAL_ATTESTED / file).read_text())["signature"]
    return Source(
        name=file,
        der=base64.b64decode(signature),
        trust=TrustStore.load(sorted((REAL / "ca").glob("*.pem"))),
        now=datetime.strptime(entry["createdOn"], "%m/%d/%y %H:%M:%S %z").astimezone(UTC),
        nonce=entry["nonce"],
        require_subscription=entry["subscriptionId"] is not None,
    )


def _emulated(pki: Pki, name: str, **forge_kwargs: object) -> Source:
    signature = forge(pki.leaf, azure_content(), **forge_kwargs)  # type: ignore[arg-type]
    return Source(
        name=name,
        der=base64.b64decode(signature),
        trust=TrustStore.from_certificates([pki.root.cert, pki.intermediate.cert]),
        now=T0 + timedelta(hours=1),
        nonce="nonce-0123456789",
        require_subscription=True,
    )


@pytest.fixture(scope="module")
def sources() -> list[Source]:
    pki = make_pki()
    return [
        _real("attested-taskcluster-2026-07-28.json"),
        _real("attested-taskcluster-2019-12-13.json"),
        _emulated(pki, "emulated, Azure's shape"),
        _emulated(pki, "emulated, signed attributes", signed_attrs="correct"),
        _emulated(pki, "emulated, chain embedded", certificates=[pki.leaf, pki.intermediate]),
    ]


# ------------------------------------------------------------------------------ judges


def _fields(view: SignedDataView) -> tuple[object, ...]:
    """Everything a reader extracts, certificates as their DER."""
    return (
        view.content_type,
        view.content,
        tuple(fingerprint(c) for c in view.certificates),
        view.certificate_issuers,
        view.signer_infos,
    )


def _oracle(source: Source, der: bytes) -> AttestedDocument | Code:
    """asn1crypto, then every verification step by hand: the document, or the first code."""
    try:
        view = parse_signed_data(der)
        signer = check_single_signer(view)
        cert = find_signer_certificate(view, signer)
        check_digest_algorithm(signer)
        check_signature(view, signer, cert)
        cn = check_signer_name(cert, CLOUDS["public"])
        chain = verify_chain(
            source.trust,
            cert,
            dns_name=cn,
            intermediates=list(source.trust.intermediates),
            at=source.now,
        )
        content = check_content(
            view.content,
            now=source.now,
            skew=60.0,
            expected_nonce=source.nonce,
            require_subscription=source.require_subscription,
        )
    except GatewayError as exc:
        return exc.code
    return AttestedDocument(
        nonce=content.nonce,
        vm_id=content.vm_id,
        subscription_id=content.subscription_id,
        sku=content.sku,
        created_on=content.created_on,
        expires_on=content.expires_on,
        signer_cn=cn,
        signer_fingerprint=fingerprint(cert),
        chain_subjects=chain.subjects,
    )


def _product(source: Source, der: bytes) -> AttestedDocument | Code:
    """The shipped verifier (strict reader on its parse step), no caches."""
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=source.trust,
        aia=None,
        chain_cache=None,
        clock=FixedClock(source.now),
        require_subscription=source.require_subscription,
    )
    try:
        return asyncio.run(
            verifier.verify(base64.b64encode(der).decode(), expected_nonce=source.nonce)
        )
    except GatewayError as exc:
        return exc.code


def _assert_agree(source: Source, der: bytes) -> None:
    try:
        mine: SignedDataView | None = read_signed_data(der)
    except BadRequest as exc:
        assert exc.code == Code.ATTESTED_MALFORMED
        mine = None
    try:
        oracle_view: SignedDataView | None = parse_signed_data(der)
    except BadRequest:
        oracle_view = None
    if mine is not None and oracle_view is not None:
        assert _fields(mine) == _fields(oracle_view)
    verdict = _product(source, der)
    if isinstance(verdict, AttestedDocument):
        assert _oracle(source, der) == verdict


# ------------------------------------------------------------------------------- tests


def test_every_source_verifies_through_both_readers(sources: list[Source]) -> None:
    """Control: the unmutated documents are accepted by both, identically, so what the
    mutations below change is what makes a difference."""
    for source in sources:
        verdict = _product(source, source.der)
        assert isinstance(verdict, AttestedDocument), (source.name, verdict)
        assert _oracle(source, source.der) == verdict
        assert _fields(read_signed_data(source.der)) == _fields(parse_signed_data(source.der))


@SETTINGS
@given(st.data())
def test_structured_mutations_never_make_the_reader_accept_more(
    sources: list[Source], data: st.DataObject
) -> None:
    source = data.draw(st.sampled_from(sources))
    roots = tlv_tree(source.der)
    for _ in range(data.draw(st.integers(1, 3))):
        mutate_tree(roots, data)
    _assert_agree(source, b"".join(t.encode() for t in roots))


@SETTINGS
@given(st.data())
def test_byte_mutations_never_make_the_reader_accept_more(
    sources: list[Source], data: st.DataObject
) -> None:
    source = data.draw(st.sampled_from(sources))
    der = bytearray(source.der)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(der) - 1))
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if kind == "flip":
            der[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set":
            der[at] = data.draw(st.sampled_from([0x00, 0x30, 0x31, 0x80, 0x81, 0x82, 0x84, 0xFF]))
        elif kind == "insert":
            der[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del der[at]
        else:
            del der[at:]
        if not der:
            der = bytearray(b"\x30")
    _assert_agree(source, bytes(der))


def test_an_embedded_certificate_whose_key_no_reader_knows_is_refused(
    sources: list[Source],
) -> None:
    """Found by the byte mutations above: one flipped bit turned the embedded
    intermediate's key algorithm (rsaEncryption) into an OID nobody knows. asn1crypto
    refuses the envelope; the strict reader used to carry that certificate along unread
    (the signer is the leaf, so nothing read the intermediate's key) and accept."""
    source = next(s for s in sources if s.name == "emulated, chain embedded")
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")
    # Its three occurrences: the leaf's key, the intermediate's key, the SignerInfo's
    # signature algorithm. The second is the intermediate's.
    at = source.der.index(rsa_encryption, source.der.index(rsa_encryption) + 1)
    assert source.der.index(rsa_encryption, at + 1) > at
    der = bytearray(source.der)
    # The OID's length 9 -> 11: it swallows the NULL parameters that follow, so the key
    # algorithm reads 1.2.840.113549.1.1.1.5.0 (the example hypothesis found).
    der[at + 1] ^= 0b10
    assert _oracle(source, bytes(der)) == Code.ATTESTED_MALFORMED
    assert _product(source, bytes(der)) == Code.ATTESTED_MALFORMED
    _assert_agree(source, bytes(der))
