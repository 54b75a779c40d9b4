"""Token ↔ document binding, with the real ARM client against the fake Resource Manager.

The fake counts requests, so caching and single flight are asserted as ARM calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.azure.arm import ArmClient
from gateway.azure.token import TokenClaims
from gateway.azure.vm_directory import VmDirectory
from gateway.core.clock import FixedClock
from gateway.core.errors import Code, GatewayError, Overloaded
from gateway.join.binding import VmBinder, VmIdentity
from tests.unit.arm_fake import (
    NOW,
    SUB,
    SUB2,
    FakeArm,
    start_fake_arm,
    vm_id,
    vm_model,
    vmss_vm_model,
)

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
BEARER = "eyJ.fake.bearer"
RG = f"/subscriptions/{SUB}/resourcegroups/group1/providers"
WEB1 = f"{RG}/Microsoft.Compute/virtualMachines/web-1"
WEB9 = f"{RG}/Microsoft.Compute/virtualMachines/web-9"
POOL = f"{RG}/Microsoft.Compute/virtualMachineScaleSets/pool"
POOL_1 = f"{POOL}/virtualMachines/1"
UAI = f"{RG}/Microsoft.ManagedIdentity/userAssignedIdentities/joiner"
STORAGE = f"{RG}/Microsoft.Storage/storageAccounts/data"
WEBAPP = f"{RG}/Microsoft.Web/sites/app"


def claims(*, mirid: str | None = None, az_rid: str | None = None) -> TokenClaims:
    return TokenClaims(
        tid=TENANT,
        oid="o",
        sub="s",
        appid=None,
        iss=f"https://sts.windows.net/{TENANT}/",
        aud="https://management.azure.com/",
        iat=NOW - 60,
        nbf=NOW - 60,
        exp=NOW + 3600,
        xms_mirid=mirid,
        xms_az_rid=az_rid,
    )


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    async for fake in start_fake_arm():
        fake.vms["group1"] = [vm_model("group1", "web-1", 1), vm_model("group1", "web-2", 2)]
        fake.vmss["pool"] = [vmss_vm_model("group1", "pool", i) for i in range(3)]
        fake.page_size = 10
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def binder(
    session: aiohttp.ClientSession, arm: FakeArm, clock: FixedClock, **kw: Any
) -> tuple[VmBinder, ArmClient]:
    client = ArmClient(session, endpoint=arm.base, clock=clock, timeout=1.0)
    return VmBinder(VmDirectory(client, clock=clock, **kw)), client


# (id, mirid, az_rid, doc vmId, doc subscription, expected code | expected identity fields)
Expect = Code | dict[str, Any]
CASES: list[tuple[str, str | None, str | None, str, str, Expect]] = [
    (
        "a user-assigned identity on a VM binds",
        UAI,
        WEB1,
        vm_id(1),
        SUB,
        {
            "identity_kind": "user_assigned",
            "resource_group": "GROUP1",
            "vm_name": "web-1",
            "scale_set": None,
        },
    ),
    (
        "a system-assigned identity on a VM binds",
        WEB1,
        None,
        vm_id(1),
        SUB,
        {"identity_kind": "system_assigned", "resource_group": "GROUP1", "vm_name": "web-1"},
    ),
    (
        "a user-assigned identity on a scale set binds to the instance with that vmId",
        UAI,
        POOL,
        vm_id(101),
        SUB,
        {
            "identity_kind": "user_assigned",
            "vm_name": "pool_1",
            "scale_set": "pool",
            "resource_group": "group1",
        },
    ),
    (
        "a system-assigned identity on a scale set binds",
        POOL,
        None,
        vm_id(102),
        SUB,
        {"identity_kind": "system_assigned", "vm_name": "pool_2", "scale_set": "pool"},
    ),
    (
        "a token naming a scale set instance binds to that instance",
        UAI,
        POOL_1,
        vm_id(101),
        SUB,
        {"vm_name": "pool_1", "scale_set": "pool"},
    ),
    (
        "a document subscription in upper case still matches",
        WEB1,
        None,
        vm_id(1),
        SUB.upper(),
        {"vm_name": "web-1"},
    ),
    (
        "a document vmId in upper case still matches",
        WEB1,
        None,
        vm_id(1).upper(),
        SUB,
        {"vm_name": "web-1"},
    ),
    (
        "a document from another subscription is refused",
        UAI,
        WEB1,
        vm_id(1),
        SUB2,
        Code.SUBSCRIPTION_MISMATCH,
    ),
    ("another VM's document is refused", UAI, WEB1, vm_id(2), SUB, Code.VM_BINDING_FAILED),
    (
        "a VM Resource Manager does not know is refused",
        UAI,
        WEB9,
        vm_id(1),
        SUB,
        Code.VM_BINDING_FAILED,
    ),
    ("a vmId outside the scale set is refused", UAI, POOL, vm_id(1), SUB, Code.VM_BINDING_FAILED),
    (
        "another instance of the named instance's scale set is refused",
        UAI,
        POOL_1,
        vm_id(102),
        SUB,
        Code.VM_BINDING_FAILED,
    ),
    (
        "a document vmId that is not a GUID is refused",
        WEB1,
        None,
        "web-1",
        SUB,
        Code.VM_BINDING_FAILED,
    ),
    (
        "a user-assigned identity without xms_az_rid is unsupported",
        UAI,
        None,
        vm_id(1),
        SUB,
        Code.IDENTITY_UNSUPPORTED,
    ),
    (
        "an identity on a storage account is unsupported",
        UAI,
        STORAGE,
        vm_id(1),
        SUB,
        Code.IDENTITY_UNSUPPORTED,
    ),
    (
        "a system-assigned identity on an app service is unsupported",
        WEBAPP,
        None,
        vm_id(1),
        SUB,
        Code.IDENTITY_UNSUPPORTED,
    ),
    (
        "a token naming no resource is unsupported",
        None,
        None,
        vm_id(1),
        SUB,
        Code.IDENTITY_UNSUPPORTED,
    ),
    (
        "a resource ID with a dot-dot segment is unsupported",
        UAI,
        WEB1 + "/../web-2",
        vm_id(1),
        SUB,
        Code.IDENTITY_UNSUPPORTED,
    ),
]


@pytest.mark.parametrize(
    ("mirid", "az_rid", "doc_vm_id", "doc_sub", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_bind(
    session: aiohttp.ClientSession,
    arm: FakeArm,
    mirid: str | None,
    az_rid: str | None,
    doc_vm_id: str,
    doc_sub: str,
    expected: Expect,
) -> None:
    b, _ = binder(session, arm, FixedClock(NOW))
    call = b.bind(
        doc_vm_id=doc_vm_id,
        doc_subscription=doc_sub,
        claims=claims(mirid=mirid, az_rid=az_rid),
        bearer=BEARER,
    )
    if isinstance(expected, Code):
        with pytest.raises(GatewayError) as info:
            await call
        assert info.value.code == expected
    else:
        identity = await call
        assert identity.arm_verified
        assert identity.subscription_id == SUB
        assert identity.vm_id == doc_vm_id.lower()
        for field, value in expected.items():
            assert getattr(identity, field) == value, field
    assert all(a == f"Bearer {BEARER}" for a in arm.auth)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (403, Code.VM_BINDING_FAILED),
        (429, Code.AZURE_BUDGET_EXHAUSTED),
        (500, Code.DEPENDENCY_UNAVAILABLE),
    ],
    ids=[
        "an identity without read access fails binding",
        "a throttled ARM asks to retry",
        "a failing ARM asks to retry",
    ],
)
async def test_arm_failures_surface_with_their_codes(
    session: aiohttp.ClientSession, arm: FakeArm, status: int, expected: Code
) -> None:
    arm.status = status
    b, _ = binder(session, arm, FixedClock(NOW))
    with pytest.raises(GatewayError) as info:
        await b.bind(
            doc_vm_id=vm_id(1), doc_subscription=SUB, claims=claims(mirid=WEB1), bearer=BEARER
        )
    assert info.value.code == expected


DISABLED: list[tuple[str, str | None, str | None, str, str, Expect]] = [
    (
        "a VM binds from the token alone",
        UAI,
        WEB1,
        vm_id(1),
        SUB,
        {"resource_group": "group1", "vm_name": "web-1", "resource_id": WEB1},
    ),
    (
        "a scale set binds from the token alone",
        POOL,
        None,
        vm_id(101),
        SUB,
        {"scale_set": "pool", "vm_name": "pool"},
    ),
    (
        "a scale set instance is named from the token",
        UAI,
        POOL_1,
        vm_id(101),
        SUB,
        {"scale_set": "pool", "vm_name": "pool_1"},
    ),
    (
        "another VM's document is NOT caught without ARM",
        UAI,
        WEB1,
        vm_id(2),
        SUB,
        {"vm_id": vm_id(2).lower()},
    ),
    (
        "a document from another subscription is still refused",
        UAI,
        WEB1,
        vm_id(1),
        SUB2,
        Code.SUBSCRIPTION_MISMATCH,
    ),
    (
        "an unsupported identity is still refused",
        UAI,
        None,
        vm_id(1),
        SUB,
        Code.IDENTITY_UNSUPPORTED,
    ),
]


@pytest.mark.parametrize(
    ("mirid", "az_rid", "doc_vm_id", "doc_sub", "expected"),
    [c[1:] for c in DISABLED],
    ids=[c[0] for c in DISABLED],
)
async def test_binding_disabled_makes_no_arm_call(
    session: aiohttp.ClientSession,
    arm: FakeArm,
    mirid: str | None,
    az_rid: str | None,
    doc_vm_id: str,
    doc_sub: str,
    expected: Expect,
) -> None:
    clock = FixedClock(NOW)
    client = ArmClient(session, endpoint=arm.base, clock=clock)
    for b in (
        VmBinder(VmDirectory(client, clock=clock), enabled=False),
        VmBinder(None, enabled=False),
    ):
        call = b.bind(
            doc_vm_id=doc_vm_id,
            doc_subscription=doc_sub,
            claims=claims(mirid=mirid, az_rid=az_rid),
            bearer=BEARER,
        )
        if isinstance(expected, Code):
            with pytest.raises(GatewayError) as info:
                await call
            assert info.value.code == expected
        else:
            identity = await call
            assert not identity.arm_verified
            for field, value in expected.items():
                assert getattr(identity, field) == value, field
    assert arm.requests == [] and client.calls == {}


def test_enabled_binding_needs_an_arm_client() -> None:
    with pytest.raises(ValueError):
        VmBinder(None, enabled=True)


async def bind_web1(b: VmBinder, vm: int = 1) -> VmIdentity:
    return await b.bind(
        doc_vm_id=vm_id(vm), doc_subscription=SUB, claims=claims(mirid=WEB1), bearer=BEARER
    )


async def bind_pool(b: VmBinder, vm: int) -> VmIdentity:
    return await b.bind(
        doc_vm_id=vm_id(vm),
        doc_subscription=SUB,
        claims=claims(mirid=UAI, az_rid=POOL),
        bearer=BEARER,
    )


async def test_concurrent_binds_of_one_vm_make_one_get(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 0.05
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, vm_cache_ttl=300)
    results = await asyncio.gather(*(bind_web1(b) for _ in range(20)))
    assert {r.resource_id for r in results} == {vm_model("group1", "web-1", 1)["id"]}
    assert client.calls == {"get_vm": 1}
    clock.advance(299)
    await bind_web1(b)
    assert client.calls == {"get_vm": 1}, "cached"
    clock.advance(2)
    await bind_web1(b)
    assert client.calls == {"get_vm": 2}, "expired after the TTL"


async def test_a_missing_vm_is_remembered_for_the_negative_ttl(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, negative_ttl=30)
    arm.vms["group1"] = []
    for _ in range(3):
        with pytest.raises(GatewayError) as info:
            await bind_web1(b)
        assert info.value.code == Code.VM_BINDING_FAILED
    assert client.calls == {"get_vm": 1}
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    clock.advance(31)
    await bind_web1(b)
    assert client.calls == {"get_vm": 2}


async def test_another_vms_document_does_not_cost_a_call_per_attempt(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, refresh_interval=30)
    await bind_web1(b)
    for _ in range(5):
        with pytest.raises(GatewayError) as info:
            await bind_web1(b, vm=2)
        assert info.value.code == Code.VM_BINDING_FAILED
    assert client.calls == {"get_vm": 1}


async def test_a_recreated_vm_is_reread_once_the_refresh_interval_passed(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, refresh_interval=30)
    await bind_web1(b)
    arm.vms["group1"] = [vm_model("group1", "web-1", 7)]  # deleted and recreated: new vmId
    clock.advance(31)
    identity = await bind_web1(b, vm=7)
    assert identity.vm_id == vm_id(7).lower()
    assert client.calls == {"get_vm": 2}


async def test_concurrent_binds_in_a_scale_set_make_one_listing(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 0.05
    arm.page_size = 2  # three instances: two pages, one listing
    b, client = binder(session, arm, FixedClock(NOW))
    results = await asyncio.gather(*(bind_pool(b, 100 + i % 3) for i in range(21)))
    assert sorted({r.vm_name for r in results}) == ["pool_0", "pool_1", "pool_2"]
    assert client.calls == {"list_vmss_vms": 2}


async def test_an_unknown_vmid_in_a_scale_set_refreshes_its_map_at_most_once_per_interval(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, refresh_interval=30)
    # Read for this very call: the vmId is simply not in the set.
    with pytest.raises(GatewayError) as info:
        await bind_pool(b, 103)
    assert info.value.code == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vmss_vms": 1}

    # The scale set grows; the new instance joins 5 s later: come back when a refresh is due.
    arm.vmss["pool"].append(vmss_vm_model("group1", "pool", 3))
    clock.advance(5)
    for _ in range(3):
        with pytest.raises(Overloaded) as over:
            await bind_pool(b, 103)
        assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
        assert over.value.retry_after == pytest.approx(25)
    assert client.calls == {"list_vmss_vms": 1}

    clock.advance(25)
    arm.delay = 0.05
    results = await asyncio.gather(*(bind_pool(b, 103) for _ in range(10)))
    assert {r.vm_name for r in results} == {"pool_3"}
    assert client.calls == {"list_vmss_vms": 2}, "ten concurrent misses, one refresh"

    # A vmId that is in no scale set, right after the refresh: refused, no call.
    clock.advance(1)
    with pytest.raises(Overloaded):
        await bind_pool(b, 999)
    assert client.calls == {"list_vmss_vms": 2}


async def test_nic_ips_are_read_from_the_vm_records_nics_and_cached_with_it(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    nic = f"/subscriptions/{SUB}/resourceGroups/net/providers/Microsoft.Network/networkInterfaces"
    model = vm_model("group1", "web-1", 1)
    model["properties"]["networkProfile"] = {
        "networkInterfaces": [
            {"id": f"{nic}/web-1-nic"},
            {"id": f"{nic}/web-1-nic2"},
            # Another subscription's NIC is never read with this VM's token.
            {"id": nic.replace(SUB, SUB2) + "/elsewhere"},
        ]
    }
    arm.vms["group1"] = [model]
    arm.nics = {
        "web-1-nic": ["10.0.0.4", "not-an-ip"],
        "web-1-nic2": ["fd00::4"],
        "elsewhere": ["10.9.9.9"],
    }
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, vm_cache_ttl=60.0)
    identity = await b.bind(
        doc_vm_id=vm_id(1), doc_subscription=SUB, claims=claims(mirid=WEB1), bearer=BEARER
    )
    ips = await b.nic_ips(identity, bearer=BEARER)
    assert {str(ip) for ip in ips} == {"10.0.0.4", "fd00::4"}
    assert client.calls["get_nic"] == 2
    await b.nic_ips(identity, bearer=BEARER)
    assert client.calls["get_nic"] == 2  # cached with the VM record's lifetime
    clock.advance(61)
    await b.nic_ips(identity, bearer=BEARER)
    assert client.calls["get_nic"] == 4


async def test_without_vm_binding_no_nic_is_read(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    b = VmBinder(None, enabled=False)
    identity = await b.bind(
        doc_vm_id=vm_id(1), doc_subscription=SUB, claims=claims(mirid=WEB1), bearer=BEARER
    )
    assert await b.nic_ips(identity, bearer=BEARER) == frozenset()
    assert arm.requests == []
