"""Strict decoding of ``POST /v1/register`` bodies, and the auth service's errors.

The auth service validates what it is sent on its own, rather than trusting that the
gateway's encoder is right: it is the last line before a CA signs something. Unknown or
missing fields, wrong types, out-of-bound lengths, keys that do not parse or are weak,
and names that cannot be principals are all refused with a ``400`` naming the field.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import uuid
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.authservice.authority import is_dns_name
from gateway.join.forward import HostParams, JoinBlock, Registration

__all__ = [
    "AuthServiceError",
    "ErrorCode",
    "decode_registration",
    "request_digest",
]

MAX_LIST = 64
_ID = re.compile(r"^[A-Za-z0-9._~:+/=-]{1,128}$")
_ROLE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_PRINCIPAL = re.compile(r"^[\x21-\x7e]{1,253}$")  # printable ASCII, no spaces
_MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class ErrorCode:
    """The auth service's own error codes (its API, separate from the gateway's)."""

    MALFORMED_BODY = "malformed_body"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    BODY_TOO_LARGE = "body_too_large"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    HOST_LOCKED = "host_locked"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"
    # The caller's certificate is the wrong one for this endpoint (admin vs gateway).
    FORBIDDEN = "forbidden"


class AuthServiceError(Exception):
    """An error the auth service answers with ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str) -> AuthServiceError:
    return AuthServiceError(400, ErrorCode.INVALID_REQUEST, message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(value: object, where: str, fields: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    unknown = sorted(set(value) - fields)
    if unknown:
        raise _invalid(f"{where}: unknown field {unknown[0]!r}")
    missing = sorted(fields - set(value))
    if missing:
        raise _invalid(f"{where}: missing field {missing[0]!r}")
    return value


def _string(obj: dict[str, Any], key: str, where: str, *, max_len: int = 253) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _invalid(f"{where}.{key} must be a string")
    if not value or len(value) > max_len:
        raise _invalid(f"{where}.{key} must be 1..{max_len} characters")
    return value


def _guid(obj: dict[str, Any], key: str, where: str) -> str:
    value = _string(obj, key, where, max_len=36)
    try:
        uuid.UUID(value)
    except ValueError:
        raise _invalid(f"{where}.{key} must be a GUID") from None
    if len(value) != 36:
        raise _invalid(f"{where}.{key} must be a GUID in 8-4-4-4-12 form")
    return value


def _str_list(obj: dict[str, Any], key: str, where: str) -> list[str]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{where}.{key} must be a list of strings")
    if len(value) > MAX_LIST:
        raise _invalid(f"{where}.{key} has more than {MAX_LIST} entries")
    return value


def _ssh_key(value: str) -> str:
    if "\n" in value.strip() or len(value) > 16384:
        raise _invalid("host.public_ssh_key must be one OpenSSH public key line")
    try:
        key = serialization.load_ssh_public_key(value.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise _invalid("host.public_ssh_key is not an OpenSSH public key") from None
    _check_strength(key, "host.public_ssh_key")
    return value.strip()


def _tls_key(value: str) -> str:
    if "-----BEGIN PUBLIC KEY-----" not in value or len(value) > 16384:
        raise _invalid("host.public_tls_key must be a PEM SubjectPublicKeyInfo")
    try:
        key = serialization.load_pem_public_key(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise _invalid("host.public_tls_key is not a PEM public key") from None
    _check_strength(key, "host.public_tls_key")
    return value


def _check_strength(key: object, where: str) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise _invalid(f"{where}: RSA keys must be at least {_MIN_RSA_BITS} bits")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise _invalid(f"{where}: EC keys must be on P-256, P-384 or P-521")
        return
    raise _invalid(f"{where}: key type not supported (Ed25519, ECDSA or RSA)")


_TOP = frozenset({"idempotency_key", "token_name", "role", "client_address", "join", "host"})
_JOIN = frozenset({"method", "tenant", "subscription", "resource_group", "vm_id", "resource_id"})
_HOST = frozenset(
    {
        "node_name",
        "role",
        "public_ssh_key",
        "public_tls_key",
        "additional_principals",
        "dns_names",
    }
)


def decode_registration(raw: bytes) -> Registration:
    """Decode and validate a register body; raises :class:`AuthServiceError` (400)."""
    try:
        body = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise AuthServiceError(400, ErrorCode.MALFORMED_BODY, f"body is not JSON: {exc}") from None
    top = _object(body, "body", _TOP)

    key = _string(top, "idempotency_key", "body", max_len=128)
    if not _ID.match(key):
        raise _invalid("body.idempotency_key has characters outside [A-Za-z0-9._~:+/=-]")
    token_name = _string(top, "token_name", "body")
    role = _string(top, "role", "body", max_len=64)
    if not _ROLE.match(role):
        raise _invalid("body.role is not a role name")
    client_address = _string(top, "client_address", "body", max_len=64)
    try:
        ipaddress.ip_address(client_address)
    except ValueError:
        raise _invalid("body.client_address must be an IP address") from None

    j = _object(top["join"], "join", _JOIN)
    method = _string(j, "method", "join", max_len=32)
    if method != "azure":
        raise _invalid("join.method must be 'azure'")
    resource_id = _string(j, "resource_id", "join", max_len=1024)
    if not resource_id.lower().startswith("/subscriptions/"):
        raise _invalid("join.resource_id must be an ARM resource ID")
    join = JoinBlock(
        method=method,
        tenant=_guid(j, "tenant", "join"),
        subscription=_guid(j, "subscription", "join"),
        resource_group=_string(j, "resource_group", "join", max_len=90),
        vm_id=_guid(j, "vm_id", "join"),
        resource_id=resource_id,
    )

    h = _object(top["host"], "host", _HOST)
    node_name = _string(h, "node_name", "host")
    if not _PRINCIPAL.match(node_name):
        raise _invalid("host.node_name must be printable ASCII without spaces")
    host_role = _string(h, "role", "host", max_len=64)
    if host_role != role:
        raise _invalid("host.role must equal role")
    principals = _str_list(h, "additional_principals", "host")
    for p in principals:
        if not _PRINCIPAL.match(p):
            raise _invalid("host.additional_principals: each must be printable ASCII, 1..253")
    dns_names = _str_list(h, "dns_names", "host")
    for d in dns_names:
        if not is_dns_name(d):
            raise _invalid(f"host.dns_names: {d[:64]!r} is not a DNS name")
    host = HostParams(
        node_name=node_name,
        role=host_role,
        public_ssh_key=_ssh_key(_string(h, "public_ssh_key", "host", max_len=16384)),
        public_tls_key=_tls_key(_string(h, "public_tls_key", "host", max_len=16384)),
        additional_principals=tuple(principals),
        dns_names=tuple(dns_names),
    )
    return Registration(
        idempotency_key=key,
        token_name=token_name,
        role=role,
        client_address=client_address,
        join=join,
        host=host,
    )


def request_digest(reg: Registration) -> str:
    """SHA-256 of the registration's canonical JSON: "same body" for idempotency."""
    canonical = json.dumps(reg.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
