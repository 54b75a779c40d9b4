"""The types both APIs carry: what a node asks for, who it was verified to be, what it got.

``HostParams`` travels in the join request (agent → gateway) and again in the registration
(gateway → auth service); ``JoinBlock`` in the registration and the join response;
``RegisterResult`` is the auth service's answer, whose ``certs`` the gateway passes on.
Each is a frozen dataclass with ``to_json``; decoders check every field with the rules of
:mod:`gateway.protocol.validators`. Optional fields added later (a CSR, labels, whether a
registration was a renewal) get a default here, so both ends keep decoding older bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.protocol.possession import MAX_CSR_BYTES, MAX_SSH_KEY_PROOF
from gateway.protocol.validators import (
    HOST_ROLES,
    MAX_NODE_NAME,
    MAX_ROLE,
    MAX_SSH_KEY,
    MAX_TLS_KEY,
    check_ssh_public_key,
    check_tls_public_key,
    invalid,
    is_dns_name,
    is_node_name,
    is_principal,
    optional_str_list,
    require_fields,
    require_str,
)

__all__ = ["HostParams", "JoinBlock", "RegisterResult", "decode_host_params"]


@dataclass(frozen=True)
class HostParams:
    """The ``host`` block: what the node asks to be certified as (its names and keys).

    ``node_name`` is optional in the join API (``""``: absent, the gateway decides: the
    VM's verified Azure name, or the token's template); a registration always carries the
    name the gateway decided."""

    node_name: str
    role: str
    public_ssh_key: str
    public_tls_key: str
    additional_principals: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    # Proof of possession (optional in join API v1; ``gateway/protocol/possession.py``):
    # a PKCS#10 CSR signed by the TLS key, and a signature over the challenge by the SSH key.
    csr: str | None = None
    ssh_key_proof: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "role": self.role,
            "public_ssh_key": self.public_ssh_key,
            "public_tls_key": self.public_tls_key,
            "additional_principals": list(self.additional_principals),
            "dns_names": list(self.dns_names),
        }
        if self.node_name:
            body["node_name"] = self.node_name
        # Absent rather than null: an older peer's strict decoder never sees a new key.
        if self.csr is not None:
            body["csr"] = self.csr
        if self.ssh_key_proof is not None:
            body["ssh_key_proof"] = self.ssh_key_proof
        return body


_HOST_FIELDS = frozenset(
    {
        "node_name",
        "role",
        "public_ssh_key",
        "public_tls_key",
        "additional_principals",
        "dns_names",
        "csr",
        "ssh_key_proof",
    }
)
_POSSESSION_FIELDS = frozenset({"csr", "ssh_key_proof"})
_HOST_REQUIRED = frozenset({"role", "public_ssh_key", "public_tls_key"})
_HOST_REQUIRED_WITH_LISTS = _HOST_FIELDS - _POSSESSION_FIELDS


def check_fields(
    obj: Mapping[str, Any], allowed: frozenset[str], required: frozenset[str], where: str
) -> None:
    """``require_fields``, whose two set builds are left to the refusals: the keys are
    compared with the sets as they are (a dict's keys view is set-like)."""
    keys = obj.keys()
    if not (keys <= allowed and keys >= required):
        require_fields(obj, allowed, required, where)  # raises, naming the fields


def decode_host_params(value: object, where: str, *, lists_required: bool) -> HostParams:
    """The ``host`` block, every field checked; raises ``WireError`` (invalid_request).

    The agent may leave out the node name and the two name lists (join API); the gateway
    always sends them (registration API: ``lists_required``)."""
    if type(value) is not dict and not isinstance(value, Mapping):  # dict: no ABC check
        raise invalid(f"{where} must be an object")
    required = _HOST_REQUIRED_WITH_LISTS if lists_required else _HOST_REQUIRED
    check_fields(value, _HOST_FIELDS, required, where)
    node_name = ""
    if "node_name" in value:
        node_name = require_str(value, "node_name", where, max_len=MAX_NODE_NAME)
        if not is_node_name(node_name):
            raise invalid(f"{where}.node_name must be a hostname")
    role = require_str(value, "role", where, max_len=MAX_ROLE)
    if role not in HOST_ROLES:
        raise invalid(f"{where}.role must be one of {', '.join(HOST_ROLES)}")
    ssh_key = require_str(value, "public_ssh_key", where, max_len=MAX_SSH_KEY)
    tls_key = require_str(value, "public_tls_key", where, max_len=MAX_TLS_KEY)
    check_ssh_public_key(ssh_key, f"{where}.public_ssh_key")
    check_tls_public_key(tls_key, f"{where}.public_tls_key")
    return HostParams(
        node_name=node_name,
        role=role,
        public_ssh_key=ssh_key,
        public_tls_key=tls_key,
        additional_principals=optional_str_list(
            value, "additional_principals", where, rule=is_principal
        ),
        dns_names=optional_str_list(value, "dns_names", where, rule=is_dns_name),
        csr=_optional(value, "csr", where, MAX_CSR_BYTES),
        ssh_key_proof=_optional(value, "ssh_key_proof", where, MAX_SSH_KEY_PROOF),
    )


def _optional(value: Mapping[str, Any], key: str, where: str, max_len: int) -> str | None:
    """A possession field: absent, or a bounded string (its proof is checked apart)."""
    return require_str(value, key, where, max_len=max_len) if key in value else None


@dataclass(frozen=True)
class JoinBlock:
    """The verified Azure identity of the joining VM (all from signed evidence or ARM)."""

    method: str
    tenant: str
    subscription: str
    resource_group: str
    vm_id: str
    resource_id: str

    def to_json(self) -> dict[str, str]:
        return {
            "method": self.method,
            "tenant": self.tenant,
            "subscription": self.subscription,
            "resource_group": self.resource_group,
            "vm_id": self.vm_id,
            "resource_id": self.resource_id,
        }


@dataclass(frozen=True)
class RegisterResult:
    """The auth service's answer: the node's host ID and certificates."""

    host_id: str
    ssh_cert: str
    tls_cert: str
    tls_ca_certs: tuple[str, ...]
    ssh_ca_keys: tuple[str, ...]
    # Whether the auth service treated the join as a renewal of an existing host (same
    # host ID) or as a new host; None when the auth service does not say (optional field).
    renewal: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire ``certs`` object (of the registration answer and the join response)."""
        return {
            "ssh": self.ssh_cert,
            "tls": self.tls_cert,
            "tls_ca_certs": list(self.tls_ca_certs),
            "ssh_ca_keys": list(self.ssh_ca_keys),
        }

    def body_json(self) -> dict[str, Any]:
        """The whole ``200`` body of ``POST /v1/register``."""
        body: dict[str, Any] = {"host_id": self.host_id, "certs": self.to_json()}
        if self.renewal is not None:
            body["renewal"] = self.renewal
        return body

    @classmethod
    def from_json(cls, body: object) -> RegisterResult:
        """Decode the auth service's 200 body; raises ``ValueError`` on any deviation."""
        if not isinstance(body, dict):
            raise ValueError("body is not an object")
        host_id = body.get("host_id")
        certs = body.get("certs")
        if not isinstance(host_id, str) or not host_id:
            raise ValueError("host_id missing or not a string")
        if not isinstance(certs, dict):
            raise ValueError("certs missing or not an object")
        ssh_cert = certs.get("ssh")
        tls_cert = certs.get("tls")
        if not isinstance(ssh_cert, str) or not ssh_cert:
            raise ValueError("certs.ssh missing or not a string")
        if not isinstance(tls_cert, str) or not tls_cert:
            raise ValueError("certs.tls missing or not a string")
        renewal = body.get("renewal")
        if renewal is not None and not isinstance(renewal, bool):
            raise ValueError("renewal must be a boolean")
        return cls(
            host_id=host_id,
            ssh_cert=ssh_cert,
            tls_cert=tls_cert,
            tls_ca_certs=_str_list(certs.get("tls_ca_certs"), "certs.tls_ca_certs"),
            ssh_ca_keys=_str_list(certs.get("ssh_ca_keys"), "certs.ssh_ca_keys"),
            renewal=renewal,
        )


def _str_list(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a non-empty list of strings")
    return tuple(value)
