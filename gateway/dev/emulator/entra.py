"""Entra ID as the gateway sees it: per-tenant signing keys, OIDC discovery, JWKS, v1 tokens.

Shapes follow https://learn.microsoft.com/entra/identity-platform/access-tokens and what
``login.microsoftonline.com/<tid>/.well-known/openid-configuration`` serves:

* v1 discovery: ``issuer`` = ``https://sts.windows.net/<tid>/``; ``jwks_uri`` per tenant.
* JWKS keys carry ``kty use kid x5t n e x5c``; ``kid`` equals ``x5t`` (base64url SHA-1 of the
  self-signed certificate in ``x5c``), as in Entra's v1 key set.
* Managed-identity tokens are v1 (``ver`` "1.0"), RS256, header ``typ alg x5t kid``, 24 h
  lifetime, ``appidacr`` "2", ``idtyp`` "app", ``sub`` = ``oid``.

One EC key is published next to the RSA keys so verifiers prove they drop non-RSA keys.
The module also verifies its own tokens for the emulated ARM (Azure's ARM trusts Entra).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "TOKEN_LIFETIME",
    "EntraTenant",
    "InvalidToken",
    "SigningKey",
    "b64url",
    "ec_jwk",
    "generate_ec_jwk_key",
    "generate_signing_key",
    "verify_emulated_token",
]

TOKEN_LIFETIME = 24 * 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    """One token-signing key: its RSA key, its self-signed certificate and the JWK."""

    kid: str
    key: rsa.RSAPrivateKey
    jwk: dict[str, Any] = field(repr=False)
    # precomputed JWT header segment (base64url of the header JSON)
    header_b64: str = field(repr=False)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"


def generate_signing_key(now: datetime) -> SigningKey:
    """An RSA-2048 key with a self-signed certificate, the way Entra publishes them."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "accounts.accesscontrol.windows.net")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now + timedelta(days=5 * 365))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    x5t = b64url(hashlib.sha1(der).digest())  # noqa: S324 - x5t is SHA-1 by definition (RFC 7517)
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "use": "sig",
        "kid": x5t,
        "x5t": x5t,
        "n": _int_b64(numbers.n),
        "e": _int_b64(numbers.e),
        "x5c": [base64.b64encode(der).decode("ascii")],
    }
    header = {"typ": "JWT", "alg": "RS256", "x5t": x5t, "kid": x5t}
    header_b64 = b64url(json.dumps(header, separators=(",", ":")).encode())
    return SigningKey(kid=x5t, key=key, jwk=jwk, header_b64=header_b64)


