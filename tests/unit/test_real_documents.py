"""Real Azure attested documents (tests/data/azure-real/): each gets its expected verdict.

Every document is long expired, so the clock is pinned to its own createdOn; each uses
its own nonce. With all the artefact CAs as extra trust, every genuine document verifies;
with only the bundled (current) trust, the 2024-2026 documents verify through the bundled
non-xsign intermediates and the Baltimore-era ones fail closed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.azure.attested import AttestedVerifier
from gateway.azure.certs import TrustStore
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import Code, GatewayError
from tests.support.data import REAL as REAL_DIR

REAL = REAL_DIR
INDEX: list[dict[str, Any]] = json.loads((REAL / "index.json").read_text())

# index.json's expected_verdict → the codes that satisfy it.
VERDICT_CODES: dict[str, set[Code]] = {
    "reject-bad-signature": {Code.ATTESTED_SIGNATURE_INVALID},
    "reject-untrusted-chain-and-wrong-cn": {
        Code.ATTESTED_SIGNER_INVALID,
        Code.ATTESTED_CHAIN_UNTRUSTED,
    },
}


def _created(entry: dict[str, Any]) -> datetime:
    return datetime.strptime(entry["createdOn"], "%m/%d/%y %H:%M:%S %z").astimezone(UTC)


def _signature(entry: dict[str, Any]) -> str:
    doc = json.loads((REAL / "attested" / entry["file"]).read_text())
    assert doc["encoding"] == "pkcs7"
    return str(doc["signature"])


def _verifier(entry: dict[str, Any], trust: TrustStore) -> AttestedVerifier:
    return AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=trust,
        aia=None,
        chain_cache=None,
        clock=FixedClock(_created(entry)),
        require_subscription=entry["subscriptionId"] is not None,
    )


@pytest.fixture(scope="module")
def full_trust() -> TrustStore:
    return TrustStore.load(sorted((REAL / "ca").glob("*.pem")))


@pytest.fixture(scope="module")
def bundled_trust() -> TrustStore:
    return TrustStore.load()


@pytest.mark.parametrize(
    "entry",
    INDEX,
    ids=[f"{e['file']} is {e['expected_verdict']}ed at its createdOn" for e in INDEX],
)
async def test_expected_verdict_with_artefact_cas(
    entry: dict[str, Any], full_trust: TrustStore
) -> None:
    verifier = _verifier(entry, full_trust)
    if entry["expected_verdict"] == "accept":
        doc = await verifier.verify(_signature(entry), expected_nonce=entry["nonce"])
        assert doc.nonce == entry["nonce"]
        assert doc.vm_id == entry["vmId"]
        assert doc.subscription_id == entry["subscriptionId"]
        assert doc.created_on == _created(entry)
        assert doc.expires_on == datetime.strptime(
            entry["expiresOn"], "%m/%d/%y %H:%M:%S %z"
        ).astimezone(UTC)
        assert doc.signer_cn == entry["signer_cn"]
        if entry["sku"] is not None:
            assert doc.sku == entry["sku"]
        # The issuer is index.json's; the root may differ (xsign and non-xsign issuing CAs
        # share subject and key, so either path is valid).
        assert doc.chain_subjects[1].startswith(f"CN={entry['signer_issuer_cn']},")
        assert doc.chain_subjects[0].split(",")[0] == f"CN={entry['signer_cn']}"
    else:
        with pytest.raises(GatewayError) as info:
            await verifier.verify(_signature(entry), expected_nonce=entry["nonce"])
        assert info.value.code in VERDICT_CODES[entry["expected_verdict"]]


def _issuer(entry: dict[str, Any]) -> str:
    return str(entry["signer_issuer_cn"])


BUNDLED_ISSUERS = {
    "Microsoft Azure RSA TLS Issuing CA 03",
    "Microsoft Azure RSA TLS Issuing CA 04",
    "Microsoft Azure RSA TLS Issuing CA 07",
    "Microsoft Azure RSA TLS Issuing CA 08",
    "Microsoft TLS G2 RSA CA OCSP 02",
    "Microsoft TLS G2 RSA CA OCSP 04",
}
GENUINE = [e for e in INDEX if e["expected_verdict"] == "accept"]
CURRENT = [e for e in GENUINE if _issuer(e) in BUNDLED_ISSUERS]
BALTIMORE = [e for e in GENUINE if "Baltimore" in e["chain_found_with_artifact_cas"]]


def test_the_partition_is_what_the_brief_says() -> None:
    assert {e["file"][-15:-5] for e in CURRENT} == {
        "2024-06-28",
        "2025-04-23",
        "2025-08-19",
        "2025-11-19",
        "2026-04-23",
        "2026-07-28",
    }
    assert len(BALTIMORE) == 4


@pytest.mark.parametrize(
    "entry", CURRENT, ids=[f"{e['file']} verifies with only the bundled trust" for e in CURRENT]
)
async def test_current_documents_verify_with_bundled_trust(
    entry: dict[str, Any], bundled_trust: TrustStore
) -> None:
    doc = await _verifier(entry, bundled_trust).verify(
        _signature(entry), expected_nonce=entry["nonce"]
    )
    assert doc.chain_subjects[1].startswith(f"CN={_issuer(entry)},")
    # Through the non-xsign issuing CAs, to a current Microsoft root (not DigiCert's xsign).
    assert doc.chain_subjects[-1].startswith(
        ("CN=Microsoft RSA Root Certificate Authority 2017,", "CN=Microsoft TLS RSA Root G2,")
    )


@pytest.mark.parametrize(
    "entry",
    BALTIMORE,
    ids=[f"{e['file']} (Baltimore) is untrusted with only the bundled trust" for e in BALTIMORE],
)
async def test_baltimore_documents_fail_closed_with_bundled_trust(
    entry: dict[str, Any], bundled_trust: TrustStore
) -> None:
    with pytest.raises(GatewayError) as info:
        await _verifier(entry, bundled_trust).verify(
            _signature(entry), expected_nonce=entry["nonce"]
        )
    assert info.value.code == Code.ATTESTED_CHAIN_UNTRUSTED


def test_bundle_is_current_and_pins_no_system_roots(bundled_trust: TrustStore) -> None:
    today = datetime(2026, 11, 24, tzinfo=UTC)
    for cert in (*bundled_trust.roots, *bundled_trust.intermediates):
        assert cert.not_valid_after_utc > today, cert.subject.rfc4514_string()
    roots = {r.subject.rfc4514_string().split(",")[0] for r in bundled_trust.roots}
    assert roots == {
        "CN=DigiCert Global Root G2",
        "CN=DigiCert Global Root CA",
        "CN=Microsoft RSA Root Certificate Authority 2017",
        "CN=Microsoft ECC Root Certificate Authority 2017",
        "CN=Microsoft TLS RSA Root G2",
    }


async def test_wrong_nonce_on_a_real_document_is_rejected(full_trust: TrustStore) -> None:
    entry = GENUINE[-1]
    with pytest.raises(GatewayError) as info:
        await _verifier(entry, full_trust).verify(_signature(entry), expected_nonce="other")
    assert info.value.code == Code.NONCE_MISMATCH


async def test_real_document_today_is_expired(full_trust: TrustStore) -> None:
    entry = GENUINE[-1]
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=full_trust,
        aia=None,
        chain_cache=None,
        clock=FixedClock(datetime(2026, 11, 24, tzinfo=UTC)),
    )
    with pytest.raises(GatewayError) as info:
        await verifier.verify(_signature(entry), expected_nonce=entry["nonce"])
    # Past the signer's not_after too: the chain check (earlier in the order) says so first.
    assert info.value.code == Code.ATTESTED_CHAIN_UNTRUSTED
