"""``inspect`` end to end through ``run()``: real documents, exit codes, JSON and text."""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.join.inspect import add_arguments, run
from tests.support.data import REAL as REAL_DIR

REAL = REAL_DIR
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
    skipped = [c["name"] for c in report["checks"] if c["status"] == "skipped"]
    assert skipped == ["signer_name", "chain", "nonce"]
    # The content is still shown to the operator (unverified), and the window still checked.
    assert report["vm_id"] == INDEX[TAMPERED]["vmId"]


REJECTED = [
    (
        "a wrong nonce is a nonce mismatch",
        ["--nonce", "not-the-nonce", "--at-created"],
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
    assert report["checks"][-1] == {
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


def test_json_object_without_signature_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "doc.json"
    bad.write_text('{"encoding": "pkcs7"}')
    code, _, err = _run("--attested", str(bad))
    assert code == 2 and "signature" in err


# ----------------------------------------------------------------------- token part


TID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
VM_RID = "/subscriptions/x/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm"


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    d = tmp_path_factory.mktemp("token")
    (d / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    return d / "token.jwt", d / "jwks.json", key


def _token(key: rsa.RSAPrivateKey, **over: Any) -> str:
    now = int(time.time())
    claims = {
        "aud": "https://management.azure.com/",
        "iss": f"https://sts.windows.net/{TID}/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "tid": TID,
        "oid": "11111111-2222-3333-4444-555555555555",
        "sub": "11111111-2222-3333-4444-555555555555",
        "xms_mirid": VM_RID,
    }
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


TOKENS = [
    ("a valid token is accepted", {}, 0, None),
    (
        "a token for another audience is rejected",
        {"aud": "https://example.com/"},
        1,
        "access_token_audience_invalid",
    ),
    ("an expired token is rejected", {"exp": int(time.time()) - 3600}, 1, "access_token_expired"),
]


@pytest.mark.parametrize(
    ("over", "exit_code", "code"),
    [(o, e, c) for _, o, e, c in TOKENS],
    ids=[i for i, _, _, _ in TOKENS],
)
def test_token(
    token_files: tuple[Path, Path, rsa.RSAPrivateKey],
    over: dict[str, Any],
    exit_code: int,
    code: str | None,
) -> None:
    token_path, jwks_path, key = token_files
    token = _token(key, **over)
    token_path.write_text(token)
    rc, out, _ = _run("--token", str(token_path), "--jwks", str(jwks_path), "--json")
    assert rc == exit_code
    report = json.loads(out)
    assert report["code"] == code
    assert token not in out  # a live credential is never echoed
    if code is None:
        assert report["token"]["tid"] == TID
