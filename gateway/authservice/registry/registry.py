"""The auth service's registry: one host per VM, registrations by key, locks.

``Registry.register`` is the one write path of a join, in two transactions with the
signing between them (a signing backend may be a network call — Vault — and none runs
inside a transaction):

1. first transaction: a known idempotency key answers with the stored registration (a
   gateway's retry, on this replica or another) — or a conflict if the request differs;
   the live host of the VM's attested identity is read, the locks matching the join are
   checked (a match is :class:`HostLocked`), and a missing host is inserted with a fresh
   ID — ``ON CONFLICT DO NOTHING`` on the unique index, so when two replicas race, one
   inserts and the other, once the winner commits, reads the winner's host;
2. outside any transaction: ``await issue(host_id)`` signs the certificates. If it
   raises, a host this join inserted is deleted again (unless a registration refers to
   it meanwhile) and nothing is recorded;
3. second transaction: the host must still be live and unlocked (an operator may have
   acted while we signed); the registration is inserted by key (``ON CONFLICT DO
   NOTHING``: if another replica — or a concurrent retry — stored the same key meanwhile,
   its answer is returned and ours is dropped, never delivered) and the host's renewal
   time and certificate expiry are updated.

So no registration is recorded without its certificates, and none twice.

A host's ID is only ever read back for the same (tenant, subscription, vmId), so another
VM can never obtain it; a new vmId (the VM was re-created) is a new host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Self

from gateway.authservice.registry.db import (
    Body,
    PostgresDatabase,
    Row,
    SqliteDatabase,
    as_datetime,
    execute,
    one,
    open_database,
    rows,
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
from gateway.core.files import write_atomic
from gateway.protocol import RegisterResult, Registration

__all__ = ["Registry", "open_registry"]

log = logging.getLogger(__name__)

# Rounds of "read host, else insert" before giving up: each lost insert means another
# replica committed the host, which the next read sees; more than a few is a fault.
_HOST_ROUNDS = 5

_HOST_COLUMNS = (
    "host_id, tenant, subscription, vm_id, resource_group, resource_id, node_name, role, "
    "token_name, first_joined, last_renewed, cert_expiry, renewals, removed_at, labels"
)
_LOCK_COLUMNS = "lock_id, target, value, reason, created_at, expires_at"
# Written into a JSON records directory once the registry holds its records.
_IMPORT_MARKER = ".imported"

# Signs a host's certificates (outside any transaction): host ID -> the answer.
Issue = Callable[[str], Awaitable[RegisterResult]]


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
        dialect = self._db.dialect
        return await self._db.run(lambda: migrate(dialect))

    async def import_json_records(self, directory: Path) -> int | None:
        """Import a directory of ``store.py``'s JSON files once (its first start here).

        Returns how many records were read, or None if the directory was imported before
        (its ``.imported`` marker) or does not exist. The marker is the directory's, not
        the database's: replicas that kept their own JSON directories before sharing one
        PostgreSQL each bring theirs in. Inserts are idempotent (by idempotency key; a VM
        that already has a host keeps it), so an import interrupted before its marker is
        simply done again. An unreadable file stops the start: skipping it would forget an
        idempotency key. Records made before hosts existed each carry their own random
        host ID; a VM's host becomes the ID of its *latest* record, the identity its node
        holds now.
        """
        marker = directory / _IMPORT_MARKER
        if not await asyncio.to_thread(directory.is_dir) or await asyncio.to_thread(marker.exists):
            return None
        records = await asyncio.to_thread(read_records, directory)
        dialect = self._db.dialect

        def body() -> Body[int]:
            yield from serialize_startup(dialect)  # replicas on one directory: one at a time
            added = 0
            for rec in records:
                if (yield from _insert_registration(rec, "new")):
                    added += 1
            latest: dict[VmIdentity, RegistrationRecord] = {}
            first: dict[VmIdentity, datetime] = {}
            for rec in records:  # oldest first
                ident = _identity(rec.registration)
                latest[ident] = rec
                first.setdefault(ident, rec.registered_at)
            for ident, rec in latest.items():
                yield from _insert_host(
                    rec.host_id,
                    ident,
                    rec.registration,
                    rec.idempotency_key,
                    first[ident],
                    rec.registered_at,
                )
            # A trail in the database of what was imported from where.
            yield execute(
                "INSERT INTO registry_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                f"json_import {uuid.uuid4()}",
                json.dumps({"directory": str(directory), "records": len(records)}),
            )
            return added

        added = await self._db.run(body)
        stamp = json.dumps({"records": len(records), "added": added}).encode() + b"\n"
        await asyncio.to_thread(write_atomic, marker, stamp, mode=0o600)
        if records:
            log.info(
                "imported %s JSON registration records from %s (%s new to the registry)",
                len(records),
                directory,
                added,
            )
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
        :class:`RegistryUnavailable`, and whatever ``issue`` raises (nothing recorded).
        """
        found = await self._db.run(lambda: _begin(reg, digest, now))
        if isinstance(found, Registered):
            return found
        host_id, kind = found
        try:
            result = await issue(host_id)
        except BaseException:
            if kind == "new":
                # Best effort: a host left behind is the same join's on its retry (same key).
                with contextlib.suppress(RegistryUnavailable):
                    await self._db.run(lambda: _forget_unissued_host(host_id, reg.idempotency_key))
            raise
        record = RegistrationRecord(
            host_id=host_id,
            idempotency_key=reg.idempotency_key,
            request_digest=digest,
            registered_at=now,
            gateway=gateway,
            registration=reg,
            result=result,
        )
        return await self._db.run(lambda: _complete(record, kind, digest, now, cert_expiry))

    # --- reads ------------------------------------------------------------------------------

    async def registrations(self) -> list[RegistrationRecord]:
        """Every registration, oldest first."""

        def body() -> Body[list[Row]]:
            found: list[Row] = yield rows(
                "SELECT record FROM registrations ORDER BY registered_at, host_id"
            )
            return found

        found = await self._db.run(body, write=False)
        return [RegistrationRecord.from_json(json.loads(r[0])) for r in found]

    async def registration_kinds(self) -> dict[str, JoinKind]:
        """Each idempotency key's kind of join ("new" or "renewal")."""

        def body() -> Body[list[Row]]:
            found: list[Row] = yield rows("SELECT idempotency_key, kind FROM registrations")
            return found

        return {str(k): _kind(v) for k, v in await self._db.run(body, write=False)}

    async def hosts(self, *, include_removed: bool = False) -> list[HostRecord]:
        where = "" if include_removed else " WHERE removed_at IS NULL"

        def body() -> Body[list[Row]]:
            found: list[Row] = yield rows(
                f"SELECT {_HOST_COLUMNS} FROM hosts{where} ORDER BY first_joined, host_id"  # noqa: S608 - constant SQL
            )
            return found

        return [_host(r) for r in await self._db.run(body, write=False)]

    async def host(self, host_id: str) -> HostRecord | None:
        def body() -> Body[Row | None]:
            found: Row | None = yield one(
                f"SELECT {_HOST_COLUMNS} FROM hosts WHERE host_id = ?",  # noqa: S608 - constant SQL
                host_id,
            )
            return found

        row = await self._db.run(body, write=False)
        return _host(row) if row is not None else None

    async def remove_host(self, host_id: str, *, now: datetime) -> bool:
        """Mark a live host removed (kept for the record); its VM's next join is a new host.
        False when there is no such live host."""

        def body() -> Body[int]:
            count: int = yield execute(
                "UPDATE hosts SET removed_at = ? WHERE host_id = ? AND removed_at IS NULL",
                now,
                host_id,
            )
            return count

        removed = await self._db.run(body)
        if removed:
            log.info("host %s removed", host_id)
        return removed > 0

    async def prune(self, *, stale_before: datetime, now: datetime) -> list[str]:
        """Remove every live host last renewed before ``stale_before``; their IDs."""

        def body() -> Body[list[str]]:
            found: list[Row] = yield rows(
                "SELECT host_id FROM hosts WHERE removed_at IS NULL AND last_renewed < ? "
                "ORDER BY last_renewed, host_id",
                stale_before,
            )
            ids = [str(r[0]) for r in found]
            for host_id in ids:
                yield execute(
                    "UPDATE hosts SET removed_at = ? WHERE host_id = ? AND removed_at IS NULL",
                    now,
                    host_id,
                )
            return ids

        pruned = await self._db.run(body)
        if pruned:
            log.info("pruned %s hosts not renewed since %s", len(pruned), stale_before.isoformat())
        return pruned

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

        def body() -> Body[None]:
            yield execute(
                f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant SQL
                lock.lock_id,
                str(lock.target),
                lock.value,
                lock.reason,
                lock.created_at,
                lock.expires_at,
            )

        await self._db.run(body)
        log.info("lock %s added: %s=%s (%s)", lock.lock_id, lock.target, lock.value, reason)
        return lock

    async def locks(self, *, now: datetime | None = None) -> list[Lock]:
        """Every lock, or (given ``now``) those still in force."""

        def body() -> Body[list[Row]]:
            found: list[Row] = yield rows(
                f"SELECT {_LOCK_COLUMNS} FROM locks ORDER BY created_at, lock_id"  # noqa: S608 - constant SQL
            )
            return found

        found = [_lock(r) for r in await self._db.run(body, write=False)]
        return found if now is None else [lk for lk in found if lk.active(now)]

    async def remove_lock(self, lock_id: str) -> bool:
        def body() -> Body[int]:
            count: int = yield execute("DELETE FROM locks WHERE lock_id = ?", lock_id)
            return count

        removed = await self._db.run(body)
        if removed:
            log.info("lock %s removed", lock_id)
        return removed > 0

    async def check_locks(
        self, reg: Registration, *, host_id: str | None, now: datetime
    ) -> Lock | None:
        """The first lock in force that matches this join, if any."""
        return await self._db.run(
            lambda: _matching_lock(reg, _identity(reg), host_id, now), write=False
        )

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


