"""CMS SignedData parsing: what it extracts, and that hostile bytes only ever raise our 400."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from asn1crypto import cms as a_cms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.azure.cms import (
    OID_DATA,
    embedded_certificates,
    parse_signed_data,
)
from gateway.core.errors import BadRequest, Code
from tests.support.cms_forge import Pki, azure_content, forge, issue_leaf, make_pki
from tests.support.data import REAL as REAL_DIR

REAL = REAL_DIR


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def _der(sig: str) -> bytes:
    return base64.b64decode(sig)


def test_azure_shaped_document_is_read_field_by_field(pki: Pki) -> None:
    content = azure_content()
    view = parse_signed_data(_der(forge(pki.leaf, content)))
    assert view.content == content
    assert view.content_type == OID_DATA
    assert [c.serial_number for c in view.certificates] == [pki.leaf.cert.serial_number]
    (si,) = view.signer_infos
    assert si.serial == pki.leaf.cert.serial_number
    assert si.issuer_der == pki.leaf.cert.issuer.public_bytes()
    assert si.digest_algorithm == "1.2.840.113549.1.1.11"  # Azure's quirk, read as sent
    assert si.signature_algorithm == "1.2.840.113549.1.1.1"
    assert len(si.signature) == 256
    assert si.signed_attrs is None


def test_forged_documents_are_shaped_like_real_azure_ones(pki: Pki) -> None:
    real_doc = json.loads((REAL / "attested" / "attested-taskcluster-2026-07-28.json").read_text())
    real = parse_signed_data(base64.b64decode(real_doc["signature"]))
    forged = parse_signed_data(_der(forge(pki.leaf)))
    for view in (real, forged):
        assert view.content_type == OID_DATA
        assert len(view.certificates) == 1  # the leaf only
        (si,) = view.signer_infos
        assert si.digest_algorithm == "1.2.840.113549.1.1.11"  # the digest-OID quirk
        assert si.signature_algorithm == "1.2.840.113549.1.1.1"
        assert si.signed_attrs is None
    real_json, forged_json = json.loads(real.content), json.loads(forged.content)
    assert sorted(real_json) == sorted(forged_json)
    assert sorted(real_json["timeStamp"]) == sorted(forged_json["timeStamp"])
    # compact, key-sorted JSON, as Azure writes it
    compact = json.dumps(forged_json, sort_keys=True, separators=(",", ":")).encode()
    assert forged.content == compact
    assert real.content == json.dumps(real_json, sort_keys=True, separators=(",", ":")).encode()


def test_signed_attributes_are_re_encoded_as_a_set(pki: Pki) -> None:
    view = parse_signed_data(_der(forge(pki.leaf, signed_attrs="correct")))
    attrs = view.signer_infos[0].signed_attrs
    assert attrs is not None
    assert attrs.der[0] == 0x31
    assert attrs.content_type == OID_DATA
    assert attrs.message_digest is not None and len(attrs.message_digest) == 32


def test_embedded_certificates_keep_envelope_order(pki: Pki) -> None:
    decoy = issue_leaf(pki.intermediate)
    certs = embedded_certificates(_der(forge(pki.leaf, certificates=[decoy, pki.leaf])))
    assert [c.serial_number for c in certs] == [
        decoy.cert.serial_number,
        pki.leaf.cert.serial_number,
    ]


def _detached(pki: Pki) -> bytes:
    ci = a_cms.ContentInfo.load(_der(forge(pki.leaf)))
    sd = ci["content"].copy()
    sd["encap_content_info"] = {"content_type": "data"}
    der: bytes = a_cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()
    return der


def _bad_cert_version(pki: Pki) -> bytes:
    der = _der(forge(pki.leaf))
    marker = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2 (v3) of the leaf's TBS
    assert der.count(marker) == 1
    return der.replace(marker, b"\xa0\x03\x02\x01\x41")


MALFORMED = [
    ("empty bytes are malformed", lambda p: b""),
    ("random text is malformed", lambda p: b"hello world"),
    (
        "a ContentInfo holding plain data is not SignedData",
        lambda p: a_cms.ContentInfo({"content_type": "data", "content": b"x"}).dump(),
    ),
    ("detached content is refused", _detached),
    ("a truncated document is malformed", lambda p: _der(forge(p.leaf))[:-10]),
    ("trailing junk after the DER is malformed", lambda p: _der(forge(p.leaf)) + b"junk"),
    ("an embedded certificate with an unknown X.509 version is malformed", _bad_cert_version),
]


@pytest.mark.parametrize("build", [b for _, b in MALFORMED], ids=[i for i, _ in MALFORMED])
def test_malformed(pki: Pki, build: Callable[[Pki], bytes]) -> None:
    with pytest.raises(BadRequest) as info:
        parse_signed_data(build(pki))
    assert info.value.code == Code.ATTESTED_MALFORMED


def test_trailing_newline_is_tolerated(pki: Pki) -> None:
    # The real negative fixture (tampered content) carries a trailing "\n" inside its base64.
    view = parse_signed_data(_der(forge(pki.leaf)) + b"\n")
    assert view.content == azure_content()


def _parse_or_400(data: bytes) -> None:
    try:
        parse_signed_data(data)
    except BadRequest as exc:
        assert exc.code == Code.ATTESTED_MALFORMED


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    _parse_or_400(data)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_documents_raise_only_malformed(pki: Pki, data: st.DataObject) -> None:
    base = bytearray(_der(forge(pki.leaf, signed_attrs="correct")))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(base)))
    _parse_or_400(bytes(base[:cut]))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_headers_raise_only_malformed(pki: Pki, data: st.DataObject) -> None:
    # Length and tag octets sit in the first bytes of each structure: hit them hard.
    base = bytearray(_der(forge(pki.leaf)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 64))
        base[i] = data.draw(st.integers(0, 255))
    _parse_or_400(bytes(base))
