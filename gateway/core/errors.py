"""Typed errors with stable codes.

Every rejection the gateway makes is a :class:`GatewayError` carrying one of the
:class:`Code` values below. The code is part of the API (the README's table is
generated from :data:`CODES`); the HTTP status follows from the subclass. One
middleware (``gateway.http.middleware``) renders them; nothing else builds an
error body.

A ``JoinRejected`` message is what the client sees, so it never says more than an
operator would want an attacker to learn. ``detail`` is the full reason, and goes
only to the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

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
]


class Code(StrEnum):
    # 400: the request itself is malformed
    MALFORMED_BODY = "malformed_body"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    ATTESTED_MALFORMED = "attested_malformed"
    ACCESS_TOKEN_MALFORMED = "access_token_malformed"
    INVALID_FORWARDED_HEADER = "invalid_forwarded_header"
    # 403: evidence or policy rejected
    CHALLENGE_INVALID = "challenge_invalid"
    CHALLENGE_EXPIRED = "challenge_expired"
    CHALLENGE_REUSED = "challenge_reused"
    TOKEN_WRONG_METHOD = "token_wrong_method"
    TOKEN_EXPIRED = "token_expired"
    ROLE_NOT_ALLOWED = "role_not_allowed"
    ATTESTED_SIGNATURE_INVALID = "attested_signature_invalid"
    ATTESTED_DIGEST_UNSUPPORTED = "attested_digest_unsupported"
    ATTESTED_SIGNER_INVALID = "attested_signer_invalid"
    ATTESTED_CHAIN_UNTRUSTED = "attested_chain_untrusted"
    ATTESTED_CONTENT_INVALID = "attested_content_invalid"
    ATTESTED_EXPIRED = "attested_expired"
    NONCE_MISMATCH = "nonce_mismatch"
    ACCESS_TOKEN_INVALID = "access_token_invalid"
    ACCESS_TOKEN_EXPIRED = "access_token_expired"
    ACCESS_TOKEN_KEY_UNKNOWN = "access_token_key_unknown"
    ACCESS_TOKEN_ISSUER_INVALID = "access_token_issuer_invalid"
    ACCESS_TOKEN_AUDIENCE_INVALID = "access_token_audience_invalid"
    TENANT_NOT_ALLOWED = "tenant_not_allowed"
    IDENTITY_UNSUPPORTED = "identity_unsupported"
    SUBSCRIPTION_MISMATCH = "subscription_mismatch"
    VM_BINDING_FAILED = "vm_binding_failed"
    NOT_ALLOWED = "not_allowed"
    HOST_LOCKED = "host_locked"
    # 404
    UNKNOWN_TOKEN = "unknown_token"
    NOT_FOUND = "not_found"
    # 405
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # 408
    BODY_TIMEOUT = "body_timeout"
    # 413
    BODY_TOO_LARGE = "body_too_large"
    # 429 / 503 (retryable, with Retry-After)
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"
    AZURE_BUDGET_EXHAUSTED = "azure_budget_exhausted"
    REPLAY_STORE_UNAVAILABLE = "replay_store_unavailable"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    SHUTTING_DOWN = "shutting_down"
    # 502
    UPSTREAM_FAILED = "upstream_failed"
    # 500
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class CodeInfo:
    status: int
    retryable: bool
    summary: str


# The one table of codes: status, whether an agent should retry, and the README text.
CODES: dict[Code, CodeInfo] = {
    Code.MALFORMED_BODY: CodeInfo(400, False, "Body is not a UTF-8 JSON object."),
    Code.INVALID_REQUEST: CodeInfo(
        400, False, "Body fails the schema: unknown field, wrong type, or length out of bounds."
    ),
    Code.UNSUPPORTED_MEDIA_TYPE: CodeInfo(400, False, "Content-Type is not application/json."),
    Code.ATTESTED_MALFORMED: CodeInfo(
        400, False, "attested_data is not base64 of a CMS SignedData, or its content is not JSON."
    ),
    Code.ACCESS_TOKEN_MALFORMED: CodeInfo(
        400, False, "access_token is not a well-formed JWT (three base64url parts, JSON header)."
    ),
    Code.INVALID_FORWARDED_HEADER: CodeInfo(
        400, False, "A trusted proxy sent a Forwarded/X-Forwarded-For header that does not parse."
    ),
    Code.CHALLENGE_INVALID: CodeInfo(
        403, False, "Challenge was not issued by this gateway (bad format, MAC or retired key)."
    ),
    Code.CHALLENGE_EXPIRED: CodeInfo(403, True, "Challenge is past its expiry: ask for a new one."),
    Code.CHALLENGE_REUSED: CodeInfo(
        403, True, "Challenge was already redeemed: ask for a new one."
    ),
    Code.TOKEN_WRONG_METHOD: CodeInfo(403, False, "The named token's join_method is not azure."),
    Code.TOKEN_EXPIRED: CodeInfo(403, False, "The named token has expired."),
    Code.ROLE_NOT_ALLOWED: CodeInfo(403, False, "The token does not allow the requested role."),
    Code.ATTESTED_SIGNATURE_INVALID: CodeInfo(
        403, False, "The attested document's signature does not verify."
    ),
    Code.ATTESTED_DIGEST_UNSUPPORTED: CodeInfo(
        403, False, "The attested document uses a digest other than SHA-256."
    ),
    Code.ATTESTED_SIGNER_INVALID: CodeInfo(
        403,
        False,
        "The signer is missing, ambiguous, or not named for the cloud's metadata domain.",
    ),
    Code.ATTESTED_CHAIN_UNTRUSTED: CodeInfo(
        403, False, "The signer's certificate does not chain to a pinned root."
    ),
    Code.ATTESTED_CONTENT_INVALID: CodeInfo(
        403, False, "The signed content lacks a field or has a malformed vmId/subscriptionId/date."
    ),
    Code.ATTESTED_EXPIRED: CodeInfo(
        403, True, "The attested document is outside its createdOn..expiresOn window."
    ),
    Code.NONCE_MISMATCH: CodeInfo(403, False, "The document's nonce is not the challenge."),
    Code.ACCESS_TOKEN_INVALID: CodeInfo(
        403, False, "The access token's signature, algorithm or claims do not verify."
    ),
    Code.ACCESS_TOKEN_EXPIRED: CodeInfo(403, True, "The access token is expired or not yet valid."),
    Code.ACCESS_TOKEN_KEY_UNKNOWN: CodeInfo(
        403, True, "The access token's signing key is not in the tenant's key set."
    ),
    Code.ACCESS_TOKEN_ISSUER_INVALID: CodeInfo(
        403, False, "The access token's issuer is not the cloud's issuer for its tenant."
    ),
    Code.ACCESS_TOKEN_AUDIENCE_INVALID: CodeInfo(
        403, False, "The access token is not for the cloud's Resource Manager audience."
    ),
    Code.TENANT_NOT_ALLOWED: CodeInfo(403, False, "The token's tenant is not an allowed tenant."),
    Code.IDENTITY_UNSUPPORTED: CodeInfo(
        403, False, "The token names no VM or scale set (xms_az_rid / xms_mirid)."
    ),
    Code.SUBSCRIPTION_MISMATCH: CodeInfo(
        403, False, "The token's resource and the document are in different subscriptions."
    ),
    Code.VM_BINDING_FAILED: CodeInfo(
        403, False, "Resource Manager says the document's vmId is not the token's VM."
    ),
    Code.NOT_ALLOWED: CodeInfo(403, False, "No allow rule of the token matches this VM."),
    Code.HOST_LOCKED: CodeInfo(
        403, False, "An operator locked this VM out (nodes lock); the agent stops renewing."
    ),
    Code.UNKNOWN_TOKEN: CodeInfo(404, False, "No token of that name."),
    Code.NOT_FOUND: CodeInfo(404, False, "No such endpoint."),
    Code.METHOD_NOT_ALLOWED: CodeInfo(405, False, "Method not allowed on this endpoint."),
    Code.BODY_TIMEOUT: CodeInfo(
        408, True, "The body did not arrive within the read timeout (slow or stalled client)."
    ),
    Code.BODY_TOO_LARGE: CodeInfo(413, False, "Body exceeds the size cap (64 KiB)."),
    Code.RATE_LIMITED: CodeInfo(
        429, True, "Too many requests from this client; honour Retry-After."
    ),
    Code.OVERLOADED: CodeInfo(503, True, "The gateway is shedding load; honour Retry-After."),
    Code.DEPENDENCY_UNAVAILABLE: CodeInfo(
        503, True, "An Azure dependency (Entra ID, AIA, Resource Manager) failed; retry later."
    ),
    Code.AZURE_BUDGET_EXHAUSTED: CodeInfo(
        503, True, "The gateway's Resource Manager read budget is spent; honour Retry-After."
    ),
    Code.REPLAY_STORE_UNAVAILABLE: CodeInfo(
        503, True, "The replay store (Redis) is unreachable; single use cannot be guaranteed."
    ),
    Code.UPSTREAM_UNAVAILABLE: CodeInfo(
        503, True, "The auth service is unreachable (circuit open); honour Retry-After."
    ),
    Code.SHUTTING_DOWN: CodeInfo(
        503, True, "This replica is draining and did not start the request: send it again."
    ),
    Code.UPSTREAM_FAILED: CodeInfo(502, True, "The auth service answered with an error."),
    Code.INTERNAL_ERROR: CodeInfo(500, True, "A bug: the gateway failed unexpectedly."),
}


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
