"""Access-token verification: one table of tokens signed with real keys made at test time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.azure.token import parse_jwks, peek_token, verify_access_token
from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, Code, GatewayError, JoinRejected

CLOUD = CLOUDS["public"]
NOW = 1_800_000_000.0
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "44444444-4444-4444-4444-444444444444"
SUB = "11111111-1111-1111-1111-111111111111"
VM_RID = (
    f"/subscriptions/{SUB}/resourcegroups/group1/providers/Microsoft.Compute/virtualMachines/web-1"
)
KID = "kid-main"


@dataclass(frozen=True)
class Keys:
    main: rsa.RSAPrivateKey
    other: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        main=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "aud": "https://management.azure.com/",
        "iss": f"https://sts.windows.net/{TENANT}/",
        "iat": int(NOW - 300),
        "nbf": int(NOW - 300),
        "exp": int(NOW + 3600),
        "tid": TENANT,
        "oid": "aaaaaaaa-0000-0000-0000-000000000001",
        "sub": "aaaaaaaa-0000-0000-0000-000000000001",
        "appid": "bbbbbbbb-0000-0000-0000-000000000002",
        "xms_mirid": VM_RID,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def rs256(k: Keys, payload: dict[str, Any], *, kid: str = KID, signer: str = "main") -> str:
    key = k.main if signer == "main" else k.other
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid, "x5t": kid})


def unsigned(payload: dict[str, Any]) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT', 'kid': KID})}.{b64json(payload)}."


def hs256_with_public_pem(k: Keys, payload: dict[str, Any]) -> str:
    # The classic confusion attack: HMAC keyed with the RSA public key's PEM.
    pem = k.main.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': KID})}.{b64json(payload)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def rs256_header_hs256_body(k: Keys, payload: dict[str, Any]) -> str:
    # Header claims RS256, signature is an HMAC: must fail on the signature.
    signing_input = f"{b64json({'alg': 'RS256', 'typ': 'JWT', 'kid': KID})}.{b64json(payload)}"
    mac = hmac.new(b"secret", signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def es256(k: Keys, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, k.ec, algorithm="ES256", headers={"kid": KID})


def tampered(k: Keys, payload: dict[str, Any]) -> str:
    token = rs256(k, payload)
    head, _, sig = token.split(".")
    forged = dict(payload, xms_mirid=VM_RID.replace("web-1", "db-1"))
    return f"{head}.{b64json(forged)}.{sig}"


Maker = Callable[[Keys], str]


def signed(**overrides: Any) -> Maker:
    return lambda k: rs256(k, claims(**overrides))


CASES: list[tuple[str, Maker, dict[str, Any], Code | None]] = [
    ("a valid token verifies", signed(), {}, None),
    (
        "an audience without the trailing slash is the same ARM resource",
        signed(aud="https://management.azure.com"),
        {},
        None,
    ),
    (
        "a token issued 23 hours ago is still accepted",
        signed(iat=int(NOW - 23 * 3600), nbf=int(NOW - 23 * 3600), exp=int(NOW + 3600)),
        {},
        None,
    ),
    ("a token expired 59 s ago is inside the leeway", signed(exp=int(NOW - 59)), {}, None),
    (
        "a token expired 61 s ago is rejected",
        signed(exp=int(NOW - 61)),
        {},
        Code.ACCESS_TOKEN_EXPIRED,
    ),
    (
        "a token expired an hour ago is rejected",
        signed(exp=int(NOW - 3600)),
        {},
        Code.ACCESS_TOKEN_EXPIRED,
    ),
    ("a token valid from 59 s ahead is inside the leeway", signed(nbf=int(NOW + 59)), {}, None),
    (
        "a token valid only from 61 s ahead is rejected",
        signed(nbf=int(NOW + 61)),
        {},
        Code.ACCESS_TOKEN_EXPIRED,
    ),
    (
        "a token issued in the future is rejected",
        signed(iat=int(NOW + 600)),
        {},
        Code.ACCESS_TOKEN_EXPIRED,
    ),
    (
        "a zero leeway makes one second past exp fatal",
        signed(exp=int(NOW - 1)),
        {"leeway": 0.0},
        Code.ACCESS_TOKEN_EXPIRED,
    ),
    ("alg none is refused", lambda k: unsigned(claims()), {}, Code.ACCESS_TOKEN_INVALID),
    (
        "HS256 keyed with the RSA public key PEM is refused",
        lambda k: hs256_with_public_pem(k, claims()),
        {},
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "an HMAC signature under an RS256 header does not verify",
        lambda k: rs256_header_hs256_body(k, claims()),
        {},
        Code.ACCESS_TOKEN_INVALID,
    ),
    ("an ES256 token is refused", lambda k: es256(k, claims()), {}, Code.ACCESS_TOKEN_INVALID),
    (
        "a token signed by another RSA key under a known kid is refused",
        lambda k: rs256(k, claims(), signer="other"),
        {},
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "a tampered payload does not verify",
        lambda k: tampered(k, claims()),
        {},
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "an unknown kid is reported as such",
        lambda k: rs256(k, claims(), kid="rotated"),
        {},
        Code.ACCESS_TOKEN_KEY_UNKNOWN,
    ),
    (
        "a tid that is not a GUID is refused",
        signed(tid="contoso.onmicrosoft.com"),
        {},
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "a tid with a path traversal is refused",
        signed(tid=f"{TENANT}/../x"),
        {},
        Code.ACCESS_TOKEN_INVALID,
    ),
    ("a token without tid is refused", signed(tid=_DROP), {}, Code.ACCESS_TOKEN_INVALID),
    (
        "a token for another audience is refused",
        signed(aud="https://graph.microsoft.com/"),
        {},
        Code.ACCESS_TOKEN_AUDIENCE_INVALID,
    ),
    (
        "an audience with a doubled slash is refused",
        signed(aud="https://management.azure.com//"),
        {},
        Code.ACCESS_TOKEN_AUDIENCE_INVALID,
    ),
    (
        "an audience list is refused",
        signed(aud=["https://management.azure.com/"]),
        {},
        Code.ACCESS_TOKEN_AUDIENCE_INVALID,
    ),
    (
        "a token issued for another tenant's issuer is refused",
        signed(iss=f"https://sts.windows.net/{OTHER_TENANT}/"),
        {},
        Code.ACCESS_TOKEN_ISSUER_INVALID,
    ),
    (
        "a v2 issuer is not the v1 issuer",
        signed(iss=f"https://login.microsoftonline.com/{TENANT}/v2.0"),
        {},
        Code.ACCESS_TOKEN_ISSUER_INVALID,
    ),
    ("a token without exp is refused", signed(exp=_DROP), {}, Code.ACCESS_TOKEN_INVALID),
    ("a token without nbf is refused", signed(nbf=_DROP), {}, Code.ACCESS_TOKEN_INVALID),
    ("a string exp is refused", signed(exp=str(int(NOW + 3600))), {}, Code.ACCESS_TOKEN_INVALID),
    ("a token without oid is refused", signed(oid=_DROP), {}, Code.ACCESS_TOKEN_INVALID),
    (
        "a tenant outside the allowed list is refused",
        signed(),
        {"allowed_tenants": [OTHER_TENANT]},
        Code.TENANT_NOT_ALLOWED,
    ),
    (
        "an allowed tenant listed in upper case is accepted",
        signed(),
        {"allowed_tenants": [TENANT.upper()]},
        None,
    ),
    (
        "the China cloud refuses a public-cloud token",
        signed(),
        {"cloud": CLOUDS["china"]},
        Code.ACCESS_TOKEN_ISSUER_INVALID,
    ),
]


@pytest.mark.parametrize(
    ("maker", "kwargs", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_verify_access_token(
    keys: Keys, maker: Maker, kwargs: dict[str, Any], expected: Code | None
) -> None:
    token = maker(keys)
    args: dict[str, Any] = {
        "keys": {KID: keys.main.public_key()},
        "cloud": CLOUD,
        "now": NOW,
    }
    args.update(kwargs)
    if expected is None:
        result = verify_access_token(token, **args)
        assert result.tid == TENANT
        assert result.xms_mirid == VM_RID
        assert result.xms_az_rid is None
    else:
        with pytest.raises(JoinRejected) as info:
            verify_access_token(token, **args)
        assert info.value.code == expected


def test_valid_token_claims_are_typed(keys: Keys) -> None:
    upper = TENANT.upper()
    token = rs256(
        keys, claims(tid=upper, iss=f"https://sts.windows.net/{upper}/", xms_az_rid=VM_RID)
    )
    result = verify_access_token(token, keys={KID: keys.main.public_key()}, cloud=CLOUD, now=NOW)
    assert result.tid == TENANT  # normalised to lower case
    assert result.aud == "https://management.azure.com/"
    assert result.exp == NOW + 3600
    assert result.appid == "bbbbbbbb-0000-0000-0000-000000000002"
    assert result.xms_az_rid == VM_RID


NOT_UTF8 = b64(bytes([0xFF, 0xFE]))
_PARTS = (b64json({"alg": "RS256", "kid": KID}), b64json({"tid": TENANT}), "c2ln")


def _with_part(n: int, text: str) -> str:
    """A token whose segment ``n`` (0 header, 1 payload, 2 signature) is ``text``."""
    return ".".join(text if i == n else part for i, part in enumerate(_PARTS))


MALFORMED: list[tuple[str, str]] = [
    ("an empty string", ""),
    ("one part", "abc"),
    ("two parts", "abc.def"),
    ("four parts", "a.b.c.d"),
    ("a header that is not base64url", "!!!.e30.c2ln"),
    ("a header that is not JSON", f"{b64(b'not json')}.e30.c2ln"),
    (
        "a payload that is a JSON array",
        f"{b64json({'alg': 'RS256', 'kid': KID})}.{b64json([1, 2])}.c2ln",
    ),
    (
        "a payload that is not UTF-8",
        f"{b64json({'alg': 'RS256', 'kid': KID})}.{NOT_UTF8}.c2ln",
    ),
    (
        "a signature with padding characters",
        f"{b64json({'alg': 'RS256', 'kid': KID})}.{b64json({'tid': TENANT})}.c2ln==",
    ),
    ("a token longer than 16 KiB", f"{b64json({'alg': 'RS256'})}.{'A' * 17000}.c2ln"),
    # Issue 8's 500s, as classes: each segment's base64 and JSON, whatever the segment.
    *(
        (f"a {what} segment of length 4k+1", _with_part(n, "c2lnb"))
        for n, what in enumerate(("header", "payload", "signature"))
    ),
    *(
        (f"a {what} nested 2,000 deep", _with_part(n, b64(b"[" * 2000 + b"]" * 2000)))
        for n, what in enumerate(("header", "payload"))
    ),
]


@pytest.mark.parametrize("token", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_tokens_are_bad_requests(keys: Keys, token: str) -> None:
    with pytest.raises(BadRequest) as info:
        verify_access_token(token, keys={KID: keys.main.public_key()}, cloud=CLOUD, now=NOW)
    assert info.value.code == Code.ACCESS_TOKEN_MALFORMED
    with pytest.raises(GatewayError) as info2:
        peek_token(token)
    assert info2.value.code == Code.ACCESS_TOKEN_MALFORMED


PEEK: list[tuple[str, dict[str, Any], dict[str, Any], Code | None]] = [
    ("a GUID tid is lowercased", {"alg": "RS256", "kid": "k"}, {"tid": TENANT.upper()}, None),
    (
        "a tid with a slash never reaches a URL",
        {"alg": "RS256", "kid": "k"},
        {"tid": "../x"},
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "a numeric tid is refused",
        {"alg": "RS256", "kid": "k"},
        {"tid": 7},
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "a header without kid is refused",
        {"alg": "RS256"},
        {"tid": TENANT},
        Code.ACCESS_TOKEN_INVALID,
    ),
    ("a header without alg is refused", {"kid": "k"}, {"tid": TENANT}, Code.ACCESS_TOKEN_INVALID),
]


@pytest.mark.parametrize(
    ("header", "payload", "expected"), [p[1:] for p in PEEK], ids=[p[0] for p in PEEK]
)
def test_peek_token(header: dict[str, Any], payload: dict[str, Any], expected: Code | None) -> None:
    token = f"{b64json(header)}.{b64json(payload)}.c2ln"
    if expected is None:
        view = peek_token(token)
        assert (view.kid, view.alg, view.tid) == ("k", "RS256", TENANT)
    else:
        with pytest.raises(JoinRejected) as info:
            peek_token(token)
        assert info.value.code == expected


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    jwk = {"kty": "RSA", "use": "sig", "kid": kid, "n": b64(n), "e": b64(e)}
    jwk.update(extra)
    return jwk


def test_parse_jwks_keeps_only_rsa_signing_keys(keys: Keys) -> None:
    # Deliberately weak: the point is that parse_jwks drops it.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    no_use = rsa_jwk(keys.other, "no-use")
    del no_use["use"]  # "use" is optional in a JWK
    doc: dict[str, Any] = {
        "keys": [
            rsa_jwk(keys.main, "good"),
            no_use,
            {"kty": "EC", "use": "sig", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            rsa_jwk(keys.other, "enc", use="enc"),
            rsa_jwk(keys.other, "rs512", alg="RS512"),
            rsa_jwk(small, "small"),
            {"kty": "RSA", "use": "sig", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kty": "RSA", "use": "sig", "n": "AQAB", "e": "AQAB"},
            rsa_jwk(keys.other, "good"),  # duplicate kid: the first wins
            "not an object",
        ]
    }
    parsed = parse_jwks(doc)
    assert sorted(parsed) == ["good", "no-use"]
    assert parsed["good"].public_numbers() == keys.main.public_key().public_numbers()


@pytest.mark.parametrize(
    "doc",
    [{}, {"keys": "x"}, {"keys": {}}],
    ids=["no keys", "keys is a string", "keys is an object"],
)
def test_parse_jwks_rejects_documents_without_a_key_list(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_jwks(doc)


@pytest.mark.parametrize(
    ("part", "decoded"),
    [
        ("", b""),
        ("QQ", b"A"),
        ("QUI", b"AB"),
        ("QUJD", b"ABC"),
        ("-_-_", base64.urlsafe_b64decode("-_-_")),
        ("QUJDRA", b"ABCD"),
        ("a", None),  # 4k+1 characters: no base64 at all
        ("QQ==", None),  # padding is not base64url
        ("a+b/", None),  # the standard alphabet's two is not base64url's
        ("QU\nJD", None),
        ("QUJD\n", None),
        ("QU JD", None),
        ("QU.D", None),
        ("QU\u00e9D", None),
        ("\u212aUJD", None),  # KELVIN SIGN, not K
        ("QU\x00D", None),
        ("QU?D", None),
    ],
)
def test_a_jwt_segment_is_base64url_and_nothing_else(part: str, decoded: bytes | None) -> None:
    from gateway.azure.token import _b64url

    if decoded is None:
        with pytest.raises(BadRequest) as err:
            _b64url(part, "payload")
        assert err.value.code is Code.ACCESS_TOKEN_MALFORMED
    else:
        assert _b64url(part, "payload") == decoded
