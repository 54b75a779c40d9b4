"""Intermediates: the leaf and its AIA URL out of real Azure documents, and the allow list."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from cryptography.x509.oid import NameOID

from gateway.agent.intermediates import IntermediateCollector, aia_urls, certificates_from_attested
from gateway.agent.nodeconfig import DEFAULT_AIA_PREFIXES
from tests.support.data import REAL as REAL_DIR

REAL = REAL_DIR
INDEX: list[dict[str, Any]] = (
    json.loads((REAL / "index.json").read_text()) if (REAL / "index.json").exists() else []
)
ACCEPTED = [e for e in INDEX if e["expected_verdict"] == "accept"]


@pytest.mark.skipif(not ACCEPTED, reason="real Azure vectors not available")
@pytest.mark.parametrize("entry", ACCEPTED, ids=[f"leaf and AIA of {e['file']}" for e in ACCEPTED])
def test_the_leaf_and_its_aia_url_come_out_of_real_azure_documents(entry: dict[str, Any]) -> None:
    doc = json.loads((REAL / "attested" / entry["file"]).read_text())
    certs = certificates_from_attested(doc["signature"])
    assert len(certs) == entry["certificates_in_envelope"] == 1
    cn = certs[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == entry["signer_cn"]
    assert aia_urls(certs[0]) == entry["caIssuers_urls"]


async def test_every_recent_real_document_points_under_a_default_prefix() -> None:
    recent = [e for e in ACCEPTED if e["createdOn"][6:8] >= "23"]
    if not recent:
        pytest.skip("real Azure vectors not available")
    async with aiohttp.ClientSession() as s:
        collector = IntermediateCollector(s, allowed_prefixes=DEFAULT_AIA_PREFIXES)
        for e in recent:
            assert any(collector.allowed(u) for u in e["caIssuers_urls"]), e["file"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://www.microsoft.com/pkiops/certs/Microsoft%20Azure%20RSA%20TLS%20CA%2004.crt", True),
        ("http://caissuers.microsoft.com/pkiops/certs/Microsoft%20TLS%20G2%20RSA%20CA.crt", True),
        ("http://cacerts.digicert.com/DigiCertGlobalRootG2.crt", True),
        ("http://www.microsoft.com.evil.example/pkiops/certs/x.crt", False),
        ("http://www.microsoft.com/pki/mscorp/Microsoft%20RSA%20TLS%20CA%2001.crt", False),
        ("http://www.microsoft.com/pkiops/certs/../../../etc/x.crt", False),
        ("http://www.microsoft.com/pkiops/certs/x.crt?redirect=http://evil", False),
        ("http://www.microsoft.com/pkiops/certs/@evil.example/x.crt", False),
        ("https://evil.example/http://www.microsoft.com/pkiops/certs/x.crt", False),
        ("file:///etc/passwd", False),
    ],
    ids=[
        "Microsoft's pkiops path is allowed",
        "caissuers.microsoft.com is allowed",
        "DigiCert's cacerts host is allowed",
        "a look-alike host is refused",
        "an old path outside the list is refused",
        "a dot-dot escape from the prefix is refused",
        "a query string is refused",
        "an @ in the URL is refused",
        "an allowed URL embedded in another is refused",
        "a file URL is refused",
    ],
)
async def test_only_urls_under_allowed_prefixes_are_fetched(url: str, allowed: bool) -> None:
    async with aiohttp.ClientSession() as s:
        assert (
            IntermediateCollector(s, allowed_prefixes=DEFAULT_AIA_PREFIXES).allowed(url) is allowed
        )


@pytest.mark.parametrize(
    "signature",
    ["not base64!!", "aGVsbG8=", ""],
    ids=["garbage", "base64 of something that is not CMS", "empty"],
)
async def test_an_unreadable_document_yields_no_intermediates(signature: str) -> None:
    async with aiohttp.ClientSession() as s:
        collector = IntermediateCollector(s, allowed_prefixes=DEFAULT_AIA_PREFIXES)
        assert await collector.collect(signature) == ()
