"""Resource-group list mode of VM binding, against the fake Resource Manager.

Which joins use a point GET and which share one listing of their resource group is
decided by misses per group inside a window on the injected clock; every assertion is
about the calls the fake received (``client.calls``) and the binder's counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.azure.arm import ArmClient
from gateway.azure.vm_directory import VmDirectory
from gateway.core.clock import FixedClock
from gateway.core.errors import Code, GatewayError, Overloaded
from gateway.join.binding import VmBinder, VmIdentity
from tests.unit.arm_fake import NOW, SUB, FakeArm, start_fake_arm, vm_id, vm_model
from tests.unit.test_binding import BEARER, claims

N = 12


def rid(rg: str, i: int) -> str:
    return (
        f"/subscriptions/{SUB}/resourcegroups/{rg}/providers/Microsoft.Compute/"
        f"virtualMachines/web-{i}"
    )


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    async for fake in start_fake_arm():
        fake.vms["group1"] = [vm_model("group1", f"web-{i}", i) for i in range(N)]
        fake.vms["group2"] = [vm_model("group2", f"web-{i}", 50 + i) for i in range(N)]
        fake.page_size = 5
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def binder(
    session: aiohttp.ClientSession, arm: FakeArm, clock: FixedClock, **kw: Any
) -> tuple[VmBinder, ArmClient]:
    client = ArmClient(session, endpoint=arm.base, clock=clock, timeout=2.0)
    return VmBinder(VmDirectory(client, clock=clock, **kw)), client


async def settle(b: VmBinder) -> None:
    assert b.directory is not None
    await b.directory.idle()


async def bind(b: VmBinder, i: int, *, rg: str = "group1", doc: int | None = None) -> VmIdentity:
    offset = 0 if rg == "group1" else 50
    return await b.bind(
        doc_vm_id=vm_id(offset + i if doc is None else doc),
        doc_subscription=SUB,
        claims=claims(mirid=rid(rg, i)),
        bearer=BEARER,
    )


# (id, VMs missing together, seconds between arrivals, expected calls)
MODES: list[tuple[str, int, float, dict[str, int]]] = [
    ("one join is a point GET", 1, 0.0, {"get_vm": 1}),
    ("two joins of one group are two point GETs", 2, 0.0, {"get_vm": 2}),
    (
        "a third miss in the window lists the group for it and all after it",
        N,
        0.0,
        {"get_vm": 2, "list_vms": 3},
    ),
    ("misses spread wider than the window stay point GETs", 4, 6.0, {"get_vm": 4}),
]


@pytest.mark.parametrize(
    ("joins", "spacing", "calls"),
    [c[1:] for c in MODES],
    ids=[c[0] for c in MODES],
)
async def test_point_get_or_group_listing(
    session: aiohttp.ClientSession,
    arm: FakeArm,
    joins: int,
    spacing: float,
    calls: dict[str, int],
) -> None:
    arm.delay = 0.02
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, list_threshold=3, list_window=5.0)
    tasks = []
    for i in range(joins):
        tasks.append(asyncio.create_task(bind(b, i)))
        await asyncio.sleep(0)
        if spacing:
            await tasks[-1]
            clock.advance(spacing)
    results = await asyncio.gather(*tasks)
    assert [r.vm_name for r in results] == [f"web-{i}" for i in range(joins)]
    assert client.calls == calls


async def test_a_listed_group_answers_later_joins_without_a_call(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, group_map_ttl=120)
    await asyncio.gather(*(bind(b, i) for i in range(N)))
    calls = dict(client.calls)
    assert b.stats.rg_lists == 1 and b.stats.coalesced >= N - 3
    clock.advance(100)
    for i in range(N):
        await bind(b, i)
    assert client.calls == calls, "served from the map"
    # Another VM's document under this VM's token: the map knows it is someone else's.
    with pytest.raises(GatewayError) as info:
        await bind(b, 1, doc=2)
    assert info.value.code == Code.VM_BINDING_FAILED
    assert client.calls == calls
    clock.advance(21)  # the map expired: a lone join is a point GET again
    await bind(b, 7)
    assert client.calls["get_vm"] == calls["get_vm"] + 1


async def test_groups_are_listed_separately_and_once_each(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    b, client = binder(session, arm, FixedClock(NOW))
    await asyncio.gather(*(bind(b, i, rg=rg) for rg in ("group1", "group2") for i in range(N)))
    assert b.stats.rg_lists == 2
    assert client.calls["list_vms"] == 2 * 3, "three pages per group"
    assert client.calls["get_vm"] <= 2 * 2


async def test_a_missing_group_is_remembered_for_the_negative_ttl(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, negative_ttl=30, list_threshold=1)
    for _ in range(3):
        with pytest.raises(GatewayError) as info:
            await bind(b, 1, rg="gone")
        assert info.value.code == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vms": 1}
    clock.advance(31)
    with pytest.raises(GatewayError):
        await bind(b, 1, rg="gone")
    assert client.calls == {"list_vms": 2}


async def test_an_unknown_vmid_rereads_the_group_once_per_interval(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, refresh_interval=30, list_threshold=1)
    await bind(b, 0)
    await settle(b)  # the listing runs on after web-0's page answered it
    assert client.calls == {"list_vms": 3}
    arm.vms["group1"].append(vm_model("group1", "web-99", 99))  # created after the listing
    clock.advance(5)
    for _ in range(3):
        with pytest.raises(Overloaded) as over:
            await bind(b, 99, doc=99)
        assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
        assert over.value.retry_after == pytest.approx(25)
    assert client.calls == {"list_vms": 3} and b.stats.refresh_limited == 3
    clock.advance(25)
    arm.delay = 0.02
    results = await asyncio.gather(*(bind(b, 99, doc=99) for _ in range(10)))
    assert {r.vm_name for r in results} == {"web-99"}
    assert client.calls == {"list_vms": 6}, "ten concurrent unknown vmIds, one reread"
    assert b.stats.refreshes == 1


async def test_a_group_this_identity_may_not_list_falls_back_to_point_gets(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.list_status = 403
    b, client = binder(session, arm, FixedClock(NOW), list_threshold=1)
    results = await asyncio.gather(*(bind(b, i) for i in range(4)))
    assert [r.vm_name for r in results] == [f"web-{i}" for i in range(4)]
    assert client.calls == {"list_vms": 1, "get_vm": 4}
    assert b.stats.list_fallbacks == 1
    await bind(b, 5)
    assert client.calls == {"list_vms": 1, "get_vm": 5}, "no second listing attempt"


async def test_a_throttled_listing_turns_its_waiters_to_point_reads(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    # Compute's list budget answers 429 while subscription reads are left: the joins that
    # waited on the listing are point reads, and the group is not listed again until
    # Retry-After has passed.
    arm.list_status = 429
    arm.status_headers = {"Retry-After": "7"}
    clock = FixedClock(NOW)
    b, client = binder(session, arm, clock, list_threshold=1)
    results = await asyncio.gather(*(bind(b, i) for i in range(5)))
    assert [r.vm_name for r in results] == [f"web-{i}" for i in range(5)]
    assert client.calls == {"list_vms": 1, "get_vm": 5}
    await bind(b, 6)
    assert client.calls == {"list_vms": 1, "get_vm": 6}, "lists held: a point read"
    arm.list_status = None
    clock.advance(7)
    await bind(b, 7)
    await settle(b)
    assert client.calls == {"list_vms": 1 + 3, "get_vm": 6}, "listed after the hold, 3 pages"


async def test_a_throttled_subscription_refuses_every_waiter(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.list_status = 429
    arm.status_headers = {"Retry-After": "7"}
    arm.reads_left = 1  # ARM reports no subscription reads left either
    b, client = binder(session, arm, FixedClock(NOW), list_threshold=1)
    outcomes = await asyncio.gather(*(bind(b, i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(o, Overloaded) for o in outcomes)
    assert {o.code for o in outcomes if isinstance(o, Overloaded)} == {Code.AZURE_BUDGET_EXHAUSTED}
    assert client.calls == {"list_vms": 1}


async def test_a_listing_keeps_only_vms_of_its_own_group_as_azure_compares_names(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    # The listing of "kube" answers with a VM whose ID names "\u212aube" (Kelvin sign):
    # another group to Resource Manager, though str.lower() makes both "kube". It must not
    # enter kube's map, or a token naming kube/web-9 would bind to the other group's VM.
    arm.vms["kube"] = [vm_model("kube", "web-1", 1), vm_model("\u212aube", "web-9", 9)]
    b, client = binder(session, arm, FixedClock(NOW), list_threshold=1)
    ours, other = await asyncio.gather(
        bind(b, 1, rg="kube", doc=1), bind(b, 9, rg="kube", doc=9), return_exceptions=True
    )
    assert isinstance(ours, VmIdentity) and ours.resource_group.lower() == "kube"
    assert isinstance(other, GatewayError) and other.code == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vms": 1}
