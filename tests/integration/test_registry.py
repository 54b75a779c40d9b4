"""The auth service's registry on both databases: SQLite (default) and a throwaway
PostgreSQL cluster of the test's own (tests/support/postgres.py).

The same table runs on both backends: one host per attested VM identity, registrations by
idempotency key, locks, the schema's migration, and the import of the JSON records of
earlier versions. Certificates are issued by a real ``HostAuthority``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.authservice import (
    AuthPaths,
    AuthService,
    HostAuthority,
    HostLocked,
    LockTarget,
    RegistrationRecord,
    Registry,
    init_auth_dir,
    open_registry,
)
from gateway.authservice.registry import (
    SCHEMA_VERSION,
    IdempotencyConflict,
    Registered,
    RegistryUnavailable,
    schema,
)
from gateway.authservice.registry.db import execute, open_database
from gateway.authservice.store import write_record
from gateway.authservice.wire import request_digest
from gateway.core.clock import SystemClock
from gateway.join.forward import AuthClient
from gateway.protocol import RegisterResult, Registration
from tests.integration.test_authservice import (
    auth_serve,
    gateway_ctx,
    make_reg,
    new_keys,
    post_raw,
)
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
TTL = timedelta(hours=1)
VM_A = "aaaaaaaa-0000-4000-8000-000000000001"
VM_B = "bbbbbbbb-0000-4000-8000-000000000002"
SUB = "11111111-1111-1111-1111-111111111111"
OTHER_SUB = "99999999-1111-1111-1111-111111111111"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster() as pg:
        yield pg


@pytest.fixture
def paths(tmp_path: Path) -> AuthPaths:
    return init_auth_dir(tmp_path / "auth")


@pytest.fixture
def authority(paths: AuthPaths) -> HostAuthority:
    return HostAuthority.load(paths)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data dir) or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("cluster")
    return await cluster.create_database()


@pytest.fixture
async def registry(database: str | None, paths: AuthPaths) -> AsyncIterator[Registry]:
    reg = await open_registry(
        database, data_dir=paths.data_dir, import_from=paths.registrations_dir
    )
    async with reg:
        yield reg


def vm_reg(
    vm_id: str = VM_A,
    key: str = "key-0001",
    *,
    subscription: str = SUB,
    token_name: str = "azure-token",
    node_name: str = "web-1",
) -> Registration:
    base = make_reg(new_keys(), key=key)
    return dataclasses.replace(
        base,
        token_name=token_name,
        join=dataclasses.replace(base.join, vm_id=vm_id, subscription=subscription),
        host=dataclasses.replace(base.host, node_name=node_name),
    )


async def register(
    registry: Registry,
    authority: HostAuthority,
    reg: Registration,
    now: datetime = NOW,
    *,
    before_issue: Callable[[str], Awaitable[None]] | None = None,
) -> Registered:
    """``before_issue(host_id)`` runs where the signing backend's network call would."""

    async def issue(host_id: str) -> RegisterResult:
        if before_issue is not None:
            await before_issue(host_id)
        return authority.issue(host_id=host_id, host=reg.host, now=now, ttl=TTL)

    return await registry.register(
        reg,
        digest=request_digest(reg),
        gateway="join-gateway",
        now=now,
        cert_expiry=now + TTL,
        issue=issue,
    )


# --- one identity per VM -----------------------------------------------------------------


async def test_the_same_vm_keeps_its_host_id_and_renews(
    registry: Registry, authority: HostAuthority
) -> None:
    first = await register(registry, authority, vm_reg(key="k1"))
    later = NOW + timedelta(minutes=20)
    second = await register(registry, authority, vm_reg(key="k2", node_name="web-1b"), later)
    assert (first.kind, second.kind) == ("new", "renewal")
    assert second.record.host_id == first.record.host_id
    assert second.record.result.tls_cert != first.record.result.tls_cert, "fresh certificates"
    [host] = await registry.hosts()
    assert (host.host_id, host.renewals, host.node_name) == (first.record.host_id, 1, "web-1b")
    assert (host.first_joined, host.last_renewed) == (NOW, later)
    assert host.cert_expiry == later + TTL
    assert await registry.registration_kinds() == {"k1": "new", "k2": "renewal"}


