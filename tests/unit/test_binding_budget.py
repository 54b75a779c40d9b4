"""The ARM read strategy under a tight list budget, against the fake Resource Manager.

``VmDirectory`` must use every budget it has: a join waits on a listing only while its
next page is affordable, and is otherwise answered by a point read; a paused listing
resumes at the page it stopped at; pages go to the listing most joins wait on; a partial
map answers the VMs it holds. Every assertion is about requests the fake received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.azure.arm import ArmClient
from gateway.azure.budget import SubscriptionBudget
from gateway.azure.resource_id import parse_resource_id
from gateway.azure.vm_directory import VmDirectory
from gateway.core.clock import FixedClock
from gateway.core.errors import Code, Overloaded
from tests.unit.arm_fake import NOW, SUB, FakeArm, start_fake_arm, vm_id, vm_model, vmss_vm_model
from tests.unit.test_binding import BEARER

COMPUTE = "Microsoft.Compute"
N = 12  # VMs per group: pages of 5, 5 and 2


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    async for fake in start_fake_arm():
        fake.vms["group1"] = [vm_model("group1", f"web-{i}", i) for i in range(N)]
        fake.vms["group2"] = [vm_model("group2", f"web-{i}", 50 + i) for i in range(N)]
        fake.vmss["pool"] = [vmss_vm_model("group1", "pool", i) for i in range(N)]
        fake.page_size = 5
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def directory(
    session: aiohttp.ClientSession,
    arm: FakeArm,
    clock: FixedClock,
    *,
    lists_per_minute: int = 300,
    **kw: Any,
) -> tuple[VmDirectory, ArmClient]:
    # No safety margin: the bucket holds exactly ``lists_per_minute`` pages, so "the next
    # page is a minute away" is exact on the fixed clock.
    budget = SubscriptionBudget(
        list_per_minute=lists_per_minute, safety_margin=0.0, max_wait=1.0, clock=clock
    )
    client = ArmClient(session, endpoint=arm.base, clock=clock, timeout=2.0, budget=budget)
    return VmDirectory(client, clock=clock, list_wait=1.0, **kw), client


def web(rg: str, i: int) -> str:
    return f"/subscriptions/{SUB}/resourcegroups/{rg}/providers/{COMPUTE}/virtualMachines/web-{i}"


async def find(d: VmDirectory, i: int, rg: str = "group1") -> str:
    offset = 0 if rg == "group1" else 50
    record = await d.find(parse_resource_id(web(rg, i)), vm_id(offset + i).lower(), BEARER)
    return record.name


def list_requests(arm: FakeArm, rg: str = "group1") -> list[str]:
    """The list pages requested for ``rg``, as their skip tokens ("0" for the first)."""
    out = []
    for path in arm.requests:
        if path.split("?")[0].endswith(
            f"/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
        ):
            out.append(path.partition("$skiptoken=")[2] or "0")
    return out


async def test_joins_turn_to_point_reads_when_the_next_page_is_not_affordable(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 0.02
    d, client = directory(session, arm, FixedClock(NOW), lists_per_minute=1, list_threshold=3)
    names = await asyncio.gather(*(find(d, i) for i in range(N)))
    await d.idle()
    assert names == [f"web-{i}" for i in range(N)], "every VM is found"
    # Two lone point reads, then one page (web-0..4) for the joins waiting on the listing;
    # the next page is a minute away, so web-5..11 are point reads instead of 503s.
    assert list_requests(arm) == ["0"]
    assert client.calls == {"list_vms": 1, "get_vm": 2 + 7}
    assert d.stats.partial_hits == 3 and d.stats.list_stalls == 7


async def test_a_paused_listing_resumes_at_the_page_it_stopped(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    d, client = directory(session, arm, clock, lists_per_minute=1, list_threshold=1)
    assert await find(d, 0) == "web-0"  # page one
    assert await find(d, 7) == "web-7", "page two is a minute away: a point read"
    assert await find(d, 3) == "web-3", "the partial map answers, no call"
    clock.advance(60)
    assert await find(d, 8) == "web-8"  # resumed: page two, not page one again
    clock.advance(60)
    assert await find(d, 11) == "web-11"  # page three completes the map
    await d.idle()
    assert list_requests(arm) == ["0", "5", "10"], "each page once"
    assert client.calls == {"list_vms": 3, "get_vm": 1}
    for i in range(N):  # the complete map answers everyone, no call
        assert await find(d, i) == f"web-{i}"
    assert client.calls == {"list_vms": 3, "get_vm": 1}


async def test_pages_go_to_the_listing_most_joins_wait_on(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 0.05
    d, _ = directory(session, arm, FixedClock(NOW), list_threshold=1, parallel_lists=1)
    first = asyncio.create_task(find(d, 11, "group1"))  # group1's first page is in flight
    await asyncio.sleep(0.01)
    crowd = [asyncio.create_task(find(d, i, "group2")) for i in (10, 11)]
    await asyncio.gather(first, *crowd)
    await d.idle()
    order = [
        ("group1" if "/group1/" in p else "group2", p.partition("$skiptoken=")[2] or "0")
        for p in arm.requests
    ]
    # After group1's first page, group2 (two waiters) gets every page before group1 (one).
    assert order == [
        ("group1", "0"),
        ("group2", "0"),
        ("group2", "5"),
        ("group2", "10"),
        ("group1", "5"),
        ("group1", "10"),
    ]


async def test_a_cancelled_join_leaves_the_listing_to_the_others(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 0.05
    d, client = directory(session, arm, FixedClock(NOW), list_threshold=1)
    leader = asyncio.create_task(find(d, 11))
    await asyncio.sleep(0.01)  # the leader started the listing; its first page is in flight
    others = [asyncio.create_task(find(d, i)) for i in (1, 6, 10)]
    await asyncio.sleep(0.01)
    leader.cancel()
    assert await asyncio.gather(*others) == ["web-1", "web-6", "web-10"]
    with pytest.raises(asyncio.CancelledError):
        await leader
    await d.idle()
    assert client.calls == {"list_vms": 3}, "one listing, each page once"
    assert d.stats.rg_lists == 1


async def test_a_cancelled_join_leaves_the_point_read_to_the_others(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 0.05
    d, client = directory(session, arm, FixedClock(NOW), list_threshold=100)
    leader = asyncio.create_task(find(d, 4))
    await asyncio.sleep(0.01)
    others = [asyncio.create_task(find(d, 4)) for _ in range(3)]
    await asyncio.sleep(0)
    leader.cancel()
    assert await asyncio.gather(*others) == ["web-4"] * 3
    assert client.calls == {"get_vm": 1}


def pool(instance: int | None = None) -> str:
    group = f"/subscriptions/{SUB}/resourcegroups/group1/providers/{COMPUTE}"
    base = f"{group}/virtualMachineScaleSets/pool"
    return base if instance is None else f"{base}/virtualMachines/{instance}"


async def test_a_scale_set_without_list_budget_is_point_read_when_the_token_names_the_instance(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    d, client = directory(session, arm, clock, lists_per_minute=1)
    first = await d.find(parse_resource_id(pool()), vm_id(100).lower(), BEARER)
    assert first.name == "pool_0"
    # Instance 9 is on page two, a minute away. A token naming the instance: a point read.
    record = await d.find(parse_resource_id(pool(9)), vm_id(109).lower(), BEARER)
    assert record.name == "pool_9"
    # A token naming only the scale set cannot be point read: come back when a page is.
    with pytest.raises(Overloaded) as over:
        await d.find(parse_resource_id(pool()), vm_id(108).lower(), BEARER)
    assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert over.value.retry_after == pytest.approx(60)
    assert client.calls == {"list_vmss_vms": 1, "get_vmss_vm": 1}
    clock.advance(60)
    record = await d.find(parse_resource_id(pool()), vm_id(108).lower(), BEARER)
    assert record.name == "pool_8"
    assert client.calls == {"list_vmss_vms": 2, "get_vmss_vm": 1}, "resumed at page two"


async def test_with_both_budgets_spent_a_join_comes_back_later(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    clock = FixedClock(NOW)
    budget = SubscriptionBudget(
        burst=3, refill_per_s=0.1, list_per_minute=1, safety_margin=0.0, max_wait=1.0, clock=clock
    )
    client = ArmClient(session, endpoint=arm.base, clock=clock, timeout=2.0, budget=budget)
    d = VmDirectory(client, clock=clock, list_wait=1.0, list_threshold=1)
    assert await find(d, 0) == "web-0"  # page one: one read, the one list call
    assert [await find(d, i) for i in (5, 6)] == ["web-5", "web-6"]  # point reads
    with pytest.raises(Overloaded) as over:
        await find(d, 7)
    assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert over.value.retry_after == pytest.approx(10.0), "the next read, at 0.1 a second"
    assert client.calls == {"list_vms": 1, "get_vm": 2}