def generate_ec_jwk_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ec_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The decoy EC key published in every JWKS (never signs anything)."""
    numbers = key.public_key().public_numbers()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = b64url(hashlib.sha256(spki).digest()[:20])
    return {
        "kty": "EC",
        "use": "sig",
        "kid": kid,
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


class EntraTenant:
    """A tenant: its signing keys (first = current signer) and its documents.

    Parameters:
        tid: tenant GUID.
        issuer: ``https://sts.windows.net/<tid>/`` (or the sovereign cloud's).
        now: clock time for the first key's certificate.
    """

    def __init__(self, tid: str, *, issuer: str, now: datetime) -> None:
        self.tid = tid
        self.issuer = issuer
        self._keys: list[SigningKey] = [generate_signing_key(now)]
        # tenant creation date, as Entra's xms_tcdt claim
        self.created = int(now.timestamp()) - 400 * 86400

    @property
    def signer(self) -> SigningKey:
        return self._keys[0]

    @property
    def published(self) -> tuple[SigningKey, ...]:
        return tuple(self._keys)

    def rotate(self, now: datetime) -> SigningKey:
        """A new key signs from now on; the old ones stay published until :meth:`retire`."""
        key = generate_signing_key(now)
        self._keys.insert(0, key)
        return key

    def retire_old_keys(self) -> None:
        del self._keys[1:]

    def key_by_kid(self, kid: str) -> SigningKey | None:
        for key in self._keys:
            if key.kid == kid:
                return key
        return None

    def openid_configuration(self, base_url: str, *, v2: bool = False) -> dict[str, Any]:
        """The v1 discovery document (or the v2 one, whose issuer is
        ``<authority>/<tid>/v2.0`` and so never matches a v1 managed-identity token), with
        every endpoint on the emulator's HTTPS URL."""
        t = f"{base_url}/{self.tid}"
        if v2:
            return {
                "token_endpoint": f"{t}/oauth2/v2.0/token",
                "jwks_uri": f"{t}/discovery/v2.0/keys",
                "issuer": f"{t}/v2.0",
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "authorization_endpoint": f"{t}/oauth2/v2.0/authorize",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
            }
        return {
            "token_endpoint": f"{t}/oauth2/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{t}/discovery/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": [
                "code",
                "id_token",
                "code id_token",
                "token id_token",
                "token",
            ],
            "scopes_supported": ["openid"],
            "issuer": self.issuer,
            "microsoft_multi_refresh_token": True,
            "authorization_endpoint": f"{t}/oauth2/authorize",
            "device_authorization_endpoint": f"{t}/oauth2/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{t}/oauth2/logout",
            "claims_supported": [
                "sub",
                "iss",
                "cloud_instance_name",
                "cloud_instance_host_name",
                "cloud_graph_host_name",
                "msgraph_host",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "acr",
                "amr",
                "nonce",
                "email",
                "given_name",
                "family_name",
                "nickname",
            ],
            "check_session_iframe": f"{t}/oauth2/checksession",
            "userinfo_endpoint": f"{t}/openid/userinfo",
            "kerberos_endpoint": f"{t}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    def mint(
        self,
        *,
        now: float,
        audience: str,
        oid: str,
        appid: str,
        xms_mirid: str,
        xms_az_rid: str | None,
    ) -> tuple[str, int, int]:
        """A signed v1 access token; returns ``(jwt, iat, exp)``."""
        iat = int(now)
        exp = iat + TOKEN_LIFETIME
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.issuer,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "aio": b64url(secrets.token_bytes(48)),
            "appid": appid,
            "appidacr": "2",
            "idp": self.issuer,
            "idtyp": "app",
            "oid": oid,
            "rh": "0.A" + b64url(secrets.token_bytes(30)) + ".",
            "sub": oid,
            "tid": self.tid,
            "uti": b64url(uuid.uuid4().bytes)[:22],
            "ver": "1.0",
        }
        if xms_az_rid is not None:
            claims["xms_az_rid"] = xms_az_rid
        claims["xms_mirid"] = xms_mirid
        claims["xms_tcdt"] = self.created
        key = self.signer
        signing_input = (
            key.header_b64 + "." + b64url(json.dumps(claims, separators=(",", ":")).encode())
        ).encode("ascii")
        sig = key.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return signing_input.decode("ascii") + "." + b64url(sig), iat, exp

    def __repr__(self) -> str:
        return f"EntraTenant(tid={self.tid!r}, keys={[k.kid for k in self._keys]})"


class InvalidToken(Exception):
    """ARM rejects the bearer token; ``code`` is ARM's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def verify_emulated_token(
    jwt: str, *, tenants: dict[str, EntraTenant], audiences: tuple[str, ...], now: float
) -> dict[str, Any]:
    """What the emulated ARM does with a bearer token: signature, audience, lifetime.

    Written independently of the gateway's verifier (the emulator never imports it).
    """
    try:
        header_b64, payload_b64, sig_b64 = jwt.split(".")
        header = json.loads(_b64url_decode(header_b64))
        claims = json.loads(_b64url_decode(payload_b64))
        signature = _b64url_decode(sig_b64)
    except ValueError as exc:
        raise InvalidToken("InvalidAuthenticationToken", "The access token is invalid.") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("InvalidAuthenticationToken", "The access token is invalid.")
    tenant = tenants.get(str(claims.get("tid", "")))
    key = tenant.key_by_kid(str(header.get("kid", ""))) if tenant else None
    if tenant is None or key is None or header.get("alg") != "RS256":
        raise InvalidToken(
            "InvalidAuthenticationToken", "The access token is from the wrong issuer or key."
        )
    try:
        key.key.public_key().verify(
            signature,
            f"{header_b64}.{payload_b64}".encode("ascii"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature as exc:
        raise InvalidToken(
            "InvalidAuthenticationToken", "The access token has an invalid signature."
        ) from exc
    if claims.get("iss") != tenant.issuer:
        raise InvalidToken(
            "InvalidAuthenticationTokenTenant", "The access token is from the wrong issuer."
        )
    if claims.get("aud") not in audiences:
        raise InvalidToken(
            "InvalidAuthenticationTokenAudience",
            "The access token has been obtained for wrong audience or resource "
            f"'{claims.get('aud')}'.",
        )
    exp = claims.get("exp")
    nbf = claims.get("nbf", 0)
    if not isinstance(exp, int) or exp <= now:
        raise InvalidToken(
            "ExpiredAuthenticationToken",
            "The access token expiry UTC time is earlier than current UTC time.",
        )
    if not isinstance(nbf, int) or nbf > now + 300:
        raise InvalidToken("InvalidAuthenticationToken", "The access token is not yet valid.")
    return claims