@pytest.mark.parametrize(
    "other",
    [
        vm_reg(VM_B, key="k2"),
        vm_reg(VM_A, key="k2", subscription=OTHER_SUB),
        vm_reg(VM_B, key="k2", node_name="web-1"),
    ],
    ids=[
        "another vmId is another host",
        "the same vmId in another subscription is another host",
        "another VM claiming the same node name is still another host",
    ],
)
async def test_another_vm_never_gets_an_existing_host_id(
    registry: Registry, authority: HostAuthority, other: Registration
) -> None:
    first = await register(registry, authority, vm_reg(key="k1"))
    second = await register(registry, authority, other)
    assert second.kind == "new"
    assert second.record.host_id != first.record.host_id
    assert len(await registry.hosts()) == 2


async def test_guid_case_does_not_make_a_second_host(
    registry: Registry, authority: HostAuthority
) -> None:
    first = await register(registry, authority, vm_reg(key="k1"))
    upper = vm_reg(VM_A.upper(), key="k2", subscription=SUB.upper())
    assert (await register(registry, authority, upper)).record.host_id == first.record.host_id


async def test_a_retried_key_answers_the_stored_registration_or_a_conflict(
    registry: Registry, authority: HostAuthority
) -> None:
    reg = vm_reg(key="k1")
    first = await register(registry, authority, reg)
    again = await register(registry, authority, reg, NOW + timedelta(seconds=5))
    assert (again.replay, again.kind, again.record) == (True, "new", first.record)
    with pytest.raises(IdempotencyConflict):
        await register(registry, authority, dataclasses.replace(reg, client_address="10.9.9.9"))
    assert len(await registry.registrations()) == 1


async def test_concurrent_joins_of_one_vm_make_one_host(
    registry: Registry, authority: HostAuthority
) -> None:
    outs = await asyncio.gather(
        *(register(registry, authority, vm_reg(key=f"k{i}")) for i in range(12))
    )
    assert len({o.record.host_id for o in outs}) == 1
    assert Counter(o.kind for o in outs) == {"new": 1, "renewal": 11}


# --- signing between the two transactions -----------------------------------------------


class SignerDown(Exception):
    pass


async def test_a_failed_signing_records_nothing_and_the_retry_is_the_first_join(
    registry: Registry, authority: HostAuthority
) -> None:
    async def fail(host_id: str) -> None:
        raise SignerDown(host_id)

    reg = vm_reg(key="k1")
    with pytest.raises(SignerDown):
        await register(registry, authority, reg, before_issue=fail)
    assert await registry.registrations() == []
    assert await registry.hosts() == [], "the host this join inserted is gone again"
    first = await register(registry, authority, reg)
    again = await register(registry, authority, reg)
    assert (first.kind, first.replay, again.replay) == ("new", False, True)
    assert again.record == first.record, "the retry answers the stored certificates"
    assert len(await registry.registrations()) == 1
    [host] = await registry.hosts()
    assert (host.host_id, host.renewals) == (first.record.host_id, 0)


async def test_a_failed_renewal_keeps_the_host(
    registry: Registry, authority: HostAuthority
) -> None:
    async def fail(host_id: str) -> None:
        raise SignerDown(host_id)

    first = await register(registry, authority, vm_reg(key="k1"))
    with pytest.raises(SignerDown):
        await register(registry, authority, vm_reg(key="k2"), before_issue=fail)
    [host] = await registry.hosts()
    assert (host.host_id, host.renewals) == (first.record.host_id, 0)
    assert await registry.registration_kinds() == {"k1": "new"}


async def test_concurrent_retries_of_one_key_sign_twice_but_record_once(
    registry: Registry, authority: HostAuthority
) -> None:
    # Both retries pass the first transaction before either signs (a gateway's retry while
    # the first attempt waits on Vault): both sign, one registration is stored, and both
    # answer it; the loser's certificates are never delivered.
    signing: list[str] = []
    both_signing = asyncio.Event()

    async def wait_for_the_other(host_id: str) -> None:
        signing.append(host_id)
        if len(signing) == 2:
            both_signing.set()
        await asyncio.wait_for(both_signing.wait(), 10)

    reg = vm_reg(key="k1")
    a, b = await asyncio.gather(
        register(registry, authority, reg, before_issue=wait_for_the_other),
        register(registry, authority, reg, before_issue=wait_for_the_other),
    )
    assert len(signing) == 2 and signing[0] == signing[1]
    assert a.record == b.record
    assert sorted([a.replay, b.replay]) == [False, True]
    assert len(await registry.registrations()) == 1
    [host] = await registry.hosts()
    assert host.renewals == 0


