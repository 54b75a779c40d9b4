"""The auth service's side of the registration API: decoding, errors, idempotency digest.

The body and its rules are ``gateway.protocol``'s (the same field rules the gateway applied
to the join request): the auth service validates what it is sent on its own rather than
trusting the gateway's encoder, since it is the last line before a CA signs something.
Every refusal is a :class:`AuthServiceError` whose code is a
:class:`~gateway.protocol.RegisterCode`.
"""

from __future__ import annotations

import hashlib
import json

from gateway.protocol import RegisterCode, Registration, WireError
from gateway.protocol import decode_register_batch as _decode_batch
from gateway.protocol import decode_registration as _decode

__all__ = [
    "AuthServiceError",
    "ErrorCode",
    "decode_register_batch",
    "decode_registration",
    "request_digest",
]

# The registration API's codes, under the name this package has always exported.
ErrorCode = RegisterCode


class AuthServiceError(Exception):
    """An error the auth service answers with ``{"error": {"code", "message"}}``."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        # Seconds for the Retry-After header (a 503 the caller should retry later).
        self.retry_after = retry_after


def decode_registration(raw: bytes) -> Registration:
    """Decode and validate a register body; raises :class:`AuthServiceError` (400)."""
    try:
        return _decode(raw)
    except WireError as exc:
        raise AuthServiceError(400, RegisterCode(exc.code.value), exc.message) from exc


def decode_register_batch(raw: bytes) -> tuple[Registration, ...]:
    """Decode and validate a batch body; raises :class:`AuthServiceError` (400) for the
    whole batch: its size, a repeated idempotency key or any malformed item."""
    try:
        return _decode_batch(raw)
    except WireError as exc:
        raise AuthServiceError(400, RegisterCode(exc.code.value), exc.message) from exc


def request_digest(reg: Registration) -> str:
    """SHA-256 of the registration's canonical JSON: "same body" for idempotency.

    Labels are left out: they describe the VM, they are not what is certified, and a
    gateway that re-verifies an agent's resent join may read a newer VM record (a tag
    changed meanwhile) — that resend must get the stored answer, not a conflict. The
    host's labels catch up at its next join."""
    body = reg.to_json()
    body.pop("labels", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
