"""The registry's schema, versioned: each migration runs once, in order, at start.

``migrate`` runs inside one transaction that first takes a database-wide lock (PostgreSQL:
an advisory lock; SQLite: ``BEGIN IMMEDIATE`` already holds the write lock), so replicas
starting together apply each migration exactly once. A database newer than this code is
refused rather than written with an old idea of the schema.
"""

from __future__ import annotations

from gateway.authservice.registry.db import Body, Dialect, execute, one

__all__ = ["SCHEMA_VERSION", "migrate", "serialize_startup"]

# Any constant: the advisory lock's key, shared by every replica of this service.
_MIGRATION_LOCK = 0x6A67_7265_6769  # "jgregi"

# {ts} is the time type: ISO-8601 text in SQLite (one fixed format, so it sorts), a
# timestamptz in PostgreSQL.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: hosts keyed on the attested VM identity, registrations by idempotency key, locks.
    (
        """CREATE TABLE hosts (
            host_id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            subscription TEXT NOT NULL,
            vm_id TEXT NOT NULL,
            resource_group TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            node_name TEXT NOT NULL,
            role TEXT NOT NULL,
            token_name TEXT NOT NULL,
            first_key TEXT NOT NULL,
            first_joined {ts} NOT NULL,
            last_renewed {ts} NOT NULL,
            cert_expiry {ts},
            renewals INTEGER NOT NULL DEFAULT 0,
            removed_at {ts}
        )""",
        # One live host per VM identity: the database, not the code, keeps two replicas
        # from minting two hosts for one VM. A removed host frees its VM to join anew.
        """CREATE UNIQUE INDEX hosts_live_vm ON hosts (tenant, subscription, vm_id)
            WHERE removed_at IS NULL""",
        # One registration per idempotency key (the gateway's challenge).
        """CREATE TABLE registrations (
            idempotency_key TEXT PRIMARY KEY,
            host_id TEXT NOT NULL,
            request_digest TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('new', 'renewal')),
            registered_at {ts} NOT NULL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX registrations_host ON registrations (host_id)",
        """CREATE TABLE locks (
            lock_id TEXT PRIMARY KEY,
            target TEXT NOT NULL
                CHECK (target IN ('host', 'vm_id', 'subscription', 'token')),
            value TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_at {ts} NOT NULL,
            expires_at {ts}
        )""",
        "CREATE INDEX locks_target ON locks (target, value)",
        # Markers and a trail (e.g. each JSON import: from where, how many records).
        "CREATE TABLE registry_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # 2: each host's node labels (verified Azure attributes), a JSON object; every join
    # of the host (a renewal too) writes the labels it came with.
    ("ALTER TABLE hosts ADD COLUMN labels TEXT NOT NULL DEFAULT '{{}}'",),
)

SCHEMA_VERSION = len(_MIGRATIONS)

_TS = {"sqlite": "TEXT", "postgresql": "TIMESTAMPTZ"}


def serialize_startup(dialect: Dialect) -> Body[None]:
    """Hold, until the transaction ends, the lock replicas take for start-up work
    (migration, import): the second replica waits, then finds the work done."""
    if dialect == "postgresql":
        yield one("SELECT pg_advisory_xact_lock(?)", _MIGRATION_LOCK)


def migrate(dialect: Dialect) -> Body[tuple[int, int]]:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns (version before, after)."""
    yield from serialize_startup(dialect)
    yield execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = yield one("SELECT MAX(version) FROM schema_version")
    current = int(row[0]) if row is not None and row[0] is not None else 0
    if current > SCHEMA_VERSION:
        raise ValueError(
            f"the registry's schema is version {current}, newer than this auth service "
            f"knows ({SCHEMA_VERSION}): upgrade the auth service"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in _MIGRATIONS[version - 1]:
            yield execute(statement.format(ts=_TS[dialect]))
        yield execute("INSERT INTO schema_version (version) VALUES (?)", version)
    return current, SCHEMA_VERSION