async def test_a_lock_added_while_signing_refuses_and_records_nothing(
    registry: Registry, authority: HostAuthority
) -> None:
    first = await register(registry, authority, vm_reg(key="k1"))

    async def lock_meanwhile(host_id: str) -> None:
        await registry.add_lock(LockTarget.HOST, host_id, reason="compromised", now=NOW)

    with pytest.raises(HostLocked):
        await register(registry, authority, vm_reg(key="k2"), before_issue=lock_meanwhile)
    assert await registry.registration_kinds() == {"k1": "new"}
    [host] = await registry.hosts()
    assert (host.host_id, host.renewals) == (first.record.host_id, 0)


async def test_a_host_removed_while_signing_is_retried_not_recorded(
    registry: Registry, authority: HostAuthority
) -> None:
    first = await register(registry, authority, vm_reg(key="k1"))

    async def remove_meanwhile(host_id: str) -> None:
        assert await registry.remove_host(host_id, now=NOW)

    with pytest.raises(RegistryUnavailable):
        await register(registry, authority, vm_reg(key="k2"), before_issue=remove_meanwhile)
    assert await registry.registration_kinds() == {"k1": "new"}
    retry = await register(registry, authority, vm_reg(key="k2"))
    assert retry.kind == "new" and retry.record.host_id != first.record.host_id


# --- locks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "value"),
    [
        (LockTarget.HOST, None),
        (LockTarget.VM_ID, VM_A.upper()),
        (LockTarget.SUBSCRIPTION, SUB),
        (LockTarget.TOKEN, "azure-token"),
    ],
    ids=[
        "a lock on the host ID refuses its VM",
        "a lock on the vmId refuses it (any case)",
        "a lock on the subscription refuses its VMs",
        "a lock on the token name refuses joins with it",
    ],
)
async def test_a_lock_refuses_and_unlock_restores(
    registry: Registry, authority: HostAuthority, target: LockTarget, value: str | None
) -> None:
    first = await register(registry, authority, vm_reg(key="k1"))
    lock = await registry.add_lock(
        target, value or first.record.host_id, reason="compromised", now=NOW
    )
    assert await registry.locks(now=NOW) == [lock]
    with pytest.raises(HostLocked) as exc_info:
        await register(registry, authority, vm_reg(key="k2"))
    assert exc_info.value.lock == lock
    # Another VM in another subscription with another token is not caught by this lock.
    free = vm_reg(VM_B, key="k3", subscription=OTHER_SUB, token_name="other-token")
    assert (await register(registry, authority, free)).kind == "new"
    assert await registry.remove_lock(lock.lock_id) is True
    assert await registry.remove_lock(lock.lock_id) is False
    after = await register(registry, authority, vm_reg(key="k4"))
    assert (after.kind, after.record.host_id) == ("renewal", first.record.host_id)


async def test_a_lock_on_a_vm_that_never_joined_creates_no_host(
    registry: Registry, authority: HostAuthority
) -> None:
    await registry.add_lock(LockTarget.VM_ID, VM_B, reason="decommissioned", now=NOW)
    with pytest.raises(HostLocked):
        await register(registry, authority, vm_reg(VM_B, key="k1"))
    assert await registry.hosts() == []
    assert await registry.registrations() == []


async def test_an_expired_lock_no_longer_refuses(
    registry: Registry, authority: HostAuthority
) -> None:
    lock = await registry.add_lock(
        LockTarget.VM_ID, VM_A, reason="maintenance", now=NOW, ttl=timedelta(minutes=10)
    )
    with pytest.raises(HostLocked):
        await register(registry, authority, vm_reg(key="k1"), NOW + timedelta(minutes=9))
    assert (await register(registry, authority, vm_reg(key="k2"), NOW + TTL)).kind == "new"
    assert await registry.locks() == [lock]
    assert await registry.locks(now=NOW + TTL) == []


