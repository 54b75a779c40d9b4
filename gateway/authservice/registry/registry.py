"""The auth service's registry: one host per VM, registrations by key, locks.

``Registry.register`` is the one write path of a join:

1. a known idempotency key answers with the stored registration (a gateway's retry, on
   this replica or another) — or a conflict if the request differs;
2. in one short transaction: the live host of the VM's attested identity is read, the
   locks matching the join are checked (a match is :class:`HostLocked`), and a missing
   host is inserted with a fresh ID — ``ON CONFLICT DO NOTHING`` on the unique index, so
   when two replicas race, one inserts and the other reads the winner's host;
3. the certificates are issued for that host ID, outside any transaction (CPU work);
4. the registration is inserted by key (``ON CONFLICT DO NOTHING`` again: if another
   replica stored the same key meanwhile, its answer is returned and ours is dropped,
   never delivered) and the host's renewal time and certificate expiry are updated.

A host's ID is only ever read back for the same (tenant, subscription, vmId), so another
VM can never obtain it; a new vmId (the VM was re-created) is a new host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Self

from gateway.authservice.registry.db import (
    PostgresDatabase,
    Row,
    SqliteDatabase,
    Tx,
    as_datetime,
    open_database,
)
from gateway.authservice.registry.model import (
    HostLocked,
    HostRecord,
    IdempotencyConflict,
    JoinKind,
    Lock,
    LockTarget,
    Registered,
    RegistryUnavailable,
    VmIdentity,
)
from gateway.authservice.registry.schema import migrate, serialize_startup
from gateway.authservice.store import RegistrationRecord, read_records
from gateway.join.forward import RegisterResult, Registration

__all__ = ["Registry", "open_registry"]

log = logging.getLogger(__name__)

# Rounds of "read host, else insert" before giving up: each lost insert means another
# replica committed the host, which the next read sees; more than a few is a fault.
_HOST_ROUNDS = 5

_HOST_COLUMNS = (
    "host_id, tenant, subscription, vm_id, resource_group, resource_id, node_name, role, "
    "token_name, first_joined, last_renewed, cert_expiry, renewals, removed_at"
)
_LOCK_COLUMNS = "lock_id, target, value, reason, created_at, expires_at"
_IMPORT_MARK = "json_import"

Issue = Callable[[str], RegisterResult]


class Registry:
    """Parameters: ``db`` — an open database (see :func:`open_registry`)."""

    def __init__(self, db: SqliteDatabase | PostgresDatabase) -> None:
        self._db = db

    @property
    def dialect(self) -> str:
        return self._db.dialect

    async def aclose(self) -> None:
        await self._db.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- start-up -------------------------------------------------------------------------

    async def migrate(self) -> tuple[int, int]:
        async with self._db.transaction() as tx:
            return await migrate(tx, self._db.dialect)

    async def import_json_records(self, directory: Path) -> int | None:
        """Import ``store.py``'s JSON files once (the first start on this database).

        Returns how many records were imported, or None if an import already happened.
        An unreadable file stops the start: skipping it would forget an idempotency key.
        Records made before hosts existed each carry their own random host ID; a VM's
        host becomes the ID of its *latest* record, the identity its node holds now.
        """
        async with self._db.transaction() as tx:
            if await _meta(tx, _IMPORT_MARK) is not None:
                return None
        records = await asyncio.to_thread(read_records, directory)
        async with self._db.transaction() as tx:
            await serialize_startup(tx, self._db.dialect)
            if await _meta(tx, _IMPORT_MARK) is not None:
                return None  # another replica imported meanwhile
            for rec in records:
                await _insert_registration(tx, rec, "new")
            latest: dict[VmIdentity, RegistrationRecord] = {}
            first: dict[VmIdentity, datetime] = {}
            for rec in sorted(records, key=lambda r: r.registered_at):
                ident = _identity(rec.registration)
                latest[ident] = rec
                first.setdefault(ident, rec.registered_at)
            for ident, rec in latest.items():
                await _insert_host(
                    tx,
                    rec.host_id,
                    ident,
                    rec.registration,
                    rec.idempotency_key,
                    first[ident],
                    rec.registered_at,
                )
            await tx.execute(
                "INSERT INTO registry_meta (key, value) VALUES (?, ?)",
                _IMPORT_MARK,
                str(len(records)),
            )
        if records:
            log.info("imported %s JSON registration records from %s", len(records), directory)
        return len(records)

    # --- joins ------------------------------------------------------------------------------

    async def register(
        self,
        reg: Registration,
        *,
        digest: str,
        gateway: str,
        now: datetime,
        cert_expiry: datetime,
        issue: Issue,
    ) -> Registered:
        """Register one approved join (see the module docstring for the steps).

        Raises :class:`IdempotencyConflict`, :class:`HostLocked` or
        :class:`RegistryUnavailable`.
        """
        key = reg.idempotency_key
        async with self._db.transaction() as tx:
            stored = await _stored(tx, key)
        if stored is not None:
            return _replayed(stored, digest)

        ident = _identity(reg)
        host_id, kind = await self._host_for(reg, ident, now)
        result = issue(host_id)
        record = RegistrationRecord(
            host_id=host_id,
            idempotency_key=key,
            request_digest=digest,
            registered_at=now,
            gateway=gateway,
            registration=reg,
            result=result,
        )
        async with self._db.transaction() as tx:
            if not await _insert_registration(tx, record, kind):
                stored = await _stored(tx, key)
                if stored is None:  # pragma: no cover - the conflict row cannot vanish
                    raise RegistryUnavailable("registration vanished during a conflict")
                return _replayed(stored, digest)
            await tx.execute(
                "UPDATE hosts SET last_renewed = ?, cert_expiry = ?, node_name = ?, "
                "resource_group = ?, resource_id = ?, renewals = renewals + ? "
                "WHERE host_id = ?",
                now,
                cert_expiry,
                reg.host.node_name,
                reg.join.resource_group,
                reg.join.resource_id,
                1 if kind == "renewal" else 0,
                host_id,
            )
        return Registered(record=record, kind=kind, replay=False)

    async def _host_for(
        self, reg: Registration, ident: VmIdentity, now: datetime
    ) -> tuple[str, JoinKind]:
        for _ in range(_HOST_ROUNDS):
            async with self._db.transaction() as tx:
                row = await tx.fetchone(
                    "SELECT host_id, first_key FROM hosts WHERE tenant = ? AND "
                    "subscription = ? AND vm_id = ? AND removed_at IS NULL",
                    ident.tenant,
                    ident.subscription,
                    ident.vm_id,
                )
                host_id = str(row[0]) if row is not None else None
                lock = await _matching_lock(tx, reg, ident, host_id, now)
                if lock is not None:
                    raise HostLocked(lock)
                if row is not None:
                    # The first join's own retry (its registration was never stored) is
                    # still the host's birth, not a renewal.
                    return str(row[0]), "new" if row[1] == reg.idempotency_key else "renewal"
                host_id = str(uuid.uuid4())
                if await _insert_host(tx, host_id, ident, reg, reg.idempotency_key, now, now):
                    return host_id, "new"
            # Lost the race to another replica: its host is committed; read it.
        raise RegistryUnavailable("could not settle the VM's host (too many concurrent joins)")

    # --- reads ------------------------------------------------------------------------------

    async def registrations(self) -> list[RegistrationRecord]:
        """Every registration, oldest first."""
        async with self._db.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT record FROM registrations ORDER BY registered_at, host_id"
            )
        return [RegistrationRecord.from_json(json.loads(r[0])) for r in rows]

    async def registration_kinds(self) -> dict[str, JoinKind]:
        """Each idempotency key's kind of join ("new" or "renewal")."""
        async with self._db.transaction() as tx:
            rows = await tx.fetchall("SELECT idempotency_key, kind FROM registrations")
        return {str(k): _kind(v) for k, v in rows}

    async def hosts(self, *, include_removed: bool = False) -> list[HostRecord]:
        where = "" if include_removed else " WHERE removed_at IS NULL"
        async with self._db.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT {_HOST_COLUMNS} FROM hosts{where} ORDER BY first_joined, host_id"  # noqa: S608 - constant SQL
            )
        return [_host(r) for r in rows]

    async def host(self, host_id: str) -> HostRecord | None:
        async with self._db.transaction() as tx:
            row = await tx.fetchone(
                f"SELECT {_HOST_COLUMNS} FROM hosts WHERE host_id = ?",  # noqa: S608 - constant SQL
                host_id,
            )
        return _host(row) if row is not None else None

    # --- locks ------------------------------------------------------------------------------

    async def add_lock(
        self,
        target: LockTarget,
        value: str,
        *,
        reason: str,
        now: datetime,
        ttl: timedelta | None = None,
    ) -> Lock:
        if not value or not reason:
            raise ValueError("a lock needs a value and a reason")
        if ttl is not None and ttl <= timedelta(0):
            raise ValueError("a lock's ttl must be positive")
        # GUID targets compare lowercased, as host identities do (see VmIdentity).
        if target in (LockTarget.VM_ID, LockTarget.SUBSCRIPTION, LockTarget.HOST):
            value = value.lower()
        lock = Lock(
            lock_id=str(uuid.uuid4()),
            target=target,
            value=value,
            reason=reason,
            created_at=now,
            expires_at=now + ttl if ttl is not None else None,
        )
        async with self._db.transaction() as tx:
            await tx.execute(
                f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant SQL
                lock.lock_id,
                str(lock.target),
                lock.value,
                lock.reason,
                lock.created_at,
                lock.expires_at,
            )
        log.info("lock %s added: %s=%s (%s)", lock.lock_id, lock.target, lock.value, reason)
        return lock

    async def locks(self, *, now: datetime | None = None) -> list[Lock]:
        """Every lock, or (given ``now``) those still in force."""
        async with self._db.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT {_LOCK_COLUMNS} FROM locks ORDER BY created_at, lock_id"  # noqa: S608 - constant SQL
            )
        found = [_lock(r) for r in rows]
        return found if now is None else [lk for lk in found if lk.active(now)]

    async def remove_lock(self, lock_id: str) -> bool:
        async with self._db.transaction() as tx:
            removed = await tx.execute("DELETE FROM locks WHERE lock_id = ?", lock_id)
        if removed:
            log.info("lock %s removed", lock_id)
        return removed > 0

    async def check_locks(
        self, reg: Registration, *, host_id: str | None, now: datetime
    ) -> Lock | None:
        """The first lock in force that matches this join, if any."""
        async with self._db.transaction() as tx:
            return await _matching_lock(tx, reg, _identity(reg), host_id, now)

    def __repr__(self) -> str:
        return f"<Registry {self._db!r}>"


