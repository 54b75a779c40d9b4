"""The strict DER reader (gateway/azure/der.py) and Azure's CMS shape (cms_shape.py).

What is not DER, or not a CMS SignedData, is ``attested_malformed``; CMS features Azure
never uses go to the general parser and come back identical to it; certificates are
loaded once per exact byte string, in a bounded cache. The differential property tests
against asn1crypto are in tests/security/test_der_differential.py.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable

import pytest
from asn1crypto import core as a_core

from gateway.azure import certs, cms_shape
from gateway.azure.cms import parse_signed_data
from gateway.azure.cms_shape import (
    CERT_CACHE_MAX,
    cached_certificate,
    fingerprint,
    read_signed_data,
)
from gateway.azure.der import DerError, read_oid, read_tlv
from gateway.core.errors import BadRequest, Code
from tests.security.test_properties import Tlv
from tests.security.test_properties import _parse as tlv_tree
from tests.support.cms_forge import Pki, forge, issue_leaf, make_pki
from tests.support.data import REAL_ATTESTED

REAL_DOC = REAL_ATTESTED / "attested-taskcluster-2026-07-28.json"


@pytest.fixture(scope="module")
def real_der() -> bytes:
    return base64.b64decode(json.loads(REAL_DOC.read_text())["signature"])


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


# ----------------------------------------------------------------------------- der.py


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"\x04\x02ab", (0x04, 2, 4), id="a short length"),
        pytest.param(b"\x04\x81\x80" + b"a" * 128, (0x04, 3, 131), id="a one-octet long length"),
        pytest.param(b"\x04\x82\x01\x00" + b"a" * 256, (0x04, 4, 260), id="a two-octet length"),
        pytest.param(b"\x05\x00", (0x05, 2, 2), id="an empty element"),
    ],
)
def test_well_formed_elements_are_read(data: bytes, expected: tuple[int, int, int]) -> None:
    assert read_tlv(data, 0, len(data)) == expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x30\x80\x04\x00\x00\x00", id="an indefinite length is BER"),
        pytest.param(b"\x04\x81\x05abcde", id="a long form for a length under 128"),
        pytest.param(b"\x04\x82\x00\x80" + b"a" * 128, id="a length with a leading zero octet"),
        pytest.param(b"\x04\x85\x00\x00\x00\x00\x01a", id="five length octets"),
        pytest.param(b"\x04\x84\xff\xff\xff\xff", id="a length of four gigabytes"),
        pytest.param(b"\x04\x05abc", id="a length past the end"),
        pytest.param(b"\x1f\x81\x00\x00", id="a multi-byte tag"),
        pytest.param(b"\x04", id="a header cut short"),
        pytest.param(b"\x04\x82\x01", id="length octets cut short"),
    ],
)
def test_what_is_not_der_is_refused(data: bytes) -> None:
    with pytest.raises(DerError):
        read_tlv(data, 0, len(data))


@pytest.mark.parametrize(
    "dotted",
    [
        pytest.param("1.2.840.113549.1.7.2", id="signedData"),
        pytest.param("1.2.840.113549.1.1.11", id="sha256WithRSAEncryption (Azure's digest quirk)"),
        pytest.param("2.16.840.1.101.3.4.2.1", id="sha256"),
        pytest.param("2.999.3", id="a first arc of 2 above 39"),
        pytest.param("0.9.2342.19200300.100.1.25", id="a first arc of 0"),
    ],
)
def test_oids_decode_as_asn1crypto_does(dotted: str) -> None:
    content = a_core.ObjectIdentifier(dotted).contents
    assert read_oid(content, 0, len(content)) == dotted


@pytest.mark.parametrize(
    "content",
    [pytest.param(b"", id="an empty OID"), pytest.param(b"\x2a\x86", id="an unterminated OID")],
)
def test_broken_oids_are_refused(content: bytes) -> None:
    with pytest.raises(DerError):
        read_oid(content, 0, len(content))


# ------------------------------------------------------------------------ cms_shape.py

Edit = Callable[[list[Tlv]], bytes]


def _encode(roots: list[Tlv]) -> bytes:
    return b"".join(t.encode() for t in roots)


def _signed_data(roots: list[Tlv]) -> list[Tlv]:
    children = roots[0].children[1].children[0].children  # type: ignore[index]
    assert children is not None
    return children


def _long_length(roots: list[Tlv]) -> bytes:
    _signed_data(roots)[2].length_form = "long"  # encapContentInfo
    return _encode(roots)


def _indefinite_signer_info(roots: list[Tlv]) -> bytes:
    _signed_data(roots)[4].children[0].length_form = "indefinite"  # type: ignore[index]
    return _encode(roots)


def _constructed_content(roots: list[Tlv]) -> bytes:
    wrapper = _signed_data(roots)[2].children[1]  # type: ignore[index]
    octets = wrapper.children[0]  # type: ignore[index]
    wrapper.children = [Tlv(0x24, children=[Tlv(0x04, octets.content)])]
    return _encode(roots)


def _detached(roots: list[Tlv]) -> bytes:
    _signed_data(roots)[2].children.pop(1)  # type: ignore[union-attr]
    return _encode(roots)


def _data_not_signed_data(roots: list[Tlv]) -> bytes:
    roots[0].children[0].content = a_core.ObjectIdentifier("1.2.840.113549.1.7.1").contents  # type: ignore[index]
    return _encode(roots)


def _content_not_data(roots: list[Tlv]) -> bytes:
    econtent_type = _signed_data(roots)[2].children[0]  # type: ignore[index]
    econtent_type.content = econtent_type.content[:-1] + b"\x00"  # id-data → ...1.7.0
    return _encode(roots)


def _no_signer_infos(roots: list[Tlv]) -> bytes:
    _signed_data(roots).pop(4)
    return _encode(roots)


def _junk_after_signed_data(roots: list[Tlv]) -> bytes:
    _signed_data(roots).append(Tlv(0x04, b"junk"))
    return _encode(roots)


def _signature_not_octets(roots: list[Tlv]) -> bytes:
    signer_info = _signed_data(roots)[4].children[0]  # type: ignore[index]
    signer_info.children[-1].tag = 0x03  # type: ignore[index]
    return _encode(roots)


MALFORMED: list[object] = [
    pytest.param(lambda r: _encode(r) + b"\x00", id="a trailing zero byte"),
    pytest.param(lambda r: _encode(r) + b"\x30\x00", id="a trailing empty SEQUENCE"),
    pytest.param(lambda r: _encode(r)[:-1], id="the last byte cut off"),
    pytest.param(lambda r: b"\x31" + _encode(r)[1:], id="a SET where ContentInfo is a SEQUENCE"),
    pytest.param(_long_length, id="a non-minimal length inside (BER, not DER)"),
    pytest.param(_indefinite_signer_info, id="an indefinite-length SignerInfo"),
    pytest.param(_constructed_content, id="content as a constructed OCTET STRING"),
    pytest.param(_detached, id="detached content"),
    pytest.param(_data_not_signed_data, id="a ContentInfo that is data, not SignedData"),
    pytest.param(_content_not_data, id="an eContentType other than id-data (unsigned)"),
    pytest.param(_no_signer_infos, id="no signerInfos SET at all"),
    pytest.param(_junk_after_signed_data, id="an element after signerInfos"),
    pytest.param(_signature_not_octets, id="a signature that is a BIT STRING"),
]


@pytest.mark.parametrize("edit", MALFORMED)
def test_outside_the_shape_is_attested_malformed(real_der: bytes, edit: Edit) -> None:
    with pytest.raises(BadRequest) as err:
        read_signed_data(edit(copy.deepcopy(tlv_tree(real_der))))
    assert err.value.code == Code.ATTESTED_MALFORMED


def test_ber_that_asn1crypto_reads_is_refused(real_der: bytes) -> None:
    """The strict reader is on the path: asn1crypto would take this document."""
    ber = _indefinite_signer_info(tlv_tree(real_der))
    assert parse_signed_data(ber).signer_infos
    with pytest.raises(BadRequest) as err:
        read_signed_data(ber)
    assert err.value.code == Code.ATTESTED_MALFORMED


@pytest.mark.parametrize(
    "suffix",
    [pytest.param(b"\n", id="a newline"), pytest.param(b" \r\n\t", id="ASCII whitespace")],
)
def test_trailing_whitespace_is_tolerated_as_before(real_der: bytes, suffix: bytes) -> None:
    assert read_signed_data(real_der + suffix) == read_signed_data(real_der)


def test_the_real_document_is_read_as_asn1crypto_reads_it(real_der: bytes) -> None:
    mine = read_signed_data(real_der)
    assert mine == parse_signed_data(real_der)
    assert len(mine.certificates) == 1
    assert len(mine.signer_infos) == 1
    # Azure's quirk, kept as sent: verification maps it to SHA-256.
    assert mine.signer_infos[0].digest_algorithm == "1.2.840.113549.1.1.11"
    assert mine.signer_infos[0].signed_attrs is None


@pytest.mark.parametrize(
    "forge_kwargs",
    [
        pytest.param({"signed_attrs": "correct"}, id="signed attributes (the general parser)"),
        pytest.param({"extra_signers": "leaf2"}, id="two SignerInfos (read, judged later)"),
        pytest.param({"certificates": "chain"}, id="the chain embedded"),
    ],
)
def test_other_cms_shapes_read_as_the_general_parser_reads_them(
    pki: Pki, forge_kwargs: dict[str, str]
) -> None:
    kwargs: dict[str, object] = dict(forge_kwargs)
    if "extra_signers" in kwargs:
        kwargs["extra_signers"] = [issue_leaf(pki.intermediate)]
    if "certificates" in kwargs:
        kwargs["certificates"] = [pki.leaf, pki.intermediate]
    der = base64.b64decode(forge(pki.leaf, **kwargs))  # type: ignore[arg-type]
    assert read_signed_data(der) == parse_signed_data(der)


def test_signed_attributes_keep_their_attributes(pki: Pki) -> None:
    der = base64.b64decode(forge(pki.leaf, signed_attrs="correct"))
    attrs = read_signed_data(der).signer_infos[0].signed_attrs
    assert attrs is not None
    assert attrs.message_digest is not None


def test_a_certificate_is_loaded_once_per_byte_string(real_der: bytes) -> None:
    first = read_signed_data(real_der).certificates[0]
    again = read_signed_data(bytes(real_der)).certificates[0]
    assert again is first
    assert fingerprint(first) == certs.fingerprint(first)


def test_the_certificate_cache_is_bounded(pki: Pki) -> None:
    leaves = [issue_leaf(pki.intermediate, key=pki.leaf.key) for _ in range(CERT_CACHE_MAX + 3)]
    loaded = [cached_certificate(leaf.der) for leaf in leaves]
    assert len(cms_shape._CERTS) <= CERT_CACHE_MAX
    assert len(cms_shape._FINGERPRINTS) <= CERT_CACHE_MAX
    # Evicted or not, every fingerprint is the certificate's own.
    assert [fingerprint(c) for c in loaded] == [certs.fingerprint(c) for c in loaded]


def test_a_certificate_claiming_x509_v8_is_attested_malformed(real_der: bytes) -> None:
    """cryptography raises InvalidVersion (not a ValueError) for it."""
    roots = tlv_tree(real_der)
    tbs = _signed_data(roots)[3].children[0].children[0]  # type: ignore[index]
    tbs.children[0] = Tlv(0xA0, children=[Tlv(0x02, b"\x07")])  # type: ignore[index]
    with pytest.raises(BadRequest) as err:
        read_signed_data(_encode(roots))
    assert err.value.code == Code.ATTESTED_MALFORMED
