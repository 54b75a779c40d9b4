"""The registry's data: hosts, locks, outcomes, and its typed errors.

A host is the auth service's record of one VM: its ID (Teleport's host UUID) is minted once,
at the VM's first join, and kept for every later join from the same attested identity
(tenant, subscription, vmId). A lock refuses joins by host ID, vmId, subscription or token
name until it is removed or expires.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal

from gateway.authservice.store import RegistrationRecord

__all__ = [
    "HostLocked",
    "HostRecord",
    "IdempotencyConflict",
    "JoinKind",
    "Lock",
    "LockTarget",
    "Registered",
    "RegistryError",
    "RegistryUnavailable",
    "VmIdentity",
]

JoinKind = Literal["new", "renewal"]


class LockTarget(StrEnum):
    """What a lock matches: the value of one attribute of a join."""

    HOST = "host"
    VM_ID = "vm_id"
    SUBSCRIPTION = "subscription"
    TOKEN = "token"  # noqa: S105 - a token *name* target, not a secret


@dataclass(frozen=True)
class VmIdentity:
    """The attested identity a host is keyed on.

    GUIDs are compared lowercased: Azure writes the same subscription or vmId in either
    case depending on the API that returns it (IMDS lowercases; ARM resource IDs keep the
    case they were created with).
    """

    tenant: str
    subscription: str
    vm_id: str

    @classmethod
    def of(cls, tenant: str, subscription: str, vm_id: str) -> VmIdentity:
        return cls(tenant.lower(), subscription.lower(), vm_id.lower())


@dataclass(frozen=True)
class HostRecord:
    host_id: str
    tenant: str
    subscription: str
    vm_id: str
    resource_group: str
    resource_id: str
    node_name: str
    role: str
    token_name: str
    first_joined: datetime
    last_renewed: datetime
    cert_expiry: datetime | None
    renewals: int
    removed_at: datetime | None = None
    # The node labels of its latest join (``gateway/protocol/labels.py``).
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lock:
    lock_id: str
    target: LockTarget
    value: str
    reason: str
    created_at: datetime
    expires_at: datetime | None

    def active(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class Registered:
    """What ``Registry.register`` did: the record answered, whether the join made a new
    host or renewed one, and whether the answer was a stored one (an idempotent retry)."""

    record: RegistrationRecord
    kind: JoinKind
    replay: bool


class RegistryError(Exception):
    """Base of the registry's errors."""


class RegistryUnavailable(RegistryError):
    """The database could not be reached or failed; retrying later may succeed."""


class IdempotencyConflict(RegistryError):
    """The idempotency key was already used with a different request."""


class HostLocked(RegistryError):
    """A lock matches the join: the typed "locked" result of a registration."""

    def __init__(self, lock: Lock) -> None:
        super().__init__(f"locked by {lock.lock_id} ({lock.target}={lock.value}): {lock.reason}")
        self.lock = lock
