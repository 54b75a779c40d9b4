"""The join API v1 (DESIGN §2): agent → gateway.

``POST /v1/join/azure/challenge`` takes an empty body (or ``{}``) and answers
``{"challenge", "expires_at"}``; ``POST /v1/join/azure`` takes the join body below and
answers ``{"host_id", "certs", "join"}``. Errors are ``{"error": {"code", "message"}}``
with a code of :data:`gateway.protocol.errors.CODES`.

Decoding is strict and cheap: unknown fields are refused, every string and list is
length-bounded, nothing is parsed twice, and the result is a frozen :class:`JoinRequest`;
the gateway never sees a dict from the wire. The agent builds its body with
:func:`build_join_body`, so both ends speak from this one definition.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.errors import Code, WireError
from gateway.protocol.types import (
    HostParams,
    JoinBlock,
    RegisterResult,
    check_fields,
    decode_host_params,
)
from gateway.protocol.validators import (
    MAX_TOKEN_NAME,
    invalid,
    is_token_name,
    require_str,
)

__all__ = [
    "CHALLENGE_ALPHABET",
    "CHALLENGE_LENGTH",
    "CHALLENGE_PATH",
    "JOIN_PATH",
    "MAX_BODY_BYTES",
    "ChallengeResponse",
    "JoinRequest",
    "JoinResponse",
    "build_join_body",
    "decode_challenge_request",
    "decode_join_request",
    "is_challenge",
    "parse_json_object",
]

CHALLENGE_PATH = "/v1/join/azure/challenge"
JOIN_PATH = "/v1/join/azure"
MAX_BODY_BYTES = 65536

# A challenge is the IMDS nonce, which Azure caps at 32 characters
# (https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service); the
# gateway's are base64url, whose "-" and "_" Azure accepts in a nonce.
CHALLENGE_LENGTH = 32
CHALLENGE_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# In a join body the challenge is only bounded; whether it is one of ours is the gateway's
# check (403 challenge_invalid), not the schema's.
_MAX_CHALLENGE_FIELD = 64
_MAX_ACCESS_TOKEN = 16384
_MAX_SIGNATURE = 32768
_MAX_INTERMEDIATES = 8
_MAX_INTERMEDIATE_B64 = 12000
_MAX_DEPTH = 8
_OPENERS = (b"{", b"[")

_JOIN_FIELDS = frozenset(
    {"token_name", "challenge", "attested_data", "intermediates", "access_token", "host"}
)
_JOIN_REQUIRED = _JOIN_FIELDS - {"intermediates"}
_ATTESTED_FIELDS = frozenset({"encoding", "signature"})


def is_challenge(value: object) -> bool:
    """``value`` can be an IMDS nonce: 1..32 base64url characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= CHALLENGE_LENGTH
        and set(value) <= CHALLENGE_ALPHABET
    )


@dataclass(frozen=True)
class ChallengeResponse:
    """The ``200`` body of the challenge endpoint."""

    challenge: str
    expires_at: str  # RFC 3339, UTC

    def to_json(self) -> dict[str, str]:
        return {"challenge": self.challenge, "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, body: object) -> ChallengeResponse:
        """Raises ``WireError`` when the body lacks a usable challenge."""
        if not isinstance(body, Mapping) or not is_challenge(body.get("challenge")):
            raise invalid("challenge response lacks a valid challenge")
        expires_at = body.get("expires_at")
        return cls(
            challenge=body["challenge"],
            expires_at=expires_at if isinstance(expires_at, str) else "",
        )


@dataclass(frozen=True)
class JoinRequest:
    """A decoded, schema-checked join body (nothing in it is trusted yet).

    ``client_address`` is not in the body: the receiver fills it in from the transport
    (or a trusted proxy's header) before decoding."""

    token_name: str
    challenge: str
    attested_signature: str
    intermediates: tuple[bytes, ...]
    access_token: str = field(repr=False)  # a live credential: never in a repr or a log
    host: HostParams
    client_address: str


@dataclass(frozen=True)
class JoinResponse:
    """The ``200`` body of the join endpoint: the auth service's answer plus who the
    gateway decided the VM is."""

    result: RegisterResult
    join: JoinBlock

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.result.host_id,
            "certs": self.result.to_json(),
            "join": self.join.to_json(),
        }


