"""The emulator's attested documents have the structure of Azure's, field by field.

Real documents from ``tests/data/azure-real/attested/`` are parsed next to one the
emulator serves over IMDS, and every CMS field the verifier looks at is compared. The
emulated signature and chain are then verified here, with cryptography directly (not with
the gateway's verifier: the emulator must stand on its own).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.core.clock import FixedClock
from gateway.dev.emulator import AzureEmulator, EmulatedVm, Latency
from tests.support.data import REAL_ATTESTED

pytestmark = pytest.mark.integration

REAL = REAL_ATTESTED
NEWEST = REAL / "attested-taskcluster-2026-07-28.json"
REAL_DOCS = [
    REAL / "attested-taskcluster-2026-07-28.json",
    REAL / "attested-taskcluster-2025-11-19.json",
    REAL / "attested-taskcluster-2024-06-28.json",
]
NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
DATE_RE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d -0000$")
SUB = "8a205152-b25a-417f-a676-80465535a6c9"

def _der(doc_path: Path | None = None, body: dict[str, str] | None = None) -> bytes:
    wire = body if body is not None else json.loads(doc_path.read_text())  # type: ignore[union-attr]
    assert set(wire) == {"encoding", "signature"}
    assert wire["encoding"] == "pkcs7"
    return base64.b64decode(wire["signature"], validate=True)


def _shape(der: bytes, depth: int = 0) -> list[tuple[int, int, bool]]:
    """The envelope's DER skeleton: (depth, tag, constructed) for every element, not
    descending into certificates (different issuers) or the content (different JSON)."""
    out: list[tuple[int, int, bool]] = []
    i = 0
    while i < len(der):
        tag = der[i]
        length = der[i + 1]
        hl = 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(der[i + 2 : i + 2 + n], "big")
            hl = 2 + n
        body = der[i + hl : i + hl + length]
        constructed = bool(tag & 0x20)
        out.append((depth, tag, constructed))
        # certificates ([0] IMPLICIT SET inside SignedData) and OCTET STRINGs are leaves
        is_cert_set = tag == 0xA0 and depth == 3
        if constructed and not is_cert_set:
            out += _shape(body, depth + 1)
        i += hl + length
    return out


def _ordered_keys(content: bytes) -> list[Any]:
    def hook(pairs: list[tuple[str, Any]]) -> list[Any]:
        return [(k, v) for k, v in pairs]

    def keys(node: Any) -> list[Any]:
        return [(k, keys(v)) if isinstance(v, list) else k for k, v in node]

    return keys(json.loads(content, object_pairs_hook=hook))


def _envelope(der: bytes) -> dict[str, Any]:
    info = cms.ContentInfo.load(der)
    sd = info["content"]
    si = sd["signer_infos"][0]
    content = sd["encap_content_info"]["content"].native
    return {
        "content_type": info["content_type"].dotted,
        "version": sd["version"].native,
        "digest_algorithms": [
            (a["algorithm"].dotted, type(a["parameters"]).__name__) for a in sd["digest_algorithms"]
        ],
        "encap_content_type": sd["encap_content_info"]["content_type"].dotted,
        "content_embedded": isinstance(content, bytes),
        "certificates": [c.name for c in sd["certificates"]],
        "crls": isinstance(sd["crls"], core.Void),
        "signer_infos": len(sd["signer_infos"]),
        "si_version": si["version"].native,
        "sid_choice": si["sid"].name,
        "si_digest": (
            si["digest_algorithm"]["algorithm"].dotted,
            type(si["digest_algorithm"]["parameters"]).__name__,
        ),
        "si_signature_alg": (
            si["signature_algorithm"]["algorithm"].dotted,
            type(si["signature_algorithm"]["parameters"]).__name__,
        ),
        "signed_attrs_absent": isinstance(si["signed_attrs"], core.Void),
        "unsigned_attrs_absent": isinstance(si["unsigned_attrs"], core.Void),
        "signature_len": len(si["signature"].native),
        "content_keys": _ordered_keys(content),
        "shape": _shape(der),
    }


def _parts(der: bytes) -> tuple[bytes, bytes, x509.Certificate, Any]:
    sd = cms.ContentInfo.load(der)["content"]
    si = sd["signer_infos"][0]
    cert = x509.load_der_x509_certificate(sd["certificates"][0].chosen.dump())
    return (
        sd["encap_content_info"]["content"].native,
        si["signature"].native,
        cert,
        si["sid"].chosen,
    )


@pytest.fixture
async def emulated() -> AsyncIterator[tuple[AzureEmulator, EmulatedVm, aiohttp.ClientSession]]:
    async with AzureEmulator(latency=Latency.none(), clock=FixedClock(NOW)) as emu:
        tid = emu.add_tenant()
        vm = emu.add_vm(
            subscription=SUB, resource_group="rg", name="vm-1", tenant=tid, identity="user"
        )
        async with aiohttp.ClientSession() as session:
            yield emu, vm, session


async def _fetch(vm: EmulatedVm, session: aiohttp.ClientSession, nonce: str | None) -> bytes:
    params = {"api-version": "2025-04-07"}
    if nonce is not None:
        params["nonce"] = nonce
    async with session.get(
        vm.imds_url + "/metadata/attested/document", params=params, headers={"Metadata": "true"}
    ) as r:
        assert r.status == 200
        raw = await r.read()
    # IMDS's wire form is compact JSON with exactly these two keys, in this order
    assert raw.startswith(b'{"encoding":"pkcs7","signature":"')
    return _der(body=json.loads(raw))


ENVELOPE_FIELDS = [
    "content_type",
    "version",
    "digest_algorithms",
    "encap_content_type",
    "content_embedded",
    "certificates",
    "crls",
    "signer_infos",
    "si_version",
    "sid_choice",
    "si_digest",
    "si_signature_alg",
    "signed_attrs_absent",
    "unsigned_attrs_absent",
    "signature_len",
    "content_keys",
    "shape",
]


@pytest.mark.parametrize("real_doc", REAL_DOCS, ids=[p.stem for p in REAL_DOCS])
async def test_cms_envelope_matches_real_azure_field_by_field(
    emulated: tuple[AzureEmulator, EmulatedVm, aiohttp.ClientSession], real_doc: Path
) -> None:
    _, vm, session = emulated
    real = _envelope(_der(real_doc))
    ours = _envelope(await _fetch(vm, session, None))
    for name in ENVELOPE_FIELDS:
        assert ours[name] == real[name], f"{name}: emulated {ours[name]!r} != real {real[name]!r}"
    # the facts the README states, so a drift in both is caught too
    assert real["digest_algorithms"] == [("1.2.840.113549.1.1.11", "Null")]
    assert real["si_digest"] == ("1.2.840.113549.1.1.11", "Null")
    assert real["si_signature_alg"] == ("1.2.840.113549.1.1.1", "Null")
    assert real["certificates"] == ["certificate"]
    assert real["sid_choice"] == "issuer_and_serial_number"


@pytest.mark.parametrize(
    "nonce",
    [None, "0123456789abcdefghijKLMNOPQRST-_"],
    ids=["without a nonce", "with a 32-char nonce"],
)
async def test_content_is_compact_sorted_json_with_a_six_hour_window(
    emulated: tuple[AzureEmulator, EmulatedVm, aiohttp.ClientSession], nonce: str | None
) -> None:
    _, vm, session = emulated
    content, _, _, _ = _parts(await _fetch(vm, session, nonce))
    doc = json.loads(content)
    assert json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() == content
    assert list(doc) == sorted(doc)
    real_content, _, _, _ = _parts(_der(NEWEST))
    assert set(doc) == set(json.loads(real_content))
    stamp = doc["timeStamp"]
    assert DATE_RE.match(stamp["createdOn"])
    assert DATE_RE.match(stamp["expiresOn"])
    created = datetime.strptime(stamp["createdOn"], "%m/%d/%y %H:%M:%S -0000")
    expires = datetime.strptime(stamp["expiresOn"], "%m/%d/%y %H:%M:%S -0000")
    assert expires - created == timedelta(hours=6)
    assert created == NOW.replace(tzinfo=None)
    assert doc["nonce"] == (nonce if nonce else expires.strftime("%Y%m%d-%H%M%S"))
    assert doc["vmId"] == vm.vm_id
    assert doc["subscriptionId"] == SUB
    assert doc["plan"] == {"name": "", "product": "", "publisher": ""}


async def test_signature_is_pkcs1v15_over_sha256_of_the_content(
    emulated: tuple[AzureEmulator, EmulatedVm, aiohttp.ClientSession],
) -> None:
    _, vm, session = emulated
    content, signature, leaf, sid = _parts(await _fetch(vm, session, "abc"))
    key = leaf.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(signature, content, padding.PKCS1v15(), hashes.SHA256())
    # the sid names the embedded certificate
    assert sid["serial_number"].native == leaf.serial_number
    assert sid["issuer"].dump() == leaf.issuer.public_bytes()
    # and a changed content byte breaks it (the check above can fail)
    with pytest.raises(InvalidSignature):
        key.verify(signature, content.replace(b"abc", b"abd"), padding.PKCS1v15(), hashes.SHA256())


def _leaf_facts(leaf: x509.Certificate) -> dict[str, Any]:
    ext = leaf.extensions
    key = leaf.public_key()
    ku = ext.get_extension_for_class(x509.KeyUsage)
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    aia = ext.get_extension_for_class(x509.AuthorityInformationAccess).value
    return {
        "key": (
            type(key).__name__.lstrip("_"),
            key.key_size if isinstance(key, rsa.RSAPublicKey) else 0,
        ),
        "subject_oids": [a.oid.dotted_string for a in leaf.subject],
        "subject_string_types": [a._type for a in leaf.subject],
        "cn": leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value,
        "san_shape": [re.sub(r"^[a-z0-9]+\.", "<region>.", n) if n != san[-1] else n for n in san],
        "eku": list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value),
        "ku_critical": ku.critical,
        "ku": (ku.value.digital_signature, ku.value.key_encipherment, ku.value.key_cert_sign),
        "bc": (bc.critical, bc.value.ca),
        "aia_ca_issuers": sum(
            1 for d in aia if d.access_method.dotted_string == "1.3.6.1.5.5.7.48.2"
        )
        >= 1,
        "aki": ext.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER) is not None,
    }


async def test_leaf_matches_the_real_2026_leaf(
    emulated: tuple[AzureEmulator, EmulatedVm, aiohttp.ClientSession],
) -> None:
    emu, vm, session = emulated
    _, _, ours, _ = _parts(await _fetch(vm, session, None))
    _, _, real, _ = _parts(_der(NEWEST))
    real_facts, our_facts = _leaf_facts(real), _leaf_facts(ours)
    for name, value in real_facts.items():
        assert our_facts[name] == value, f"{name}: emulated {our_facts[name]!r} != real {value!r}"
    assert our_facts["key"] == ("RSAPublicKey", 2048)
    assert our_facts["cn"] == "metadata.azure.com"
    assert our_facts["eku"] == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ours.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "westeurope.metadata.azure.com",
        "metadata.azure.com",
    ]
    aia = ours.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [d.access_location.value for d in aia] == [emu.attestation_pki.aia_url]
    assert (
        emu.attestation_pki.aia_url
        == emu.aia_prefix + "Emulated%20Azure%20RSA%20TLS%20Issuing%20CA.crt"
    )
    lifetime = ours.not_valid_after_utc - ours.not_valid_before_utc
    assert timedelta(days=300) < lifetime <= timedelta(days=400)


async def test_leaf_chains_to_the_emulator_root_through_its_aia_url(
    emulated: tuple[AzureEmulator, EmulatedVm, aiohttp.ClientSession],
) -> None:
    emu, vm, session = emulated
    _, _, leaf, _ = _parts(await _fetch(vm, session, None))
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    async with session.get(aia[0].access_location.value) as r:
        assert r.status == 200
        intermediate = x509.load_der_x509_certificate(await r.read())
    root = x509.load_pem_x509_certificate(emu.attestation_root_pem)
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("metadata.azure.com"))
    )
    chain = verifier.verify(leaf, [intermediate])
    assert [c.subject for c in chain] == [leaf.subject, intermediate.subject, root.subject]
    assert intermediate.subject.rfc4514_string() == (
        "CN=Emulated Azure RSA TLS Issuing CA,O=Microsoft Corporation,C=US"
    )
    assert root.not_valid_after_utc > intermediate.not_valid_after_utc > leaf.not_valid_after_utc
    # another name does not verify (the check above can fail)
    wrong = (
        PolicyBuilder()
        .store(Store([root]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("metadata.azure.org"))
    )
    with pytest.raises(x509.verification.VerificationError):
        wrong.verify(leaf, [intermediate])


@pytest.mark.parametrize(
    "domain",
    ["metadata.azure.us", "metadata.azure.cn"],
    ids=["US Government leaf", "Azure China leaf"],
)
async def test_sovereign_cloud_leaf_names(domain: str) -> None:
    async with AzureEmulator(
        latency=Latency.none(), clock=FixedClock(NOW), cloud_domain=domain
    ) as emu:
        tid = emu.add_tenant()
        vm = emu.add_vm(
            subscription=SUB, resource_group="rg", name="v", tenant=tid, identity="system"
        )
        _, _, leaf, _ = _parts(emu.attested_der_for(vm, "n"))
        assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == domain
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"westeurope.{domain}", domain]