async def open_registry(
    database: str | None, *, data_dir: Path, import_from: Path | None = None
) -> Registry:
    """Open, migrate and (once) import: the registry an auth service starts with."""
    db = await open_database(database, data_dir)
    registry = Registry(db)
    try:
        before, after = await registry.migrate()
        if before != after:
            log.info("registry schema migrated from version %s to %s", before, after)
        if import_from is not None:
            await registry.import_json_records(import_from)
    except BaseException:
        await registry.aclose()
        raise
    return registry


# --- helpers (one transaction each caller holds) -------------------------------------------


def _identity(reg: Registration) -> VmIdentity:
    return VmIdentity.of(reg.join.tenant, reg.join.subscription, reg.join.vm_id)


def _kind(value: object) -> JoinKind:
    return "renewal" if value == "renewal" else "new"


async def _meta(tx: Tx, key: str) -> str | None:
    row = await tx.fetchone("SELECT value FROM registry_meta WHERE key = ?", key)
    return str(row[0]) if row is not None else None


async def _stored(tx: Tx, key: str) -> tuple[RegistrationRecord, JoinKind] | None:
    row = await tx.fetchone("SELECT record, kind FROM registrations WHERE idempotency_key = ?", key)
    if row is None:
        return None
    return RegistrationRecord.from_json(json.loads(row[0])), _kind(row[1])