@pytest.mark.parametrize(
    ("reason", "ttl"),
    [("", None), ("why", timedelta(0))],
    ids=["a lock without a reason is refused", "a lock with a non-positive ttl is refused"],
)
async def test_bad_locks_are_refused(
    registry: Registry, reason: str, ttl: timedelta | None
) -> None:
    with pytest.raises(ValueError):
        await registry.add_lock(LockTarget.VM_ID, VM_A, reason=reason, now=NOW, ttl=ttl)


# --- labels -------------------------------------------------------------------------------------

LABELS_1 = {"azure/location": "westeurope", "azure/tag/env": "prod", "azure/tag/team": "a"}
LABELS_2 = {"azure/location": "westeurope", "azure/tag/env": "staging"}


async def test_a_host_keeps_its_labels_and_a_renewal_updates_them(
    registry: Registry, authority: HostAuthority
) -> None:
    reg_1 = dataclasses.replace(vm_reg(key="k1"), labels=LABELS_1)
    first = await register(registry, authority, reg_1)
    [host] = await registry.hosts()
    assert dict(host.labels) == LABELS_1
    # A tag changed, another was removed: the renewal's labels replace the host's.
    later = NOW + timedelta(minutes=20)
    reg_2 = dataclasses.replace(vm_reg(key="k2"), labels=LABELS_2)
    await register(registry, authority, reg_2, later)
    host = await registry.host(first.record.host_id)
    assert host is not None and dict(host.labels) == LABELS_2
    # Each registration's record keeps the labels it came with.
    records = {r.idempotency_key: r for r in await registry.registrations()}
    assert dict(records["k1"].registration.labels) == LABELS_1
    assert dict(records["k2"].registration.labels) == LABELS_2
    # A resend of the first whose labels differ (re-verified after a tag changed) is its
    # stored answer, not a conflict: labels are not part of the idempotency digest.
    again = await register(registry, authority, dataclasses.replace(reg_1, labels=LABELS_2))
    assert again.replay and again.record.host_id == first.record.host_id
    assert dict(again.record.registration.labels) == LABELS_1


async def test_a_registry_of_schema_1_gains_labels_and_its_hosts_have_none(
    database: str | None, paths: AuthPaths, authority: HostAuthority
) -> None:
    db = await open_database(database, paths.data_dir)
    dialect = db.dialect

    def version_1():  # type: ignore[no-untyped-def]
        yield execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in schema._MIGRATIONS[0]:
            yield execute(statement.format(ts=schema._TS[dialect]))
        yield execute("INSERT INTO schema_version (version) VALUES (1)")
        yield execute(
            "INSERT INTO hosts (host_id, tenant, subscription, vm_id, resource_group, "
            "resource_id, node_name, role, token_name, first_key, first_joined, last_renewed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "old-host",
            "44444444-4444-4444-4444-444444444444",
            SUB,
            VM_A,
            "group1",
            "/subscriptions/x",
            "web-1",
            "Node",
            "azure-token",
            "k0",
            NOW,
            NOW,
        )

    await db.run(version_1)
    await db.aclose()
    async with await open_registry(database, data_dir=paths.data_dir) as reg:
        [host] = await reg.hosts()
        assert (host.host_id, dict(host.labels)) == ("old-host", {})
        reg_1 = dataclasses.replace(vm_reg(key="k1"), labels=LABELS_1)
        renewed = await register(reg, authority, reg_1)
        assert (renewed.kind, renewed.record.host_id) == ("renewal", "old-host")
        [host] = await reg.hosts()
        assert dict(host.labels) == LABELS_1


# --- schema and import ------------------------------------------------------------------------


async def test_the_schema_migrates_once_and_a_newer_one_is_refused(
    database: str | None, paths: AuthPaths
) -> None:
    async with await open_registry(database, data_dir=paths.data_dir) as reg:
        assert await reg.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)

        def newer():  # type: ignore[no-untyped-def]
            yield execute("INSERT INTO schema_version (version) VALUES (?)", 99)

        await reg._db.run(newer)
    with pytest.raises(ValueError, match="newer than this auth service"):
        await open_registry(database, data_dir=paths.data_dir)


