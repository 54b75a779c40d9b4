"""``inspect`` end to end through ``run()``: real documents, exit codes, JSON and text."""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.azure.attested import DOCUMENT_STEPS
from gateway.core.steps import step_names
from gateway.join.inspect import add_arguments, run
from tests.support.data import REAL as REAL_DIR
from tests.support.ids import (
    OTHER_SUBSCRIPTION,
    OTHER_TENANT,
    TENANT,
    identity_rid,
    storage_rid,
    vm_rid,
    vmss_rid,
)
from tests.support.minter import TokenMinter

REAL = REAL_DIR
DOC_STEPS = set(step_names(DOCUMENT_STEPS))
INDEX = {e["file"]: e for e in json.loads((REAL / "index.json").read_text())}
CURRENT = "attested-taskcluster-2026-07-28.json"
TAMPERED = "negative-taskcluster-tampered-signature-2019-12-13.json"
ALL_CAS = [str(p) for p in sorted((REAL / "ca").glob("*.pem"))]


def _run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="join-gateway inspect")
    add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = run(parser.parse_args(list(argv)), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _json(*argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = _run(*argv, "--json")
    return code, json.loads(out)


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (row,) = [c for c in report["checks"] if c["name"] == name]
    return row


def test_accepted_real_document_reports_every_field() -> None:
    entry = INDEX[CURRENT]
    code, report = _json(
        "--attested", str(REAL / "attested" / CURRENT), "--nonce", entry["nonce"], "--at-created"
    )
    assert code == 0
    assert report["verdict"] == "accepted" and report["code"] is None
    assert report["vm_id"] == entry["vmId"]
    assert report["subscription_id"] == entry["subscriptionId"]
    assert report["nonce"] == entry["nonce"]
    assert report["created_on"] == "2026-07-28T13:24:00+00:00"
    assert report["expires_on"] == "2026-07-28T19:24:00+00:00"
    assert report["signer"] == "metadata.azure.com"
    assert report["chain"][1].startswith("CN=Microsoft TLS G2 RSA CA OCSP 02,")
    names = [(c["name"], c["status"]) for c in report["checks"]]
    assert names == [
        ("challenge", "skipped"),
        ("possession", "skipped"),
        ("token", "skipped"),
        ("base64", "ok"),
        ("cms", "ok"),
        ("signer", "ok"),
        ("digest", "ok"),
        ("signature", "ok"),
        ("signer_name", "ok"),
        ("chain", "ok"),
        ("content", "ok"),
        ("window", "ok"),
        ("nonce", "ok"),
        ("access_token", "skipped"),
        ("identity", "skipped"),
        ("binding", "skipped"),
        ("rules", "skipped"),
        ("arm", "skipped"),
        ("rules_arm", "skipped"),
        ("labels", "skipped"),
        ("names", "skipped"),
    ]


def test_text_output_has_one_line_per_check() -> None:
    code, out, _ = _run("--attested", str(REAL / "attested" / CURRENT), "--at-created")
    assert code == 0
    assert "✓ signature: RSA PKCS#1 v1.5 over content" in out
    assert "- nonce: no expected nonce given" in out
    assert out.strip().endswith("ACCEPTED")


def test_tampered_document_is_rejected_with_the_signature_code() -> None:
    ca_args = [a for p in ALL_CAS for a in ("--ca-bundle", p)]
    code, report = _json(
        "--attested",
        str(REAL / "attested" / TAMPERED),
        "--at-created",
        "--no-require-subscription",
        *ca_args,
    )
    assert code == 1
    assert report["verdict"] == "rejected"
    assert report["code"] == "attested_signature_invalid"
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    assert [c["name"] for c in failed] == ["signature"]
    skipped = [
        c["name"] for c in report["checks"] if c["status"] == "skipped" and c["name"] in DOC_STEPS
    ]
    assert skipped == ["signer_name", "chain", "nonce"]
    # The content is still shown to the operator (unverified), and the window still checked.
    assert report["vm_id"] == INDEX[TAMPERED]["vmId"]


REJECTED = [
    (
        "a wrong nonce is a nonce mismatch",
        ["--nonce", "not-the-nonce", "--at-created"],
        "nonce_mismatch",
    ),
    (
        # Challenges are base64url: one in 64 begins with "-" (as a key id can make it).
        "a wrong nonce beginning with '-' is a nonce mismatch, not a usage error",
        ["--nonce=-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "--at-created"],
        "nonce_mismatch",
    ),
    ("today the 2026-07-28 document is untrusted (signer expired)", [], "attested_chain_untrusted"),
    (
        "at a time after expiresOn but while the signer is valid the document is expired",
        ["--at", "2026-07-29T00:00:00Z"],
        "attested_expired",
    ),
    (
        "in the usgov cloud the public signer is refused",
        ["--at-created", "--cloud", "usgov"],
        "attested_signer_invalid",
    ),
]


@pytest.mark.parametrize(
    ("extra", "expected"), [(a, c) for _, a, c in REJECTED], ids=[i for i, _, _ in REJECTED]
)
def test_rejections(extra: list[str], expected: str) -> None:
    code, report = _json("--attested", str(REAL / "attested" / CURRENT), *extra)
    assert code == 1
    assert report["code"] == expected


def test_bare_base64_file_is_accepted(tmp_path: Path) -> None:
    sig = json.loads((REAL / "attested" / CURRENT).read_text())["signature"]
    bare = tmp_path / "doc.b64"
    bare.write_text(sig + "\n")
    code, report = _json("--attested", str(bare), "--at-created")
    assert code == 0
    assert _check(report, "nonce") == {
        "name": "nonce",
        "status": "skipped",
        "detail": f"no expected nonce given (document has {INDEX[CURRENT]['nonce']!r})",
        "code": None,
    }


def test_garbage_document_is_rejected_as_malformed(tmp_path: Path) -> None:
    bad = tmp_path / "doc.json"
    bad.write_text(json.dumps({"encoding": "pkcs7", "signature": base64.b64encode(b"x").decode()}))
    code, report = _json("--attested", str(bad))
    assert code == 1
    assert report["code"] == "attested_malformed"


USAGE = [
    ("an unreadable file is a usage error", ["--attested", "/nonexistent/doc.json"]),
    ("no input at all is a usage error", []),
    ("a token without a JWKS is a usage error", ["--token", "/nonexistent/t.jwt"]),
    (
        "a CA bundle that does not exist is a usage error",
        ["--attested", str(REAL / "attested" / CURRENT), "--ca-bundle", "/nonexistent/ca.pem"],
    ),
    (
        "an --at that is not RFC 3339 is a usage error",
        ["--attested", str(REAL / "attested" / CURRENT), "--at", "yesterday"],
    ),
]


@pytest.mark.parametrize("argv", [a for _, a in USAGE], ids=[i for i, _ in USAGE])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    code, out, err = _run(*argv)
    assert code == 2
    assert out == ""
    assert err.startswith("inspect: ")


MALFORMED_FILES = [
    ("a JSON object without a signature", '{"encoding": "pkcs7"}'),
    ("an encoding other than pkcs7", '{"encoding": "jws", "signature": "AAAA"}'),
    ("a file that starts like JSON but is not", '{"encoding": "pkcs7", '),
    ("an empty file", "\n"),
    ("a JSON array", "[1, 2]"),
]


@pytest.mark.parametrize(
    "text", [t for _, t in MALFORMED_FILES], ids=[i for i, _ in MALFORMED_FILES]
)
def test_readable_but_wrong_document_is_a_rejection_not_a_usage_error(
    tmp_path: Path, text: str
) -> None:
    bad = tmp_path / "doc.json"
    bad.write_text(text)
    code, report = _json("--attested", str(bad))
    assert code == 1
    assert report["verdict"] == "rejected" and report["code"] == "attested_malformed"


# ----------------------------------------------------------------------- token part


@pytest.fixture
def jwks_file(minter: TokenMinter, tmp_path: Path) -> Path:
    return minter.write_jwks(tmp_path / "jwks.json")


TOKENS = [
    ("a valid token is accepted", {}, 0, None),
    (
        "a token for another audience is rejected",
        {"aud": "https://example.com/"},
        1,
        "access_token_audience_invalid",
    ),
    ("an expired token is rejected", {"exp": int(time.time()) - 3600}, 1, "access_token_expired"),
    (
        "a storage account's token names no VM",
        {"xms_mirid": storage_rid()},
        1,
        "identity_unsupported",
    ),
    (
        "a user-assigned identity's token without xms_az_rid says no VM",
        {"xms_mirid": identity_rid()},
        1,
        "identity_unsupported",
    ),
    (
        "a user-assigned identity's token for a scale set is accepted",
        {"xms_mirid": identity_rid(), "xms_az_rid": vmss_rid()},
        0,
        None,
    ),
    ("a token of a tenant not listed is rejected", {"tid": OTHER_TENANT}, 1, "issuer_or_tenant"),
    ("a text that is not a JWT is malformed", "not-a-jwt", 1, "access_token_malformed"),
    ("an empty token file is malformed", "", 1, "access_token_malformed"),
]


@pytest.mark.parametrize(
    ("over", "exit_code", "code"),
    [(o, e, c) for _, o, e, c in TOKENS],
    ids=[i for i, _, _, _ in TOKENS],
)
def test_token(
    minter: TokenMinter,
    jwks_file: Path,
    tmp_path: Path,
    over: dict[str, Any] | str,
    exit_code: int,
    code: str | None,
) -> None:
    token = over if isinstance(over, str) else minter.mint(now=time.time(), **over)
    token_path = tmp_path / "token.jwt"
    token_path.write_text(token)
    extra = ["--tenant", TENANT] if code == "issuer_or_tenant" else []
    rc, out, _ = _run("--token", str(token_path), "--jwks", str(jwks_file), "--json", *extra)
    report = json.loads(out)
    if code == "issuer_or_tenant":
        # Its issuer names its tenant, so the listed tenant decides: either code refuses.
        assert report["code"] in ("tenant_not_allowed", "access_token_issuer_invalid")
        assert rc == 1
        return
    assert rc == exit_code, report
    assert report["code"] == code
    if token:
        assert token not in out  # a live credential is never echoed
    if code is None:
        assert report["token"]["tid"] == TENANT
        # Without a document the binding cannot run; the rest say why they did not.
        assert _check(report, "identity")["status"] == "ok"
        assert _check(report, "binding")["detail"] == "not run: document skipped"


def _real_token(minter: TokenMinter, tmp_path: Path, **over: Any) -> Path:
    """A token minted at the real document's createdOn (inspect runs --at-created)."""
    entry = INDEX[CURRENT]
    created = datetime(2026, 7, 28, 13, 24, tzinfo=UTC).timestamp()
    path = tmp_path / "token.jwt"
    path.write_text(
        minter.mint(now=created, xms_mirid=vm_rid(subscription=entry["subscriptionId"]), **over)
    )
    return path


BINDING = [
    ("a token of the document's subscription binds", {}, 0, None),
    (
        "a token whose VM is in another subscription than the document is refused",
        {"xms_mirid": vm_rid(subscription=OTHER_SUBSCRIPTION)},
        1,
        "subscription_mismatch",
    ),
    (
        "a storage account's token is refused before any binding",
        {"xms_mirid": storage_rid()},
        1,
        "identity_unsupported",
    ),
]


@pytest.mark.parametrize(
    ("over", "exit_code", "code"),
    [(o, e, c) for _, o, e, c in BINDING],
    ids=[i for i, _, _, _ in BINDING],
)
def test_document_and_token_run_the_offline_binding(
    minter: TokenMinter,
    jwks_file: Path,
    tmp_path: Path,
    over: dict[str, Any],
    exit_code: int,
    code: str | None,
) -> None:
    entry = INDEX[CURRENT]
    token_path = _real_token(minter, tmp_path)
    if over:
        created = datetime(2026, 7, 28, 13, 24, tzinfo=UTC).timestamp()
        token_path.write_text(minter.mint(now=created, **over))
    rc, report = _json(
        "--attested",
        str(REAL / "attested" / CURRENT),
        "--nonce",
        entry["nonce"],
        "--at-created",
        "--token",
        str(token_path),
        "--jwks",
        str(jwks_file),
    )
    assert rc == exit_code, report
    assert report["code"] == code
    arm = _check(report, "arm")
    if code is None:
        assert _check(report, "binding")["status"] == "ok"
        # Offline: the ARM step is skipped, and the report says why.
        assert arm["status"] == "skipped"
        assert arm["detail"].startswith("offline: Resource Manager is not asked")
        assert report["resource_id"] == vm_rid(subscription=entry["subscriptionId"])
    else:
        assert arm["status"] == "skipped" and arm["detail"].startswith("not run:")


BAD_JWKS = [
    ("a JWKS file that is not JSON", "{not json"),
    ("a JWKS without a keys list", '{"kids": []}'),
    ("a JWKS whose keys are not RSA", '{"keys": [{"kid": "k1", "kty": "EC"}]}'),
]


@pytest.mark.parametrize("text", [t for _, t in BAD_JWKS], ids=[i for i, _ in BAD_JWKS])
def test_a_readable_but_wrong_jwks_refuses_the_token_for_an_unknown_key(
    minter: TokenMinter, tmp_path: Path, text: str
) -> None:
    (tmp_path / "jwks.json").write_text(text)
    (tmp_path / "token.jwt").write_text(minter.mint(now=time.time()))
    rc, report = _json(
        "--token", str(tmp_path / "token.jwt"), "--jwks", str(tmp_path / "jwks.json")
    )
    assert rc == 1
    assert report["code"] == "access_token_key_unknown"
    assert _check(report, "access_token")["status"] == "failed"
