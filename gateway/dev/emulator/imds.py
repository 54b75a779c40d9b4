"""IMDS request checks and error bodies, as a real VM's 169.254.169.254 answers.

Source: https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service
(errors table: missing ``Metadata: true`` header, missing/unknown api-version, requests
carrying ``X-Forwarded-For`` are refused) and
https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/how-to-use-vm-token
(token endpoint errors in OAuth form: ``error`` + ``error_description``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = [
    "ATTESTED_API_VERSIONS",
    "MAX_NONCE_LENGTH",
    "TOKEN_API_VERSIONS",
    "ImdsError",
    "check_attested_request",
    "check_token_request",
]

# The attested endpoint's versions (IMDS "versions" list); the newest ones are also the
# "newest-versions" IMDS suggests in its error body.
ATTESTED_API_VERSIONS: frozenset[str] = frozenset(
    {
        "2018-10-01",
        "2019-02-01",
        "2019-03-11",
        "2019-04-30",
        "2019-06-01",
        "2019-06-04",
        "2019-08-01",
        "2019-08-15",
        "2019-11-01",
        "2020-06-01",
        "2020-07-15",
        "2020-09-01",
        "2020-10-01",
        "2020-12-01",
        "2021-01-01",
        "2021-02-01",
        "2021-03-01",
        "2021-05-01",
        "2021-10-01",
        "2021-11-01",
        "2021-11-15",
        "2021-12-13",
        "2023-07-01",
        "2023-11-15",
        "2024-03-15",
        "2025-04-07",
    }
)
TOKEN_API_VERSIONS: frozenset[str] = frozenset({"2018-02-01", "2019-08-01", "2019-11-01"})
NEWEST_VERSIONS = ["2025-04-07", "2024-03-15", "2023-11-15"]
MAX_NONCE_LENGTH = 32


class ImdsError(Exception):
    """A 400 IMDS answers with; ``body`` is the exact JSON bytes."""

    def __init__(self, status: int, body: dict[str, object]) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = json.dumps(body, separators=(",", ":")).encode()


def _common(headers: Mapping[str, str], query: Mapping[str, str], versions: frozenset[str]) -> None:
    if "X-Forwarded-For" in headers:
        raise ImdsError(400, {"error": "Bad request. Request contains X-Forwarded-For header."})
    if headers.get("Metadata", "").lower() != "true":
        raise ImdsError(400, {"error": "Bad request. Required metadata header not specified"})
    version = query.get("api-version")
    if not version:
        raise ImdsError(
            400,
            {
                "error": "Bad request. api-version was not specified in the request. "
                "For more information refer to aka.ms/azureimds",
                "newest-versions": NEWEST_VERSIONS,
            },
        )
    if version not in versions:
        raise ImdsError(
            400,
            {
                "error": "Bad request. api-version is invalid or was not specified in the "
                "request. For more information refer to aka.ms/azureimds",
                "newest-versions": NEWEST_VERSIONS,
            },
        )


def check_attested_request(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """Validate ``GET /metadata/attested/document``; returns the nonce (or None)."""
    _common(headers, query, ATTESTED_API_VERSIONS)
    nonce = query.get("nonce") or None
    if nonce is not None and len(nonce) > MAX_NONCE_LENGTH:
        raise ImdsError(
            400,
            {"error": f"Bad request. Nonce length must be at most {MAX_NONCE_LENGTH} characters."},
        )
    return nonce


def check_token_request(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """Validate ``GET /metadata/identity/oauth2/token``; returns the resource.

    The identity endpoint answers header and parameter errors in OAuth form.
    """
    if "X-Forwarded-For" in headers:
        raise ImdsError(
            400,
            {
                "error": "invalid_request",
                "error_description": "X-Forwarded-For header is not allowed",
            },
        )
    if headers.get("Metadata", "").lower() != "true":
        raise ImdsError(
            400,
            {
                "error": "invalid_request",
                "error_description": "Required metadata header not specified",
            },
        )
    version = query.get("api-version")
    if not version or version not in TOKEN_API_VERSIONS:
        raise ImdsError(
            400,
            {
                "error": "invalid_request",
                "error_description": "Required query variable 'api-version' is missing or invalid",
            },
        )
    resource = query.get("resource")
    if not resource:
        raise ImdsError(
            400,
            {
                "error": "invalid_request",
                "error_description": "Required query variable 'resource' is missing",
            },
        )
    return resource