async def test_json_records_are_imported_once(
    database: str | None, paths: AuthPaths, authority: HostAuthority
) -> None:
    """Records of earlier versions: each join had its own random host ID. The import keeps
    every record (a retried key still gets its stored answer) and makes the VM's host the
    ID of its latest record."""
    old: list[RegistrationRecord] = []
    for i, (vm, minutes) in enumerate([(VM_A, 0), (VM_A, 30), (VM_B, 10)]):
        reg = vm_reg(vm, key=f"old-{i}")
        at = NOW + timedelta(minutes=minutes)
        host_id = f"00000000-0000-4000-8000-00000000000{i}"
        record = RegistrationRecord(
            host_id=host_id,
            idempotency_key=reg.idempotency_key,
            request_digest=request_digest(reg),
            registered_at=at,
            gateway="join-gateway",
            registration=reg,
            result=authority.issue(host_id=host_id, host=reg.host, now=at, ttl=TTL),
        )
        write_record(paths.registrations_dir, record)
        old.append(record)

    async with await open_registry(
        database, data_dir=paths.data_dir, import_from=paths.registrations_dir
    ) as reg:
        assert await reg.registrations() == sorted(old, key=lambda r: r.registered_at)
        hosts = {h.vm_id: h for h in await reg.hosts()}
        assert hosts[VM_A].host_id == old[1].host_id, "the latest record's ID"
        assert (hosts[VM_A].first_joined, hosts[VM_A].last_renewed) == (
            NOW,
            NOW + timedelta(minutes=30),
        )
        assert hosts[VM_B].host_id == old[2].host_id
        replay = await register(reg, authority, old[0].registration)
        assert (replay.replay, replay.record) == (True, old[0])
        renewal = await register(reg, authority, vm_reg(VM_A, key="new-1"))
        assert (renewal.kind, renewal.record.host_id) == ("renewal", old[1].host_id)

    # A second start imports nothing again, even if a new file appears.
    extra = dataclasses.replace(old[0], idempotency_key="late", host_id="late-host")
    write_record(paths.registrations_dir, extra)
    async with await open_registry(
        database, data_dir=paths.data_dir, import_from=paths.registrations_dir
    ) as reg:
        assert await reg.import_json_records(paths.registrations_dir) is None
        assert len(await reg.registrations()) == 4  # three imported + the renewal


async def test_each_replicas_json_directory_is_imported_into_the_shared_database(
    database: str | None, tmp_path: Path, authority: HostAuthority
) -> None:
    """Two auth services that each kept their own JSON files, now sharing one database:
    both directories come in (the marker is the directory's), a VM known to both keeps
    one host, and a record present in both is stored once."""
    shared = database or f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    both = vm_reg(VM_A, key="in-both")
    dirs = {name: init_auth_dir(tmp_path / name) for name in ("replica-a", "replica-b")}
    for i, (name, vm) in enumerate([("replica-a", VM_A), ("replica-b", VM_A), ("replica-b", VM_B)]):
        reg = vm_reg(vm, key=f"{name}-{i}")
        host_id = f"00000000-0000-4000-8000-0000000000a{i}"
        for r in (reg, both):
            write_record(
                dirs[name].registrations_dir,
                RegistrationRecord(
                    host_id=host_id if r is reg else "00000000-0000-4000-8000-0000000000ff",
                    idempotency_key=r.idempotency_key,
                    request_digest=request_digest(r),
                    registered_at=NOW + timedelta(minutes=i),
                    gateway="join-gateway",
                    registration=r,
                    result=authority.issue(host_id=host_id, host=r.host, now=NOW, ttl=TTL),
                ),
            )
    for name in ("replica-a", "replica-b"):
        paths = dirs[name]
        async with await open_registry(
            shared, data_dir=paths.data_dir, import_from=paths.registrations_dir
        ):
            pass
        assert (paths.registrations_dir / ".imported").is_file()
    async with await open_registry(shared, data_dir=tmp_path) as reg:
        keys = sorted(r.idempotency_key for r in await reg.registrations())
        assert keys == ["in-both", "replica-a-0", "replica-b-1", "replica-b-2"]
        assert sorted(h.vm_id for h in await reg.hosts()) == [VM_A, VM_B]


