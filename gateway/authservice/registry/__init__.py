"""The auth service's registry: hosts keyed on the attested VM identity, registrations by
idempotency key, and locks — in SQLite (default, in the data directory) or PostgreSQL
(shared by several auth service replicas). See ``registry.py`` for the write path."""

from __future__ import annotations

from gateway.authservice.registry.db import redact_url
from gateway.authservice.registry.model import (
    HostLocked,
    HostRecord,
    IdempotencyConflict,
    JoinKind,
    Lock,
    LockTarget,
    Registered,
    RegistryError,
    RegistryUnavailable,
    VmIdentity,
)
from gateway.authservice.registry.registry import Registry, open_registry
from gateway.authservice.registry.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "HostLocked",
    "HostRecord",
    "IdempotencyConflict",
    "JoinKind",
    "Lock",
    "LockTarget",
    "Registered",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "VmIdentity",
    "open_registry",
    "redact_url",
]