def _openers_at_most(raw: bytes, limit: int) -> bool:
    """``raw.count(b"[") + raw.count(b"{") <= limit``, found with ``bytes.find`` (memchr):
    two counting passes over a join body cost more than its ``json.loads``; this stops
    at the ``limit + 1``-th opener."""
    seen = 0
    for opener in _OPENERS:
        at = raw.find(opener)
        while at >= 0:
            seen += 1
            if seen > limit:
                return False
            at = raw.find(opener, at + 1)
    return True


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A UTF-8 JSON object nested at most 8 deep; raises ``WireError`` (malformed_body)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(Code.MALFORMED_BODY, "body is not UTF-8") from exc
    # Depth is bounded before json.loads recurses: a 64 KiB body of "[" is 65k levels.
    # Nesting cannot exceed the number of openers: a real join body has about five, so
    # the character walk runs only for bodies that could be too deep.
    if not _openers_at_most(raw, _MAX_DEPTH):
        depth = 0
        for ch in text:
            if ch in "[{":
                depth += 1
                if depth > _MAX_DEPTH:
                    raise WireError(Code.MALFORMED_BODY, f"JSON nested deeper than {_MAX_DEPTH}")
            elif ch in "]}":
                depth -= 1
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise WireError(Code.MALFORMED_BODY, "body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise WireError(Code.MALFORMED_BODY, "body is not a JSON object")
    return value


def decode_challenge_request(raw: bytes) -> None:
    """The challenge request is an empty body or ``{}``."""
    if raw.strip():
        obj = parse_json_object(raw)
        if obj:
            raise invalid("the challenge request takes no fields")


def decode_join_request(
    raw: bytes, *, client_address: str, max_bytes: int = MAX_BODY_BYTES
) -> JoinRequest:
    """The join body → :class:`JoinRequest`; raises ``WireError``."""
    if len(raw) > max_bytes:  # the HTTP layer caps too; this keeps the decoder safe alone
        raise WireError(Code.BODY_TOO_LARGE, f"body of {len(raw)} bytes > {max_bytes}")
    obj = parse_json_object(raw)
    check_fields(obj, _JOIN_FIELDS, _JOIN_REQUIRED, "body")

    token_name = require_str(obj, "token_name", "body", max_len=MAX_TOKEN_NAME)
    if not is_token_name(token_name):
        raise invalid("body.token_name has characters a token name cannot have")
    challenge = require_str(obj, "challenge", "body", max_len=_MAX_CHALLENGE_FIELD)
    access_token = require_str(obj, "access_token", "body", max_len=_MAX_ACCESS_TOKEN)

    attested = obj["attested_data"]
    if not isinstance(attested, dict):
        raise invalid("body.attested_data must be an object")
    check_fields(attested, _ATTESTED_FIELDS, _ATTESTED_FIELDS, "attested_data")
    if attested["encoding"] != "pkcs7":
        raise invalid("attested_data.encoding must be 'pkcs7'")
    signature = require_str(attested, "signature", "attested_data", max_len=_MAX_SIGNATURE)

    raw_intermediates = obj.get("intermediates", [])
    if not isinstance(raw_intermediates, list) or len(raw_intermediates) > _MAX_INTERMEDIATES:
        raise invalid(f"body.intermediates must be a list of at most {_MAX_INTERMEDIATES}")
    intermediates: list[bytes] = []
    for item in raw_intermediates:
        if not isinstance(item, str) or len(item) > _MAX_INTERMEDIATE_B64:
            raise invalid("body.intermediates items must be base64 DER certificates")
        try:
            intermediates.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise invalid("body.intermediates items must be base64 DER certificates") from exc

    return JoinRequest(
        token_name=token_name,
        challenge=challenge,
        attested_signature=signature,
        intermediates=tuple(intermediates),
        access_token=access_token,
        host=decode_host_params(obj["host"], "host", lists_required=False),
        client_address=client_address,
    )


def build_join_body(
    *,
    token_name: str,
    challenge: str,
    attested_data: Mapping[str, Any],
    access_token: str,
    host: HostParams,
    intermediates: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The join body the agent sends. ``intermediates`` (base64 DER) is left out when empty.

    ``attested_data`` is IMDS's answer as it came (``{"encoding", "signature"}``)."""
    body: dict[str, Any] = {
        "token_name": token_name,
        "challenge": challenge,
        "attested_data": dict(attested_data),
        "access_token": access_token,
        "host": host.to_json(),
    }
    if intermediates:
        body["intermediates"] = list(intermediates)
    return body
