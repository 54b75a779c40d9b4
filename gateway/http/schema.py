"""Typed decoding of the wire protocol's request bodies (DESIGN §2, step 1 of §3).

Decoding is strict and cheap: unknown fields are rejected, every string and list is
length-bounded, and nothing is parsed twice. The result is a frozen ``JoinRequest``;
the rest of the gateway never sees a dict from the wire.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

from gateway.core.errors import BadRequest, Code, PayloadTooLarge
from gateway.join.forward import HostParams
from gateway.join.pipeline import JoinRequest

__all__ = ["decode_challenge_request", "decode_join_request", "parse_json_object"]

_MAX_DEPTH = 8
# Patterns are applied with fullmatch: with match(), "$" also matches before a trailing
# newline, so "web-1\n" passed and reached the auth service's certificates.
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,253}$")
# RFC 1123 host label characters; node names are hostnames in Teleport.
_NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
# additional_principals: hostnames or IP addresses (v4, v6) — what Teleport puts in certs.
_PRINCIPAL = re.compile(r"^[A-Za-z0-9:.-]{1,253}$")
# dns_names end up as DNS SANs of the node's certificate: plain hostnames only.
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_ROLES = frozenset(
    {"Node", "Proxy", "Kube", "App", "Db", "WindowsDesktop", "Discovery", "Instance"}
)

_JOIN_FIELDS = frozenset(
    {"token_name", "challenge", "attested_data", "intermediates", "access_token", "host"}
)
_JOIN_REQUIRED = _JOIN_FIELDS - {"intermediates"}
_HOST_FIELDS = frozenset(
    {"node_name", "role", "public_ssh_key", "public_tls_key", "additional_principals", "dns_names"}
)
_HOST_REQUIRED = frozenset({"node_name", "role", "public_ssh_key", "public_tls_key"})


def _bad(message: str) -> BadRequest:
    return BadRequest(Code.INVALID_REQUEST, message)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(Code.MALFORMED_BODY, "body is not UTF-8") from exc
    # Depth is bounded before json.loads recurses: a 64 KiB body of "[" is 65k levels.
    # Nesting cannot exceed the number of openers, counted in C: a real join body has
    # about five, so the character walk runs only for bodies that could be too deep.
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:
        depth = 0
        for ch in text:
            if ch in "[{":
                depth += 1
                if depth > _MAX_DEPTH:
                    raise BadRequest(Code.MALFORMED_BODY, f"JSON nested deeper than {_MAX_DEPTH}")
            elif ch in "]}":
                depth -= 1
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(Code.MALFORMED_BODY, "body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise BadRequest(Code.MALFORMED_BODY, "body is not a JSON object")
    return value


def _fields(
    obj: Mapping[str, Any], allowed: frozenset[str], required: frozenset[str], where: str
) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise _bad(f"unknown field(s) in {where}: {', '.join(sorted(unknown))[:200]}")
    missing = required - set(obj)
    if missing:
        raise _bad(f"missing field(s) in {where}: {', '.join(sorted(missing))}")


def _str(obj: Mapping[str, Any], key: str, *, max_len: int, min_len: int = 1) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _bad(f"{key} must be a string")
    if not min_len <= len(value) <= max_len:
        raise _bad(f"{key} must be {min_len}..{max_len} characters")
    return value


def _str_list(
    obj: Mapping[str, Any], key: str, *, max_items: int, pattern: re.Pattern[str]
) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise _bad(f"{key} must be a list")
    if len(value) > max_items:
        raise _bad(f"{key} has more than {max_items} items")
    for item in value:
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise _bad(f"{key} items must be names or addresses")
    return tuple(value)


def decode_challenge_request(raw: bytes) -> None:
    """The challenge request is an empty body or ``{}``."""
    if raw.strip():
        obj = parse_json_object(raw)
        if obj:
            raise _bad("the challenge request takes no fields")


def decode_join_request(raw: bytes, *, client_address: str, max_bytes: int = 65536) -> JoinRequest:
    if len(raw) > max_bytes:  # the HTTP layer caps too; this keeps the decoder safe alone
        raise PayloadTooLarge(f"body of {len(raw)} bytes > {max_bytes}")
    obj = parse_json_object(raw)
    _fields(obj, _JOIN_FIELDS, _JOIN_REQUIRED, "body")

    token_name = _str(obj, "token_name", max_len=254)
    if not _TOKEN_NAME.fullmatch(token_name):
        raise _bad("token_name has characters a token name cannot have")
    challenge = _str(obj, "challenge", max_len=64)
    access_token = _str(obj, "access_token", max_len=16384)

    attested = obj["attested_data"]
    if not isinstance(attested, dict):
        raise _bad("attested_data must be an object")
    _fields(
        attested,
        frozenset({"encoding", "signature"}),
        frozenset({"encoding", "signature"}),
        "attested_data",
    )
    if attested["encoding"] != "pkcs7":
        raise _bad("attested_data.encoding must be 'pkcs7'")
    signature = _str(attested, "signature", max_len=32768)

    raw_intermediates = obj.get("intermediates", [])
    if not isinstance(raw_intermediates, list) or len(raw_intermediates) > 8:
        raise _bad("intermediates must be a list of at most 8 certificates")
    intermediates: list[bytes] = []
    for item in raw_intermediates:
        if not isinstance(item, str) or len(item) > 12000:
            raise _bad("intermediates items must be base64 DER certificates")
        try:
            intermediates.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise _bad("intermediates items must be base64 DER certificates") from exc

    host = obj["host"]
    if not isinstance(host, dict):
        raise _bad("host must be an object")
    _fields(host, _HOST_FIELDS, _HOST_REQUIRED, "host")
    node_name = _str(host, "node_name", max_len=253)
    if not _NODE_NAME.fullmatch(node_name):
        raise _bad("host.node_name must be a hostname")
    role = _str(host, "role", max_len=32)
    if role not in _ROLES:
        raise _bad(f"host.role must be one of {sorted(_ROLES)}")
    ssh_key = _str(host, "public_ssh_key", max_len=4096)
    tls_key = _str(host, "public_tls_key", max_len=8192)
    _check_public_keys(ssh_key, tls_key)

    return JoinRequest(
        token_name=token_name,
        challenge=challenge,
        attested_signature=signature,
        intermediates=tuple(intermediates),
        access_token=access_token,
        host=HostParams(
            node_name=node_name,
            role=role,
            public_ssh_key=ssh_key,
            public_tls_key=tls_key,
            additional_principals=_str_list(
                host, "additional_principals", max_items=32, pattern=_PRINCIPAL
            ),
            dns_names=_str_list(host, "dns_names", max_items=32, pattern=_DNS_NAME),
        ),
        client_address=client_address,
    )


def _check_public_keys(ssh_key: str, tls_key: str) -> None:
    """Reject keys the auth service could not certify, before any costly check runs.

    Mirrors the reference auth service's rules (one OpenSSH line; Ed25519, ECDSA on
    P-256/384/521 or RSA >= 2048 bits): a key it refuses would otherwise pass every Azure
    check, spend ARM budget and a challenge, and come back as a 502."""
    if "\n" in ssh_key.strip() or "\r" in ssh_key:
        raise _bad("host.public_ssh_key must be one OpenSSH public key line")
    try:
        ssh = load_ssh_public_key(ssh_key.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as exc:
        raise _bad("host.public_ssh_key is not a supported OpenSSH public key") from exc
    if "-----BEGIN PUBLIC KEY-----" not in tls_key:
        raise _bad("host.public_tls_key must be a PEM SubjectPublicKeyInfo")
    try:
        tls = load_pem_public_key(tls_key.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as exc:
        raise _bad("host.public_tls_key is not a supported PEM public key") from exc
    _check_strength(ssh, "host.public_ssh_key")
    _check_strength(tls, "host.public_tls_key")


_MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _check_strength(key: object, where: str) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise _bad(f"{where}: RSA keys must be at least {_MIN_RSA_BITS} bits")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise _bad(f"{where}: EC keys must be on P-256, P-384 or P-521")
        return
    raise _bad(f"{where}: key type not supported (Ed25519, ECDSA or RSA)")