async def test_an_unreadable_json_record_stops_the_start(
    database: str | None, paths: AuthPaths
) -> None:
    (paths.registrations_dir / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable registration record"):
        await open_registry(database, data_dir=paths.data_dir, import_from=paths.registrations_dir)


# --- the command line -----------------------------------------------------------------------


async def test_auth_serve_keeps_its_registry_in_the_given_postgresql(
    cluster: PostgresCluster, paths: AuthPaths
) -> None:
    url = await cluster.create_database()
    async with auth_serve("--data-dir", str(paths.data_dir), "--database", url) as service_url:
        client = AuthClient(url=service_url, ssl_context=gateway_ctx(paths), clock=SystemClock())
        async with client:
            first = await client.register(vm_reg(key="cli-1"))
            again = await client.register(vm_reg(key="cli-2"))
    assert (first.renewal, again.renewal, again.host_id) == (False, True, first.host_id)
    async with await open_registry(url, data_dir=paths.data_dir) as reg:
        [host] = await reg.hosts()
        assert (host.host_id, host.renewals) == (first.host_id, 1)
    assert not (paths.data_dir / "registry.sqlite3").exists(), "SQLite was not used"


@pytest.mark.parametrize(
    "url",
    ["mysql://root:hunter2@127.0.0.1/x", "postgresql://jg:hunter2@127.0.0.1:1/none"],
    ids=[
        "an unsupported database URL is a start-up failure",
        "an unreachable PostgreSQL is a start-up failure without its password",
    ],
)
async def test_auth_serve_refuses_a_database_it_cannot_use(paths: AuthPaths, url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "auth", "serve",
        "--data-dir", str(paths.data_dir), "--database", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3, (out, err)
    assert b"auth service failed to start" in err
    assert b"hunter2" not in out + err


async def test_the_auth_service_answers_a_locked_join_with_403_host_locked(
    paths: AuthPaths,
) -> None:
    async with AuthService(data_dir=paths.data_dir) as service:
        reg = vm_reg(key="http-1")
        status, body = await post_raw(service, gateway_ctx(paths), _body_of(reg))
        assert (status, body["renewal"]) == (200, False)
        lock = await service.registry.add_lock(
            LockTarget.HOST, body["host_id"], reason="stolen disk image", now=NOW
        )
        status, refused = await post_raw(service, gateway_ctx(paths), _body_of(vm_reg(key="h2")))
        assert (status, refused["error"]["code"]) == (403, "host_locked")
        assert "stolen disk image" in refused["error"]["message"]
        await service.registry.remove_lock(lock.lock_id)
        status, again = await post_raw(service, gateway_ctx(paths), _body_of(vm_reg(key="h3")))
        assert (status, again["host_id"], again["renewal"]) == (200, body["host_id"], True)


def _body_of(reg: Registration) -> bytes:
    return json.dumps(reg.to_json()).encode()


async def test_a_lost_postgresql_is_503_registry_unavailable_then_recovers(
    paths: AuthPaths,
) -> None:
    """Registration through a registry whose database went away: a retryable 503 with
    a code (the gateway retries it safely under the same idempotency key), never a 500 or
    a stall; when the database is back, the same join registers."""
    with PostgresCluster() as own:
        url = await own.create_database()
        async with AuthService(data_dir=paths.data_dir, database=url) as service:
            ok, body = await post_raw(service, gateway_ctx(paths), _body_of(vm_reg(key="p1")))
            assert ok == 200
            own.stop_server()
            retry = _body_of(vm_reg(key="p2"))
            status, down = await asyncio.wait_for(post_raw(service, gateway_ctx(paths), retry), 30)
            assert (status, down["error"]["code"]) == (503, "registry_unavailable")
            own.start_server()
            status, back = await post_raw(service, gateway_ctx(paths), retry)
            assert (status, back["host_id"], back["renewal"]) == (200, body["host_id"], True)