def _replayed(stored: tuple[RegistrationRecord, JoinKind], digest: str) -> Registered:
    record, kind = stored
    if record.request_digest != digest:
        raise IdempotencyConflict("idempotency_key was already used for a different registration")
    return Registered(record=record, kind=kind, replay=True)


async def _insert_registration(tx: Tx, record: RegistrationRecord, kind: JoinKind) -> bool:
    doc = json.dumps(record.to_json(), sort_keys=True)
    return (
        await tx.execute(
            "INSERT INTO registrations (idempotency_key, host_id, request_digest, kind, "
            "registered_at, record) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (idempotency_key) DO NOTHING",
            record.idempotency_key,
            record.host_id,
            record.request_digest,
            kind,
            record.registered_at,
            doc,
        )
        == 1
    )


async def _insert_host(
    tx: Tx,
    host_id: str,
    ident: VmIdentity,
    reg: Registration,
    first_key: str,
    first_joined: datetime,
    last_renewed: datetime,
) -> bool:
    return (
        await tx.execute(
            "INSERT INTO hosts (host_id, tenant, subscription, vm_id, resource_group, "
            "resource_id, node_name, role, token_name, first_key, first_joined, "
            "last_renewed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant, subscription, vm_id) WHERE removed_at IS NULL DO NOTHING",
            host_id,
            ident.tenant,
            ident.subscription,
            ident.vm_id,
            reg.join.resource_group,
            reg.join.resource_id,
            reg.host.node_name,
            reg.role,
            reg.token_name,
            first_key,
            first_joined,
            last_renewed,
        )
        == 1
    )


