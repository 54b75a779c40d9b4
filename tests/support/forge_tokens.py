"""Test-only JWT forger: re-sign a real emulator token with changed claims or header.

Starting from a token the emulator minted keeps every claim Entra would send; each case
then changes exactly one thing and signs with a key the gateway does (or does not) trust,
so a rejection proves the check under test and not a side effect of a hand-built token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["b64url", "decode_part", "hs256_with", "replace_segments", "resign", "unsigned"]

Claims = dict[str, Any]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_part(part: str) -> Claims:
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(value, dict)
    return value


def _segments(token: str) -> tuple[Claims, Claims]:
    header_b64, payload_b64, _ = token.split(".")
    return decode_part(header_b64), decode_part(payload_b64)


def _encode(header: Claims, claims: Claims) -> str:
    return (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )


def resign(
    token: str,
    key: rsa.RSAPrivateKey,
    *,
    claims: Callable[[Claims], object] | None = None,
    header: Callable[[Claims], object] | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
) -> str:
    """``token`` with its claims/header edited in place by the callbacks, signed RSA PKCS#1
    v1.5 (SHA-256 unless ``hash_alg``) with ``key``."""
    h, c = _segments(token)
    if header:
        header(h)
    if claims:
        claims(c)
    signing_input = _encode(h, c)
    sig = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hash_alg or hashes.SHA256())
    return signing_input + "." + b64url(sig)


def unsigned(token: str, *, alg: str = "none") -> str:
    """The ``alg: none`` attack: same claims, header alg replaced, empty signature."""
    h, c = _segments(token)
    h["alg"] = alg
    return _encode(h, c) + "."


def hs256_with(token: str, secret: bytes) -> str:
    """The algorithm-confusion attack: HS256 with a public key's bytes as the HMAC secret."""
    h, c = _segments(token)
    h["alg"] = "HS256"
    signing_input = _encode(h, c)
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def replace_segments(
    token: str,
    *,
    header: bytes | None = None,
    payload: bytes | None = None,
    signature: str | None = None,
) -> str:
    """``token`` with raw segments swapped in: ``header``/``payload`` are the bytes to
    base64url-encode (any bytes, JSON or not), ``signature`` the segment text as sent."""
    h, c, sig = token.split(".")
    return ".".join(
        (
            b64url(header) if header is not None else h,
            b64url(payload) if payload is not None else c,
            signature if signature is not None else sig,
        )
    )