# --- transaction bodies ----------------------------------------------------------------------


def _begin(
    reg: Registration, digest: str, now: datetime
) -> Body[Registered | tuple[str, JoinKind]]:
    stored = yield from _stored(reg.idempotency_key)
    if stored is not None:
        return _replayed(stored, digest)
    return (yield from _host_for(reg, _identity(reg), now))


def _complete(
    record: RegistrationRecord,
    kind: JoinKind,
    digest: str,
    now: datetime,
    cert_expiry: datetime,
) -> Body[Registered]:
    reg = record.registration
    key = record.idempotency_key
    host_id = record.host_id
    live = yield one("SELECT 1 FROM hosts WHERE host_id = ? AND removed_at IS NULL", host_id)
    if live is None:
        # Removed (nodes rm, prune, a failed sibling's clean-up) while we signed: a retry
        # settles the VM's host afresh. The certificates we hold are never delivered.
        stored = yield from _stored(key)
        if stored is not None:
            return _replayed(stored, digest)
        raise RegistryUnavailable("the host was removed while its certificates were signed")
    lock = yield from _matching_lock(reg, _identity(reg), host_id, now)
    if lock is not None:
        raise HostLocked(lock)  # locked while we signed
    if not (yield from _insert_registration(record, kind)):
        # Another replica (or a concurrent retry) stored this key meanwhile (we waited for
        # its commit): its answer is the one; ours was never delivered.
        stored = yield from _stored(key)
        if stored is None:  # pragma: no cover - the conflicting row cannot vanish
            raise RegistryUnavailable("registration vanished during a conflict")
        return _replayed(stored, digest)
    yield execute(
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
    yield from _write_labels(host_id, reg)
    return Registered(record=record, kind=kind, replay=False)


def _write_labels(host_id: str, reg: Registration) -> Body[None]:
    """The host's labels become this join's: a renewal updates them (a tag changed)."""
    yield execute(
        "UPDATE hosts SET labels = ? WHERE host_id = ?",
        json.dumps(dict(reg.labels), sort_keys=True),
        host_id,
    )


def _forget_unissued_host(host_id: str, first_key: str) -> Body[None]:
    """Signing failed for the join that inserted this host: delete it again, unless a
    registration refers to it by now (a concurrent join of the same VM succeeded)."""
    yield execute(
        "DELETE FROM hosts WHERE host_id = ? AND first_key = ? AND NOT EXISTS "
        "(SELECT 1 FROM registrations WHERE registrations.host_id = ?)",
        host_id,
        first_key,
        host_id,
    )


def _host_for(reg: Registration, ident: VmIdentity, now: datetime) -> Body[tuple[str, JoinKind]]:
    for _ in range(_HOST_ROUNDS):
        row = yield one(
            "SELECT host_id, first_key FROM hosts WHERE tenant = ? AND "
            "subscription = ? AND vm_id = ? AND removed_at IS NULL",
            ident.tenant,
            ident.subscription,
            ident.vm_id,
        )
        lock = yield from _matching_lock(reg, ident, str(row[0]) if row else None, now)
        if lock is not None:
            raise HostLocked(lock)
        if row is not None:
            # The first join's own retry (its registration was never stored) is still the
            # host's birth, not a renewal.
            return str(row[0]), "new" if row[1] == reg.idempotency_key else "renewal"
        host_id = str(uuid.uuid4())
        if (yield from _insert_host(host_id, ident, reg, reg.idempotency_key, now, now)):
            return host_id, "new"
        # Lost the race to another replica, whose insert we waited for: the next read
        # (a fresh snapshot at READ COMMITTED) sees its host.
    raise RegistryUnavailable("could not settle the VM's host (too many concurrent joins)")


def _identity(reg: Registration) -> VmIdentity:
    return VmIdentity.of(reg.join.tenant, reg.join.subscription, reg.join.vm_id)


def _kind(value: object) -> JoinKind:
    return "renewal" if value == "renewal" else "new"


def _stored(key: str) -> Body[tuple[RegistrationRecord, JoinKind] | None]:
    row = yield one("SELECT record, kind FROM registrations WHERE idempotency_key = ?", key)
    if row is None:
        return None
    return RegistrationRecord.from_json(json.loads(row[0])), _kind(row[1])


def _replayed(stored: tuple[RegistrationRecord, JoinKind], digest: str) -> Registered:
    record, kind = stored
    if record.request_digest != digest:
        raise IdempotencyConflict("idempotency_key was already used for a different registration")
    return Registered(record=record, kind=kind, replay=True)


def _insert_registration(record: RegistrationRecord, kind: JoinKind) -> Body[bool]:
    doc = json.dumps(record.to_json(), sort_keys=True)
    count = yield execute(
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
    return bool(count == 1)


def _insert_host(
    host_id: str,
    ident: VmIdentity,
    reg: Registration,
    first_key: str,
    first_joined: datetime,
    last_renewed: datetime,
) -> Body[bool]:
    count = yield execute(
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
    return bool(count == 1)


def _matching_lock(
    reg: Registration, ident: VmIdentity, host_id: str | None, now: datetime
) -> Body[Lock | None]:
    found: list[Row] = yield rows(
        f"SELECT {_LOCK_COLUMNS} FROM locks WHERE "  # noqa: S608 - constant SQL
        "(target = 'host' AND value = ?) OR (target = 'vm_id' AND value = ?) OR "
        "(target = 'subscription' AND value = ?) OR (target = 'token' AND value = ?) "
        "ORDER BY created_at, lock_id",
        (host_id or "").lower(),
        ident.vm_id,
        ident.subscription,
        reg.token_name,
    )
    for row in found:
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
        labels=json.loads(row[14]),
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