async def _matching_lock(
    tx: Tx, reg: Registration, ident: VmIdentity, host_id: str | None, now: datetime
) -> Lock | None:
    rows = await tx.fetchall(
        f"SELECT {_LOCK_COLUMNS} FROM locks WHERE "  # noqa: S608 - constant SQL
        "(target = 'host' AND value = ?) OR (target = 'vm_id' AND value = ?) OR "
        "(target = 'subscription' AND value = ?) OR (target = 'token' AND value = ?) "
        "ORDER BY created_at, lock_id",
        (host_id or "").lower(),
        ident.vm_id,
        ident.subscription,
        reg.token_name,
    )
    for row in rows:
        lock = _lock(row)
        if lock.active(now):
            return lock
    return None


def _opt_dt(value: object) -> datetime | None:
    return None if value is None else as_datetime(value)


def _host(row: Row) -> HostRecord:
    return HostRecord(
        host_id=str(row[0]),
        tenant=str(row[1]),
        subscription=str(row[2]),
        vm_id=str(row[3]),
        resource_group=str(row[4]),
        resource_id=str(row[5]),
        node_name=str(row[6]),
        role=str(row[7]),
        token_name=str(row[8]),
        first_joined=as_datetime(row[9]),
        last_renewed=as_datetime(row[10]),
        cert_expiry=_opt_dt(row[11]),
        renewals=int(row[12]),
        removed_at=_opt_dt(row[13]),
    )


def _lock(row: Row) -> Lock:
    return Lock(
        lock_id=str(row[0]),
        target=LockTarget(row[1]),
        value=str(row[2]),
        reason=str(row[3]),
        created_at=as_datetime(row[4]),
        expires_at=_opt_dt(row[5]),
    )
