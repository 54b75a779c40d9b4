"""Stateless, tamper-evident, single-use challenges (DESIGN §2).

A challenge is 24 bytes rendered as 32 base64url characters — exactly the IMDS nonce
limit (https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service,
"nonce ... up to 32 characters"); Azure accepts ``-`` and ``_`` in it. Layout::

    0      key id    first byte of SHA-256(key): picks the verifying key cheaply
    1..4   expiry    uint32, seconds since the epoch, big-endian
    5..11  random    56 bits: with the expiry, no two challenges collide in practice
    12..23 tag       HMAC-SHA256(key, bytes 0..11), first 96 bits

Issuing writes nothing anywhere, so any replica can check a challenge another one
issued. The keys file is shared by the replicas: the first key signs, every key
verifies, so a new key is rolled out first as a second line, then moved to the top,
and the old one removed after one challenge lifetime.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.core.clock import Clock
from gateway.core.errors import Code, JoinRejected
from gateway.core.files import SECRET_MODE, write_atomic
from gateway.protocol import CHALLENGE_ALPHABET, CHALLENGE_LENGTH

__all__ = [
    "CHALLENGE_LENGTH",
    "ChallengeCodec",
    "IssuedChallenge",
    "generate_key",
    "load_keys_file",
    "promote_key",
    "retire_keys",
    "stage_key",
    "write_keys_file",
    "write_new_keys_file",
]

_RAW_LENGTH = 24
_TAG_LENGTH = 12
_MIN_KEY_BYTES = 32
_HEAD = struct.Struct(">BI")  # key id, expiry
_EXPIRY = struct.Struct(">I")


@dataclass(frozen=True)
class IssuedChallenge:
    value: str
    expires_at: float

    def expires_at_rfc3339(self) -> str:
        # The expiry is whole seconds: gmtime loses nothing, at half datetime's CPU.
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))


class _Key:
    __slots__ = ("_mac", "id", "secret")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.id = hashlib.sha256(secret).digest()[0]
        # The key's HMAC state (its inner and outer pads), keyed once: each tag copies it
        # instead of keying a new HMAC (about half the CPU; hmac.digest is slower here).
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def tag(self, body: bytes) -> bytes:
        """HMAC-SHA256(secret, body), first 96 bits."""
        mac = self._mac.copy()
        mac.update(body)
        return mac.digest()[:_TAG_LENGTH]


class ChallengeCodec:
    """Parameters:

    * keys — secrets, at least 32 bytes each; ``keys[0]`` signs, all verify.
    * ttl — lifetime of an issued challenge, seconds.
    * clock — injected wall clock.
    """

    def __init__(self, keys: Sequence[bytes], *, ttl: float, clock: Clock) -> None:
        if not keys:
            raise ValueError("at least one challenge key is needed")
        for k in keys:
            if len(k) < _MIN_KEY_BYTES:
                raise ValueError(f"challenge keys must be at least {_MIN_KEY_BYTES} bytes")
        self._keys = [_Key(k) for k in keys]
        self._ttl = ttl
        self._clock = clock

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def ttl(self) -> float:
        return self._ttl

    def issue(self) -> IssuedChallenge:
        key = self._keys[0]
        expires = int(self._clock.time() + self._ttl)
        body = _HEAD.pack(key.id, expires) + secrets.token_bytes(7)
        value = base64.urlsafe_b64encode(body + key.tag(body)).decode("ascii")
        return IssuedChallenge(value=value, expires_at=float(expires))

    def verify(self, value: str) -> float:
        """Check format, MAC and expiry; return the expiry (epoch seconds).

        Raises ``JoinRejected`` with ``challenge_invalid`` (format, MAC, retired key) or
        ``challenge_expired``. Single use is the replay store's job, after verification.
        """
        if len(value) != CHALLENGE_LENGTH or not CHALLENGE_ALPHABET.issuperset(value):
            raise JoinRejected(Code.CHALLENGE_INVALID, "challenge is not 32 base64url characters")
        try:
            raw = base64.urlsafe_b64decode(value)
        except (binascii.Error, ValueError) as exc:  # pragma: no cover - alphabet checked
            raise JoinRejected(Code.CHALLENGE_INVALID, "challenge does not decode") from exc
        body, tag = raw[:-_TAG_LENGTH], raw[-_TAG_LENGTH:]
        for key in self._keys:
            if key.id != body[0]:
                continue
            if hmac.compare_digest(key.tag(body), tag):
                break
        else:
            raise JoinRejected(
                Code.CHALLENGE_INVALID, "challenge MAC does not verify under any current key"
            )
        (expires,) = _EXPIRY.unpack_from(body, 1)
        if self._clock.time() > expires:
            raise JoinRejected(Code.CHALLENGE_EXPIRED, f"challenge expired at {expires}")
        return float(expires)

    def __repr__(self) -> str:
        return f"<ChallengeCodec keys={len(self._keys)} ttl={self._ttl}s>"


def generate_key() -> bytes:
    return secrets.token_bytes(_MIN_KEY_BYTES)


def load_keys_file(path: Path) -> list[bytes]:
    """One base64 (standard or url-safe) secret per line; ``#`` comments and blanks ignored."""
    keys: list[bytes] = []
    for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: not base64") from exc
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"{path}:{lineno}: key shorter than {_MIN_KEY_BYTES} bytes")
        keys.append(key)
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


def write_new_keys_file(path: Path, *, keep_existing: bool = True) -> None:
    """Put a fresh key first (it signs from now on); keep the old ones to verify."""
    old = load_keys_file(path) if keep_existing and path.exists() else []
    write_keys_file(path, [generate_key(), *old])


def stage_key(path: Path) -> None:
    """Rotation step 1: append a fresh key, which only *verifies* until promoted."""
    write_keys_file(path, [*load_keys_file(path), generate_key()])


def promote_key(path: Path) -> None:
    """Rotation step 2: the last key moves to the top and signs from now on."""
    keys = load_keys_file(path)
    if len(keys) < 2:
        raise ValueError(f"{path}: nothing to promote (one key)")
    write_keys_file(path, [keys[-1], *keys[:-1]])


def retire_keys(path: Path) -> int:
    """Rotation step 3: keep only the signing key; returns how many were removed."""
    keys = load_keys_file(path)
    write_keys_file(path, keys[:1])
    return len(keys) - 1


def write_keys_file(path: Path, keys: Sequence[bytes]) -> None:
    lines = ["# join-gateway challenge keys: the first signs, all verify"]
    lines += [base64.b64encode(k).decode("ascii") for k in keys]
    # A secret shared by the replicas: 0600, and a crash leaves the old file or the new.
    write_atomic(path, ("\n".join(lines) + "\n").encode("ascii"), mode=SECRET_MODE)
