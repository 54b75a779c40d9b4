"""Error codes of the join API v1 and of the registration API: the one table.

Every answer the gateway gives a joining node that is not a ``200`` carries one of the
:class:`Code` values below in ``{"error": {"code", "message"}}``. The code is part of the
API: the agent decides from :data:`CODES` whether a fresh attempt can help, the README's
table is generated from it, and the gateway's exception classes
(``gateway.core.errors``) take their HTTP status from it.

The auth service answers the gateway with :class:`RegisterCode` values (its own, smaller
vocabulary: a registration is either malformed, conflicting or accepted).

Decoders in this package raise :class:`WireError`; each end translates it into its own
exception at its boundary (the gateway's ``BadRequest``, the auth service's
``AuthServiceError``), so this package needs nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CODES", "Code", "CodeInfo", "ErrorBody", "RegisterCode", "WireError"]


class Code(StrEnum):
    # 400: the request itself is malformed
    MALFORMED_BODY = "malformed_body"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    ATTESTED_MALFORMED = "attested_malformed"
    ACCESS_TOKEN_MALFORMED = "access_token_malformed"
    INVALID_FORWARDED_HEADER = "invalid_forwarded_header"
    CSR_INVALID = "csr_invalid"
    CSR_KEY_MISMATCH = "csr_key_mismatch"
    SSH_KEY_PROOF_INVALID = "ssh_key_proof_invalid"
    CSR_REQUIRED = "csr_required"
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
    NAME_NOT_ALLOWED = "name_not_allowed"
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
    Code.CSR_INVALID: CodeInfo(
        400, False, "host.csr is not one PEM CSR whose self-signature verifies."
    ),
    Code.CSR_KEY_MISMATCH: CodeInfo(
        400, False, "host.csr is for another key than host.public_tls_key."
    ),
    Code.SSH_KEY_PROOF_INVALID: CodeInfo(
        400, False, "host.ssh_key_proof is not the SSH key's signature over this challenge."
    ),
    Code.CSR_REQUIRED: CodeInfo(
        400, False, "The auth service requires host.csr and host.ssh_key_proof (--require-csr)."
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
    Code.NAME_NOT_ALLOWED: CodeInfo(
        403, False, "A requested name or IP is not one the token's name policy gives this VM."
    ),
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
        503,
        True,
        "The auth service is unreachable (circuit open) or unavailable (its registry or "
        "signing backend); honour Retry-After.",
    ),
    Code.SHUTTING_DOWN: CodeInfo(
        503, True, "This replica is draining and did not start the request: send it again."
    ),
    Code.UPSTREAM_FAILED: CodeInfo(502, True, "The auth service answered with an error."),
    Code.INTERNAL_ERROR: CodeInfo(500, True, "A bug: the gateway failed unexpectedly."),
}


class RegisterCode(StrEnum):
    """The auth service's error codes on ``POST /v1/register`` (the registration API).

    The strings it shares with :class:`Code` mean the same thing there."""

    MALFORMED_BODY = "malformed_body"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    BODY_TOO_LARGE = "body_too_large"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    # Proof of possession (auth serve --require-csr makes both mandatory).
    CSR_INVALID = "csr_invalid"
    CSR_KEY_MISMATCH = "csr_key_mismatch"
    SSH_KEY_PROOF_INVALID = "ssh_key_proof_invalid"
    CSR_REQUIRED = "csr_required"
    HOST_LOCKED = "host_locked"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    # The signing backend (Vault/OpenBao): down, sealed, rate-limited or slow (503, with
    # Retry-After), or it refused a well-formed request (502; an operator must act).
    SIGNING_UNAVAILABLE = "signing_unavailable"
    SIGNING_REFUSED = "signing_refused"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"
    # The caller's certificate is the wrong one for this endpoint (admin vs gateway).
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class ErrorBody:
    """``{"error": {"code", "message"}}``: the body of every refusal, in both APIs."""

    code: str
    message: str

    # What a reader keeps of a body from the other end (it may not be ours: a proxy).
    MAX_CODE = 100
    MAX_MESSAGE = 500

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}

    @classmethod
    def from_json(cls, body: object) -> ErrorBody | None:
        """The error of a decoded body, or None when it is not one (a proxy's HTML page,
        an empty body): the caller falls back on the HTTP status. Long fields are cut."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return None
        code, message = err.get("code"), err.get("message")
        if not isinstance(code, str) or not code:
            return None
        text = message if isinstance(message, str) else ""
        return cls(code[: cls.MAX_CODE], text[: cls.MAX_MESSAGE])


class WireError(ValueError):
    """A body that does not decode, or a field that breaks its rule.

    ``code`` is ``malformed_body`` (not a UTF-8 JSON object), ``invalid_request`` (the
    schema or a field rule) or ``body_too_large``; ``message`` names the field and is safe
    to send back (it never echoes a key or a token)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return CODES[self.code].status
