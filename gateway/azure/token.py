"""Managed-identity access tokens: peek, parse the tenant's key set, verify.

The token IMDS hands a VM is an Entra ID v1 JWT for the cloud's Resource Manager audience.
It is the half of the evidence that names *which* Azure resource is asking (``xms_az_rid``
/ ``xms_mirid``), so everything here is strict: RS256 only, the key from the tenant's
JWKS, the issuer and audience of the configured cloud, and the validity window checked
against the injected clock (PyJWT reads the system clock, so its time checks are off and
ours are on).

Everything in this module is pure and synchronous: the async JWKS fetching lives in
``gateway.azure.jwks``. Tokens are live credentials: nothing here logs them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from gateway.core.cloud import CloudProfile
from gateway.core.errors import BadRequest, Code, JoinRejected
from gateway.protocol import GUID_RE, normalize_guid  # re-exported: the one GUID rule

__all__ = [
    "GUID_RE",
    "MIN_RSA_BITS",
    "ReadToken",
    "TokenClaims",
    "TokenHeaderView",
    "normalize_guid",
    "parse_jwks",
    "peek_token",
    "read_token",
    "verify_access_token",
]

logger = logging.getLogger(__name__)

# Entra signs with RSA-2048; anything weaker in a key set is dropped, not trusted.
MIN_RSA_BITS = 2048
# A JWT from IMDS is a few KiB; the request body cap bounds it anyway, this bounds peeking.
_MAX_JWT_CHARS = 16 * 1024
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_REQUIRED_CLAIMS = ("exp", "iat", "nbf", "iss", "aud", "tid")
# RS256's parameters (stateless objects), made once rather than on every verify.
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
# Decoded header segments by their exact text (``_header``): at most this many, each at
# most this long (Entra's are ~200 characters).
_HEADERS_MAX = 64
_HEADER_MAX_CHARS = 1024
_HEADERS: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class TokenHeaderView:
    """What may be read from a token before its signature is checked: enough to find the key.

    ``tid`` is already validated as a GUID (and lowercased), because it goes into the
    OIDC discovery URL.
    """

    kid: str
    alg: str
    tid: str


@dataclass(frozen=True)
class TokenClaims:
    """The verified claims of a managed-identity access token (v1)."""

    tid: str  # lowercase GUID
    oid: str
    sub: str
    appid: str | None
    iss: str
    aud: str
    iat: float
    nbf: float
    exp: float
    # system-assigned identity: the VM / scale set; user-assigned: the identity resource
    xms_mirid: str | None
    # user-assigned identity: the Azure resource (VM / scale set) that asked for the token
    xms_az_rid: str | None


def _b64url(part: str, what: str) -> bytes:
    """One JWT segment's bytes. Every segment is decoded here, so no base64 error (a
    length of 4k+1 is no base64 at all) can leave this module as anything but ours."""
    # ``_B64URL_RE`` as two byte-table passes (a third of the cost): ASCII, and nothing
    # left once the alphabet is deleted; then ``urlsafe_b64decode``'s own steps, unwrapped.
    raw = part.encode("ascii", "replace")  # "?" is not in the alphabet
    if raw.translate(None, _B64URL_ALPHABET):
        raise BadRequest(Code.ACCESS_TOKEN_MALFORMED, detail=f"JWT {what} is not base64url")
    try:
        return binascii.a2b_base64(raw.translate(_URLSAFE_TO_STD) + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(
            Code.ACCESS_TOKEN_MALFORMED, detail=f"JWT {what} is not base64url"
        ) from exc


def _b64url_json(part: str, what: str) -> dict[str, Any]:
    raw = _b64url(part, what)
    try:
        value = json.loads(raw.decode("utf-8"))
    # RecursionError: "[[[[..." two thousand deep is valid base64url and valid JSON shape.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(
            Code.ACCESS_TOKEN_MALFORMED, detail=f"JWT {what} is not base64url JSON"
        ) from exc
    if not isinstance(value, dict):
        raise BadRequest(Code.ACCESS_TOKEN_MALFORMED, detail=f"JWT {what} is not a JSON object")
    return value


def _header(part: str) -> Mapping[str, Any]:
    """The header segment's JSON object. Entra's headers are a few fixed strings (one per
    signing key): a segment that decoded is remembered by its exact text (bounded; a
    segment that does not decode raises each time). Read-only: callers only look."""
    header = _HEADERS.get(part)
    if header is None:
        header = _b64url_json(part, "header")
        if len(part) <= _HEADER_MAX_CHARS:
            if len(_HEADERS) >= _HEADERS_MAX:
                del _HEADERS[next(iter(_HEADERS))]
            _HEADERS[part] = header
    return header


def _split(token: str) -> tuple[Mapping[str, Any], dict[str, Any], bytes]:
    if not isinstance(token, str) or not token or len(token) > _MAX_JWT_CHARS:
        raise BadRequest(Code.ACCESS_TOKEN_MALFORMED, detail="JWT is empty or too long")
    parts = token.split(".")
    # The signature part may be empty (an unsecured "alg": "none" JWS is well-formed); it
    # is then refused for its algorithm, with a 403, like any other algorithm but RS256.
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(Code.ACCESS_TOKEN_MALFORMED, detail="JWT does not have three parts")
    header = _header(parts[0])
    payload = _b64url_json(parts[1], "payload")
    return header, payload, _b64url(parts[2], "signature")


def peek_token(token: str) -> TokenHeaderView:
    """Read ``kid``, ``alg`` and ``tid`` without verifying anything.

    Raises ``BadRequest(ACCESS_TOKEN_MALFORMED)`` when the token is not a JWT at all, and
    ``JoinRejected(ACCESS_TOKEN_INVALID)`` when it is one but lacks a usable ``kid`` or its
    ``tid`` is not a GUID (a ``tid`` like ``../x`` must never reach a URL).
    """
    return _peek(token)[0]


@dataclass(frozen=True)
class ReadToken:
    """A token split and decoded once (``read_token``): its header view, its claims as
    sent (unverified) and its signature, for ``verify_access_token`` to verify without
    decoding the token a second time. Never logged: ``repr`` names the key only."""

    token: str = field(repr=False)
    view: TokenHeaderView
    payload: dict[str, Any] = field(repr=False)
    signature: bytes = field(repr=False)


def read_token(token: str) -> ReadToken:
    """``peek_token``, keeping what was decoded (raises as ``peek_token`` does)."""
    view, payload, signature = _peek(token)
    return ReadToken(token, view, payload, signature)


def _peek(token: str) -> tuple[TokenHeaderView, dict[str, Any], bytes]:
    header, payload, signature = _split(token)
    alg = header.get("alg")
    kid = header.get("kid")
    if not isinstance(alg, str):
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, "JWT header has no alg")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, "JWT header has no usable kid")
    tid = normalize_guid(payload.get("tid"))
    if tid is None:
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, "token tid is missing or not a GUID")
    return TokenHeaderView(kid=kid, alg=alg, tid=tid), payload, signature


def _b64url_uint(value: object) -> int:
    if not isinstance(value, str) or not value or not _B64URL_RE.fullmatch(value):
        raise ValueError("not a base64url integer")
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def parse_jwks(doc: Mapping[str, Any]) -> dict[str, RSAPublicKey]:
    """The RSA signing keys of a JWKS document, by ``kid``.

    Keys that are not RSA, are marked for another use than ``sig``, name another algorithm
    than RS256, are shorter than 2048 bits or do not parse are dropped (and logged by kid):
    a token naming one of them then fails as an unknown key. The first key wins a
    duplicate ``kid``.
    """
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list):
        raise ValueError("JWKS document has no 'keys' list")
    out: dict[str, RSAPublicKey] = {}
    for jwk in keys:
        if not isinstance(jwk, Mapping):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            continue
        if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
            logger.debug("JWKS key %s dropped: kty=%s use=%s", kid, jwk.get("kty"), jwk.get("use"))
            continue
        if jwk.get("alg", "RS256") != "RS256":
            logger.debug("JWKS key %s dropped: alg=%s", kid, jwk.get("alg"))
            continue
        if kid in out:
            logger.warning("JWKS has a duplicate kid %s; keeping the first", kid)
            continue
        try:
            key = RSAPublicNumbers(
                _b64url_uint(jwk.get("e")), _b64url_uint(jwk.get("n"))
            ).public_key()
        except (ValueError, binascii.Error) as exc:
            logger.warning("JWKS key %s dropped: %s", kid, exc)
            continue
        if key.key_size < MIN_RSA_BITS:
            logger.warning("JWKS key %s dropped: %d bits", kid, key.key_size)
            continue
        out[kid] = key
    return out


def _audience_ok(aud: str, expected: str) -> bool:
    # IMDS returns aud exactly as the resource was requested: an agent asking for
    # resource=https://management.azure.com/ gets the trailing slash, one asking for
    # https://management.azure.com gets none, and both name the same ARM resource
    # (https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/
    # how-to-use-vm-token). Accept exactly those two spellings, nothing looser.
    base = expected.rstrip("/")
    return aud in (base, base + "/")


def _issuer_ok(iss: str, cloud: CloudProfile, tid_as_sent: str, tid: str) -> bool:
    """``iss`` is the cloud's issuer for the tid as written or as normalised."""
    if iss == cloud.issuer_for(tid):
        return True
    return tid_as_sent != tid and iss == cloud.issuer_for(tid_as_sent)


