"""Typed errors with stable codes.

Every rejection the gateway makes is a :class:`GatewayError` carrying one of the
:class:`Code` values of the protocol's table (``gateway.protocol.errors.CODES``, re-exported
here): the code is part of the API, and the HTTP status follows from the table. One
middleware (``gateway.http.middleware``) renders them; nothing else builds an
error body.

A ``JoinRejected`` message is what the client sees, so it never says more than an
operator would want an attacker to learn. ``detail`` is the full reason, and goes
only to the audit log.
"""

from __future__ import annotations

from gateway.protocol.errors import CODES, Code, CodeInfo, WireError

__all__ = [
    "CODES",
    "BadRequest",
    "BodyTimeout",
    "Code",
    "CodeInfo",
    "GatewayError",
    "JoinRejected",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "UnknownToken",
    "UpstreamFailed",
    "from_wire",
]


class GatewayError(Exception):
    """Base of every error the gateway renders. ``detail`` is for the audit log only."""

    status: int = 500

    def __init__(
        self,
        code: Code,
        message: str | None = None,
        *,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        info = CODES[code]
        self.code = code
        self.message = message or info.summary
        self.detail = detail or self.message
        self.retry_after = retry_after
        self.status = info.status
        super().__init__(f"{code}: {self.detail}")

    @property
    def retryable(self) -> bool:
        return CODES[self.code].retryable


def _ensure_status(code: Code, allowed: tuple[int, ...]) -> None:
    if CODES[code].status not in allowed:
        raise ValueError(f"code {code} has status {CODES[code].status}, not one of {allowed}")


class BadRequest(GatewayError):
    """400: the request is malformed."""

    def __init__(self, code: Code, message: str | None = None, *, detail: str | None = None):
        _ensure_status(code, (400,))
        super().__init__(code, message, detail=detail)


class JoinRejected(GatewayError):
    """403: evidence or policy rejected. ``message`` stays generic; ``detail`` is the reason."""

    def __init__(self, code: Code, detail: str | None = None):
        _ensure_status(code, (403,))
        super().__init__(code, None, detail=detail)


class UnknownToken(GatewayError):
    def __init__(self, detail: str | None = None):
        super().__init__(Code.UNKNOWN_TOKEN, None, detail=detail)


class NotFound(GatewayError):
    def __init__(self, code: Code = Code.NOT_FOUND, detail: str | None = None):
        _ensure_status(code, (404, 405))
        super().__init__(code, None, detail=detail)


class BodyTimeout(GatewayError):
    def __init__(self, detail: str | None = None):
        super().__init__(Code.BODY_TIMEOUT, None, detail=detail)


class PayloadTooLarge(GatewayError):
    def __init__(self, detail: str | None = None):
        super().__init__(Code.BODY_TOO_LARGE, None, detail=detail)


class Overloaded(GatewayError):
    """429/503: retryable; always carries ``retry_after`` seconds."""

    def __init__(self, code: Code, *, retry_after: float, detail: str | None = None):
        _ensure_status(code, (429, 503))
        super().__init__(code, None, detail=detail, retry_after=retry_after)


class UpstreamFailed(GatewayError):
    def __init__(self, detail: str | None = None, *, retry_after: float | None = None):
        super().__init__(Code.UPSTREAM_FAILED, None, detail=detail, retry_after=retry_after)


def from_wire(err: WireError) -> GatewayError:
    """The gateway's error for a body the protocol's decoders refused (400 or 413)."""
    if err.code is Code.BODY_TOO_LARGE:
        return PayloadTooLarge(err.message)
    return BadRequest(err.code, err.message)
