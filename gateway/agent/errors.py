"""The agent's typed errors.

The agent runs on the VM, so its errors are not the gateway's
:class:`~gateway.core.errors.GatewayError` (those are rendered into HTTP responses). Every
failure the agent can report carries a stable ``code``: either one the gateway sent back
(``not_allowed``, ``challenge_reused`` ...) or one of the agent's own :class:`AgentCode` values
below. The CLI prints the code; tests assert it.
"""

from __future__ import annotations

from enum import StrEnum

from gateway.protocol import CODES, Code

__all__ = [
    "FINAL_CODES",
    "RETRYABLE_GATEWAY_CODES",
    "RETRYABLE_STATUSES",
    "AgentCode",
    "AgentError",
    "ImdsError",
    "JoinError",
    "JoinFailed",
    "KeyFileError",
    "NodeConfigError",
]


class AgentCode(StrEnum):
    """Codes the agent itself produces (gateway codes arrive as plain strings)."""

    CONFIG_INVALID = "config_invalid"
    KEY_INVALID = "key_invalid"
    IMDS_FAILED = "imds_failed"
    CONNECTION_FAILED = "connection_failed"
    TIMEOUT = "timeout"
    TLS_VERIFY_FAILED = "tls_verify_failed"
    BAD_RESPONSE = "bad_response"
    CA_PIN_MISMATCH = "ca_pin_mismatch"
    SSH_CA_PIN_MISMATCH = "ssh_ca_pin_mismatch"
    TLS_KEY_MISMATCH = "tls_key_mismatch"
    SSH_KEY_MISMATCH = "ssh_key_mismatch"
    WRITE_FAILED = "write_failed"
    DEADLINE_EXCEEDED = "deadline_exceeded"


# A fresh attempt (new challenge, new document, new token) can cure these. The gateway's
# codes table (gateway.protocol.CODES, "whether an agent should retry") is consulted as well,
# so a code the table marks retryable (internal_error, shutting_down ...) is retried too.
RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})
RETRYABLE_GATEWAY_CODES: frozenset[str] = frozenset(
    {
        "challenge_expired",
        "challenge_reused",
        "attested_expired",
        "access_token_expired",
        "access_token_key_unknown",
    }
)

# The gateway's verdicts about this node's standing, as opposed to its evidence or the
# transport: a retry sends the same VM with the same token and gets the same answer until an
# operator acts (unlocks the host, adds an allow rule, renews the token). ``join-gateway
# agent`` stops renewing on these; evidence failures (a signature, a chain) may be a cloud
# change the gateway has not caught up with yet, and are retried with backoff.
FINAL_CODES: frozenset[str] = frozenset(
    {
        "host_locked",
        "not_allowed",
        "name_not_allowed",
        "unknown_token",
        "token_expired",
        "token_wrong_method",
        "role_not_allowed",
        "tenant_not_allowed",
        "identity_unsupported",
        "subscription_mismatch",
    }
)


class AgentError(Exception):
    """Base of every error the agent raises; ``code`` is stable, ``message`` for humans."""

    def __init__(self, code: str, message: str) -> None:
        self.code = str(code)
        self.message = message
        super().__init__(f"{self.code}: {message}")

    @property
    def retryable(self) -> bool:
        return False


class NodeConfigError(AgentError):
    """The node config (or a CLI override) is invalid; the message names file and line."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None) -> None:
        self.source = source
        self.line = line
        where = (
            f"{source}:{line}: "
            if source and line is not None
            else (f"{source}: " if source else "")
        )
        super().__init__(AgentCode.CONFIG_INVALID, f"{where}{message}")


class KeyFileError(AgentError):
    """A key file in data_dir exists but is not a key of the expected type."""

    def __init__(self, message: str) -> None:
        super().__init__(AgentCode.KEY_INVALID, message)


class ImdsError(AgentError):
    """IMDS did not hand out what we asked for. ``status`` is 0 for network failures."""

    def __init__(self, message: str, *, status: int = 0, transient: bool = False) -> None:
        self.status = status
        self._transient = transient
        super().__init__(AgentCode.IMDS_FAILED, message)

    @property
    def retryable(self) -> bool:
        return self._transient


class JoinError(AgentError):
    """One gateway request failed. ``status`` is 0 when there was no HTTP response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        *,
        transient: bool | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self._transient = transient
        super().__init__(code, message)

    @property
    def retryable(self) -> bool:
        if self._transient is not None:
            return self._transient
        if self.status in RETRYABLE_STATUSES or self.code in RETRYABLE_GATEWAY_CODES:
            return True
        try:
            return CODES[Code(self.code)].retryable
        except ValueError:  # a code this agent does not know (a newer gateway): not retried
            return False

    def __repr__(self) -> str:
        return (
            f"JoinError(status={self.status}, code={self.code!r}, "
            f"retry_after={self.retry_after}, retryable={self.retryable})"
        )


class JoinFailed(AgentError):
    """The join is over and did not succeed (non-retryable error, or retries exhausted)."""

    def __init__(self, code: str, status: int, message: str, *, attempts: int = 0) -> None:
        self.status = status
        self.attempts = attempts
        super().__init__(code, message)