def _number(payload: Mapping[str, Any], name: str) -> float:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JoinRejected(
            Code.ACCESS_TOKEN_INVALID, f"token claim {name} is missing or not a number"
        )
    return float(value)


def _opt_str(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    return _req_str(payload, name)


def _req_str(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise JoinRejected(
            Code.ACCESS_TOKEN_INVALID, f"token claim {name} is missing or not a string"
        )
    return value


def verify_access_token(
    token: str | ReadToken,
    *,
    keys: Mapping[str, RSAPublicKey],
    cloud: CloudProfile,
    now: float,
    leeway: float = 60.0,
    allowed_tenants: Collection[str] = (),
) -> TokenClaims:
    """Verify a managed-identity token against ``keys`` and return its claims.

    Order: shape, algorithm (RS256 only, from the header, and pinned again by verifying
    with RSASSA-PKCS1-v1_5 / SHA-256 and nothing else, as PyJWT's RS256 does), key,
    signature (per token: a verdict is never remembered), then claims. The
    validity window is checked against ``now`` with ``leeway``; ``iat`` may be old (IMDS
    caches tokens up to 24 h) but not in the future.

    Why not ``jwt.decode``: it re-validates every character of every segment in a Python
    generator — about a tenth of the gateway's CPU per join, measured — after ``_split``
    has already validated and decoded the same segments with a regular expression. The
    signature is checked over exactly those segments, so the claims read are the ones
    signed.

    ``token`` may be what ``read_token`` made of it (``TokenVerifier`` reads the header
    first to find the key): it is then not decoded again.
    """
    read = token if isinstance(token, ReadToken) else read_token(token)
    token, view, payload, signature = read.token, read.view, read.payload, read.signature
    if view.alg != "RS256":
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, f"token alg {view.alg!r} is not RS256")
    key = keys.get(view.kid)
    if key is None:
        raise JoinRejected(
            Code.ACCESS_TOKEN_KEY_UNKNOWN, f"no key {view.kid!r} in the tenant's JWKS"
        )
    signing_input = token.rpartition(".")[0].encode("ascii")
    try:
        key.verify(signature, signing_input, _PKCS1V15, _SHA256)
    except InvalidSignature:
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, "token signature does not verify") from None
    missing = [name for name in _REQUIRED_CLAIMS if name not in payload]
    if missing:
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, f"token lacks claim(s) {missing}")
    # Time, issuer and audience are checked below, against our clock, each with its code.

    tid = normalize_guid(payload.get("tid"))
    if tid is None:  # cannot differ from the peeked one, but never trust a second parse blindly
        raise JoinRejected(Code.ACCESS_TOKEN_INVALID, "token tid is not a GUID")
    iss = _req_str(payload, "iss")
    # Entra writes the tid in lowercase in both places; compare the issuer for the tid as
    # written and as normalised, so a tenant GUID in upper case cannot slip past either.
    if not _issuer_ok(iss, cloud, payload["tid"], tid):
        raise JoinRejected(
            Code.ACCESS_TOKEN_ISSUER_INVALID, f"iss {iss!r} is not {cloud.issuer_for(tid)!r}"
        )
    aud = payload.get("aud")
    if not isinstance(aud, str) or not _audience_ok(aud, cloud.arm_audience):
        raise JoinRejected(
            Code.ACCESS_TOKEN_AUDIENCE_INVALID, f"aud {aud!r} is not {cloud.arm_audience!r}"
        )
    exp = _number(payload, "exp")
    nbf = _number(payload, "nbf")
    iat = _number(payload, "iat")
    if now > exp + leeway:
        raise JoinRejected(Code.ACCESS_TOKEN_EXPIRED, f"token expired at {exp:.0f}, now {now:.0f}")
    if nbf > now + leeway:
        raise JoinRejected(
            Code.ACCESS_TOKEN_EXPIRED, f"token not valid before {nbf:.0f}, now {now:.0f}"
        )
    if iat > now + leeway:
        raise JoinRejected(Code.ACCESS_TOKEN_EXPIRED, f"token issued in the future ({iat:.0f})")
    # ``tid in allowed_tenants`` first: TokenVerifier passes a lowercase set already.
    if (
        allowed_tenants
        and tid not in allowed_tenants
        and tid not in {t.lower() for t in allowed_tenants}
    ):
        raise JoinRejected(Code.TENANT_NOT_ALLOWED, f"tenant {tid} is not an allowed tenant")

    return TokenClaims(
        tid=tid,
        oid=_req_str(payload, "oid"),
        sub=_req_str(payload, "sub"),
        appid=_opt_str(payload, "appid"),
        iss=iss,
        aud=aud,
        iat=iat,
        nbf=nbf,
        exp=exp,
        xms_mirid=_opt_str(payload, "xms_mirid"),
        xms_az_rid=_opt_str(payload, "xms_az_rid"),
    )
