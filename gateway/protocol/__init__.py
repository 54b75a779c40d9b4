"""The wire contract: the join API v1 (agent → gateway) and the registration API
(gateway → auth service), their field rules and their error codes.

This is the lowest layer: it imports nothing else of ours (an import-linter contract says
so), and the gateway, the agent and the auth service all speak through it — none of them
imports another for a type or a rule. One definition of each type, each rule, each code.
"""

from __future__ import annotations

from gateway.protocol.errors import CODES, Code, CodeInfo, ErrorBody, RegisterCode, WireError
from gateway.protocol.join import (
    CHALLENGE_ALPHABET,
    CHALLENGE_LENGTH,
    CHALLENGE_PATH,
    JOIN_PATH,
    MAX_BODY_BYTES,
    ChallengeResponse,
    JoinRequest,
    JoinResponse,
    build_join_body,
    decode_challenge_request,
    decode_join_request,
    is_challenge,
    parse_json_object,
)
from gateway.protocol.register import (
    HEALTH_PATH,
    MAX_BATCH,
    REGISTER_BATCH_PATH,
    REGISTER_PATH,
    Registration,
    decode_register_batch,
    decode_registration,
)
from gateway.protocol.types import HostParams, JoinBlock, RegisterResult, decode_host_params
from gateway.protocol.validators import (
    GUID_RE,
    HOST_ROLES,
    TOKEN_ROLES,
    canonical_role,
    check_ssh_public_key,
    check_tls_public_key,
    is_dns_name,
    is_guid,
    is_node_name,
    is_principal,
    is_token_name,
    normalize_guid,
)

__all__ = [
    "CHALLENGE_ALPHABET",
    "CHALLENGE_LENGTH",
    "CHALLENGE_PATH",
    "CODES",
    "GUID_RE",
    "HEALTH_PATH",
    "HOST_ROLES",
    "JOIN_PATH",
    "MAX_BATCH",
    "MAX_BODY_BYTES",
    "REGISTER_BATCH_PATH",
    "REGISTER_PATH",
    "TOKEN_ROLES",
    "ChallengeResponse",
    "Code",
    "CodeInfo",
    "ErrorBody",
    "HostParams",
    "JoinBlock",
    "JoinRequest",
    "JoinResponse",
    "RegisterCode",
    "RegisterResult",
    "Registration",
    "WireError",
    "build_join_body",
    "canonical_role",
    "check_ssh_public_key",
    "check_tls_public_key",
    "decode_challenge_request",
    "decode_host_params",
    "decode_join_request",
    "decode_register_batch",
    "decode_registration",
    "is_challenge",
    "is_dns_name",
    "is_guid",
    "is_node_name",
    "is_principal",
    "is_token_name",
    "normalize_guid",
    "parse_json_object",
]
