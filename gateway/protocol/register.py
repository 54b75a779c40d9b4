"""The registration API (DESIGN §4): gateway → auth service, over mTLS.

``POST /v1/register`` takes a :class:`Registration` (every field present, the challenge as
idempotency key) and answers ``{"host_id", "certs"}`` (:class:`RegisterResult`), or
``{"error": {"code", "message"}}`` with a :class:`~gateway.protocol.errors.RegisterCode`.

The auth service decodes with :func:`decode_registration` rather than trusting the
gateway's encoder: it is the last line before a CA signs something, so it applies the same
field rules (:mod:`gateway.protocol.validators`) the gateway applied to the join request,
and refuses duplicate keys and non-JSON constants on top.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from gateway.protocol.errors import Code, WireError
from gateway.protocol.labels import Labels, decode_labels
from gateway.protocol.types import HostParams, JoinBlock, RegisterResult, decode_host_params
from gateway.protocol.validators import (
    HOST_ROLES,
    MAX_ROLE,
    MAX_TOKEN_NAME,
    invalid,
    is_guid,
    is_token_name,
    require_fields,
    require_str,
)

__all__ = [
    "HEALTH_PATH",
    "MAX_BATCH",
    "REGISTER_BATCH_PATH",
    "REGISTER_PATH",
    "HostParams",
    "JoinBlock",
    "RegisterResult",
    "Registration",
    "decode_register_batch",
    "decode_registration",
]

REGISTER_PATH = "/v1/register"
# ``{"registrations": [<Registration>, ...]}`` (1..MAX_BATCH, distinct idempotency keys) →
# ``{"results": [...]}`` in request order, each item what ``REGISTER_PATH`` would answer.
REGISTER_BATCH_PATH = "/v1/register/batch"
MAX_BATCH = 64
HEALTH_PATH = "/healthz"

# The idempotency key is the join's challenge; any URL-safe or base64 token fits.
_IDEMPOTENCY_KEY = re.compile(r"\A[A-Za-z0-9._~:+/=-]{1,128}\Z")
_MAX_CLIENT_ADDRESS = 64
_MAX_RESOURCE_GROUP = 90  # Azure's limit for a resource group name
_MAX_RESOURCE_ID = 1024

_TOP = frozenset({"idempotency_key", "token_name", "role", "client_address", "join", "host"})
# Optional: absent when empty, so an auth service that predates labels still decodes.
_TOP_OPTIONAL = frozenset({"labels"})
_JOIN = frozenset({"method", "tenant", "subscription", "resource_group", "vm_id", "resource_id"})


@dataclass(frozen=True)
class Registration:
    """One approved join, as sent to ``POST /v1/register``."""

    idempotency_key: str
    token_name: str
    role: str
    client_address: str
    join: JoinBlock
    host: HostParams
    # Verified Azure attributes as node labels (``gateway/protocol/labels.py``).
    labels: Labels = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "idempotency_key": self.idempotency_key,
            "token_name": self.token_name,
            "role": self.role,
            "client_address": self.client_address,
            "join": self.join.to_json(),
            "host": self.host.to_json(),
        }
        if self.labels:
            body["labels"] = dict(self.labels)
        return body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(
    value: object, where: str, fields: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{where} must be an object")
    require_fields(value, fields | optional, fields, where)
    return value


def _guid(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not is_guid(value):
        raise invalid(f"{where}.{key} must be a GUID in 8-4-4-4-12 form")
    return value


def _parse(raw: bytes) -> object:
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(Code.MALFORMED_BODY, f"body is not JSON: {exc}") from None


def decode_registration(raw: bytes) -> Registration:
    """Decode and validate a register body; raises ``WireError`` (malformed_body or
    invalid_request)."""
    return _registration(_parse(raw))


def decode_register_batch(raw: bytes) -> tuple[Registration, ...]:
    """Decode and validate a batch body: 1..MAX_BATCH registrations with distinct
    idempotency keys, each under the rules of :func:`decode_registration`. Raises
    ``WireError`` (malformed_body or invalid_request) for the whole batch; the message of an
    item's error names the item (``registrations[3]: ...``)."""
    top = _object(_parse(raw), "body", frozenset({"registrations"}))
    items = top["registrations"]
    if not isinstance(items, list):
        raise invalid("body.registrations must be a list")
    if not 1 <= len(items) <= MAX_BATCH:
        raise invalid(f"body.registrations must hold 1 to {MAX_BATCH} registrations")
    regs: list[Registration] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        try:
            reg = _registration(item)
        except WireError as exc:
            raise WireError(exc.code, f"registrations[{i}]: {exc.message}") from None
        if reg.idempotency_key in seen:
            raise invalid(f"registrations[{i}]: idempotency_key repeats an earlier item's")
        seen.add(reg.idempotency_key)
        regs.append(reg)
    return tuple(regs)


def _registration(body: object) -> Registration:
    top = _object(body, "body", _TOP, _TOP_OPTIONAL)

    key = require_str(top, "idempotency_key", "body", max_len=128)
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise invalid("body.idempotency_key has characters outside [A-Za-z0-9._~:+/=-]")
    token_name = require_str(top, "token_name", "body", max_len=MAX_TOKEN_NAME)
    if not is_token_name(token_name):
        raise invalid("body.token_name has characters a token name cannot have")
    role = require_str(top, "role", "body", max_len=MAX_ROLE)
    if role not in HOST_ROLES:
        raise invalid(f"body.role must be one of {', '.join(HOST_ROLES)}")
    client_address = require_str(top, "client_address", "body", max_len=_MAX_CLIENT_ADDRESS)
    try:
        ipaddress.ip_address(client_address)
    except ValueError:
        raise invalid("body.client_address must be an IP address") from None

    j = _object(top["join"], "join", _JOIN)
    method = require_str(j, "method", "join", max_len=32)
    if method != "azure":
        raise invalid("join.method must be 'azure'")
    resource_id = require_str(j, "resource_id", "join", max_len=_MAX_RESOURCE_ID)
    if not resource_id.lower().startswith("/subscriptions/"):
        raise invalid("join.resource_id must be an ARM resource ID")
    join = JoinBlock(
        method=method,
        tenant=_guid(j, "tenant", "join"),
        subscription=_guid(j, "subscription", "join"),
        resource_group=require_str(j, "resource_group", "join", max_len=_MAX_RESOURCE_GROUP),
        vm_id=_guid(j, "vm_id", "join"),
        resource_id=resource_id,
    )

    host = decode_host_params(top["host"], "host", lists_required=True)
    if host.role != role:
        raise invalid("host.role must equal role")
    return Registration(
        idempotency_key=key,
        token_name=token_name,
        role=role,
        client_address=client_address,
        join=join,
        # The auth service signs the key as one line: surrounding whitespace goes here, so
        # the request digest does not depend on it either.
        host=_strip_ssh_key(host),
        labels=decode_labels(top["labels"], "labels") if "labels" in top else MappingProxyType({}),
    )


def _strip_ssh_key(host: HostParams) -> HostParams:
    stripped = host.public_ssh_key.strip()
    return host if stripped == host.public_ssh_key else replace(host, public_ssh_key=stripped)
