"""The ARM client against a fake Resource Manager (aiohttp on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.azure.arm import ArmClient, ArmReadKind, VmRecord
from gateway.azure.resource_id import parse_resource_id
from gateway.core.clock import FixedClock
from gateway.core.errors import Code, GatewayError, JoinRejected, Overloaded
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

BEARER = "eyJ.fake.bearer"


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    async for fake in start_fake_arm():
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(
    session: aiohttp.ClientSession, arm: FakeArm, clock: FixedClock | None = None, **kw: Any
) -> ArmClient:
    kw.setdefault("timeout", 0.5)
    return ArmClient(session, endpoint=arm.base, clock=clock or FixedClock(NOW), **kw)


VM1 = parse_resource_id(
    f"/subscriptions/{SUB}/resourcegroups/group1/providers/Microsoft.Compute/virtualMachines/web-1"
)


async def test_get_vm_returns_the_record_and_sends_the_bearer(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    c = client(session, arm)
    record = await c.get_vm(VM1, bearer=BEARER)
    assert record == VmRecord(
        resource_id=f"/subscriptions/{SUB}/resourceGroups/GROUP1/providers/Microsoft.Compute/virtualMachines/web-1",
        name="web-1",
        vm_id=vm_id(1).lower(),
        resource_group="GROUP1",
        subscription=SUB,
        location="westeurope",
        tags={},
    )
    assert arm.auth == [f"Bearer {BEARER}"]
    assert arm.requests == [
        f"/subscriptions/{SUB}/resourceGroups/group1/providers/Microsoft.Compute/virtualMachines/web-1?api-version=2024-07-01"
    ]
    assert c.calls == {"get_vm": 1}
    assert c.remaining_subscription_reads == 249
    assert c.remaining_resource == {
        "Microsoft.Compute/GetVM3Min": 239,
        "Microsoft.Compute/GetVM30Min": 1199,
    }


async def test_get_vm_of_a_missing_vm_is_none(session: aiohttp.ClientSession, arm: FakeArm) -> None:
    arm.vms["group1"] = []
    assert await client(session, arm).get_vm(VM1, bearer=BEARER) is None


async def test_list_vms_follows_next_link_across_pages(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [vm_model("group1", f"web-{i}", i) for i in range(5)]
    c = client(session, arm)
    records = await c.list_vms(SUB, "group1", bearer=BEARER)
    assert [r.name for r in records] == [f"web-{i}" for i in range(5)]
    assert c.calls == {"list_vms": 3}
    assert all(a == f"Bearer {BEARER}" for a in arm.auth)


async def test_list_vms_skips_malformed_models(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    bad_id = dict(vm_model("group1", "bad", 9), id="/not/an/arm/id")
    no_vm_id = {"id": vm_model("group1", "x", 8)["id"], "name": "x", "properties": {}}
    arm.vms["group1"] = [vm_model("group1", "ok", 1), bad_id, no_vm_id]
    arm.page_size = 10
    records = await client(session, arm).list_vms(SUB, "group1", bearer=BEARER)
    assert [r.name for r in records] == ["ok"]


async def test_list_vms_of_a_missing_group_is_empty(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    assert await client(session, arm).list_vms(SUB, "nope", bearer=BEARER) == []


async def test_list_vmss_vms_pages_and_names_instances(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vmss["pool"] = [vmss_vm_model("group1", "pool", i) for i in range(3)]
    c = client(session, arm)
    records = await c.list_vmss_vms(SUB, "group1", "pool", bearer=BEARER)
    assert [(r.scale_set, r.instance_id, r.name) for r in records] == [
        ("pool", "0", "pool_0"),
        ("pool", "1", "pool_1"),
        ("pool", "2", "pool_2"),
    ]
    assert c.calls == {"list_vmss_vms": 2}
    one = await c.get_vmss_vm(parse_resource_id(records[1].resource_id), bearer=BEARER)
    assert one == records[1]


NEXT_LINKS = [
    ("a nextLink to another host", "https://evil.example/subscriptions/x?$skiptoken=2"),
    ("a nextLink to another port", "PORT+1"),
    ("a nextLink over another scheme", "SCHEME"),
    ("a nextLink with credentials", "CREDS"),
    ("a nextLink that is not a string", 42),
]


@pytest.mark.parametrize("link", [n[1] for n in NEXT_LINKS], ids=[n[0] for n in NEXT_LINKS])
async def test_a_next_link_off_the_endpoint_is_refused(
    session: aiohttp.ClientSession, arm: FakeArm, link: Any
) -> None:
    host, port = arm.base.rsplit(":", 1)
    arm.next_link = (
        {
            "PORT+1": f"{host}:{int(port) + 1}/subscriptions/{SUB}/x",
            "SCHEME": arm.base.replace("http://", "https://") + f"/subscriptions/{SUB}/x",
            "CREDS": arm.base.replace("http://", "http://u:p@") + f"/subscriptions/{SUB}/x",
        }.get(link, link)
        if isinstance(link, str)
        else link
    )
    arm.vms["group1"] = [vm_model("group1", f"web-{i}", i) for i in range(5)]
    c = client(session, arm)
    with pytest.raises(Overloaded) as info:
        await c.list_vms(SUB, "group1", bearer=BEARER)
    assert info.value.code == Code.DEPENDENCY_UNAVAILABLE
    assert c.calls == {"list_vms": 1}, "the bearer token never followed the link"


HTTP_DATE_IN_20S = email.utils.formatdate(NOW + 20, usegmt=True)

STATUS_CASES: list[tuple[str, int | None, dict[str, str], bytes | None, Code, float | None]] = [
    (
        "a 429 with Retry-After seconds is a spent budget",
        429,
        {"Retry-After": "7"},
        None,
        Code.AZURE_BUDGET_EXHAUSTED,
        7.0,
    ),
    (
        "a 429 with an HTTP-date Retry-After is a spent budget",
        429,
        {"Retry-After": HTTP_DATE_IN_20S},
        None,
        Code.AZURE_BUDGET_EXHAUSTED,
        20.0,
    ),
    ("a 429 without Retry-After waits a default", 429, {}, None, Code.AZURE_BUDGET_EXHAUSTED, 5.0),
    ("a 500 is a dependency failure", 500, {}, None, Code.DEPENDENCY_UNAVAILABLE, 5.0),
    (
        "a 503 with Retry-After keeps it",
        503,
        {"Retry-After": "3"},
        None,
        Code.DEPENDENCY_UNAVAILABLE,
        3.0,
    ),
    ("a 400 is a dependency failure", 400, {}, None, Code.DEPENDENCY_UNAVAILABLE, 5.0),
    ("a 403 means the identity may not read VMs", 403, {}, None, Code.VM_BINDING_FAILED, None),
    ("a 401 means the identity may not read VMs", 401, {}, None, Code.VM_BINDING_FAILED, None),
    (
        "a 200 that is not JSON is a dependency failure",
        None,
        {},
        b"<html>",
        Code.DEPENDENCY_UNAVAILABLE,
        5.0,
    ),
    (
        "a 200 that is a JSON list is a dependency failure",
        None,
        {},
        b"[]",
        Code.DEPENDENCY_UNAVAILABLE,
        5.0,
    ),
    (
        "a VM model without vmId is a dependency failure",
        None,
        {},
        b'{"id": "x", "name": "web-1"}',
        Code.DEPENDENCY_UNAVAILABLE,
        5.0,
    ),
]


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected", "retry_after"),
    [s[1:] for s in STATUS_CASES],
    ids=[s[0] for s in STATUS_CASES],
)
async def test_arm_errors_become_our_codes(
    session: aiohttp.ClientSession,
    arm: FakeArm,
    status: int | None,
    headers: dict[str, str],
    body: bytes | None,
    expected: Code,
    retry_after: float | None,
) -> None:
    arm.status, arm.status_headers, arm.body = status, headers, body
    with pytest.raises(GatewayError) as info:
        await client(session, arm).get_vm(VM1, bearer=BEARER)
    assert info.value.code == expected
    if retry_after is None:
        assert isinstance(info.value, JoinRejected)
        assert "Microsoft.Compute/virtualMachines/read" in (info.value.detail or "")
    else:
        assert info.value.retry_after == pytest.approx(retry_after, abs=1.0)


async def test_a_timeout_is_a_dependency_failure(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.delay = 1.0
    with pytest.raises(Overloaded) as info:
        await client(session, arm, timeout=0.2).get_vm(VM1, bearer=BEARER)
    assert info.value.code == Code.DEPENDENCY_UNAVAILABLE


async def test_after_a_429_the_subscription_is_left_alone_until_retry_after(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    arm.status, arm.status_headers = 429, {"Retry-After": "10"}
    clock = FixedClock(NOW)
    c = client(session, arm, clock)
    with pytest.raises(Overloaded):
        await c.get_vm(VM1, bearer=BEARER)
    assert c.last_retry_after == 10.0
    arm.status = None
    clock.advance(9)
    with pytest.raises(Overloaded) as info:
        await c.get_vm(VM1, bearer=BEARER)
    assert info.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert info.value.retry_after == pytest.approx(1.0)
    # Other subscriptions are not held back.
    other = parse_resource_id(VM1.raw.replace(SUB, SUB2))
    assert await c.get_vm(other, bearer=BEARER) is None
    assert c.calls == {"get_vm": 2}
    clock.advance(1)
    assert await c.get_vm(VM1, bearer=BEARER) is not None
    assert c.calls == {"get_vm": 3}


async def test_a_list_429_with_reads_left_holds_list_calls_only(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    # Compute's list budget is spent, the subscription's reads are not (the fake reports
    # reads left): point reads go on, list pages wait for Retry-After.
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    arm.list_status, arm.status_headers = 429, {"Retry-After": "10"}
    clock = FixedClock(NOW)
    c = client(session, arm, clock)
    with pytest.raises(Overloaded) as info:
        await c.list_vms(SUB, "group1", bearer=BEARER)
    assert info.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert c.ready_in(SUB, kind="list") == pytest.approx(10.0)
    assert c.ready_in(SUB) == 0.0
    assert await c.get_vm(VM1, bearer=BEARER) is not None
    with pytest.raises(Overloaded):
        await c.list_vms(SUB, "group1", bearer=BEARER)
    assert c.calls == {"list_vms": 1, "get_vm": 1}, "the held list call was not sent"
    arm.list_status = None
    clock.advance(10)
    assert len(await c.list_vms(SUB, "group1", bearer=BEARER)) == 1


async def test_a_list_429_with_no_reads_left_holds_everything(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    arm.list_status, arm.status_headers = 429, {"Retry-After": "10"}
    arm.reads_left = 1  # the fake reports 0 reads left with this answer
    c = client(session, arm, FixedClock(NOW))
    with pytest.raises(Overloaded):
        await c.list_vms(SUB, "group1", bearer=BEARER)
    with pytest.raises(Overloaded) as info:
        await c.get_vm(VM1, bearer=BEARER)
    assert info.value.retry_after == pytest.approx(10.0)
    assert c.calls == {"list_vms": 1}


class RecordingBudget:
    def __init__(self, refuse: bool = False) -> None:
        self.acquired: list[str] = []
        self.observed: list[tuple[str, int | None, float | None]] = []
        self.kinds: list[ArmReadKind] = []
        self.lists_left: list[int | None] = []
        self.refuse = refuse

    def ready_in(self, subscription: str, *, kind: ArmReadKind = "read", ahead: int = 0) -> float:
        return 0.0

    async def acquire(self, subscription: str, *, kind: ArmReadKind = "read") -> None:
        self.acquired.append(subscription)
        self.kinds.append(kind)
        if self.refuse:
            raise Overloaded(Code.AZURE_BUDGET_EXHAUSTED, retry_after=2.0)

    def observe(
        self,
        subscription: str,
        *,
        remaining_reads: int | None,
        retry_after: float | None,
        remaining_lists: int | None = None,
        closes: ArmReadKind = "read",
    ) -> None:
        self.observed.append((subscription, remaining_reads, retry_after))
        self.lists_left.append(remaining_lists)


async def test_every_page_is_spent_from_the_budget(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [vm_model("group1", f"web-{i}", i) for i in range(5)]
    budget = RecordingBudget()
    await client(session, arm, budget=budget).list_vms(SUB.upper(), "group1", bearer=BEARER)
    assert budget.acquired == [SUB] * 3
    assert budget.kinds == ["list"] * 3, "every page spends from the list budget"
    assert [o[1] for o in budget.observed] == [249, 248, 247]
    assert budget.lists_left == [239] * 3, "the smallest x-ms-ratelimit-remaining-resource"


async def test_a_point_get_spends_a_read_only(session: aiohttp.ClientSession, arm: FakeArm) -> None:
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    budget = RecordingBudget()
    await client(session, arm, budget=budget).get_vm(VM1, bearer=BEARER)
    assert budget.kinds == ["read"] and budget.lists_left == [None]


async def test_a_refusing_budget_makes_no_call(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    c = client(session, arm, budget=RecordingBudget(refuse=True))
    with pytest.raises(Overloaded) as info:
        await c.get_vm(VM1, bearer=BEARER)
    assert info.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert arm.requests == [] and c.calls == {}


async def test_concurrency_is_bounded(session: aiohttp.ClientSession, arm: FakeArm) -> None:
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    arm.delay = 0.05
    c = client(session, arm, max_concurrency=3)
    await asyncio.gather(*(c.get_vm(VM1, bearer=BEARER) for _ in range(12)))
    assert arm.max_in_flight == 3
    assert c.calls == {"get_vm": 12}


async def test_the_bearer_token_never_reaches_logs_or_errors(
    session: aiohttp.ClientSession, arm: FakeArm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    arm.vms["group1"] = [vm_model("group1", "web-1", 1), {"id": "bad", "name": "bad"}]
    arm.page_size = 10
    c = client(session, arm)
    await c.list_vms(SUB, "group1", bearer=BEARER)
    errors: list[GatewayError] = []
    for status in (429, 403, 500):
        arm.status = status
        other = parse_resource_id(VM1.raw.replace(SUB, f"{status:08d}-0000-0000-0000-000000000000"))
        with pytest.raises(GatewayError) as info:
            await c.get_vm(other, bearer=BEARER)
        errors.append(info.value)
    assert caplog.records, "the malformed model and the 429 are logged"
    for record in caplog.records:
        assert BEARER not in record.getMessage()
    for err in errors:
        assert BEARER not in str(err) and BEARER not in (err.detail or "")
    assert BEARER not in repr(c)


NIC = (
    f"/subscriptions/{SUB}/resourceGroups/net/providers/Microsoft.Network/"
    "networkInterfaces/web-1-nic"
)
VMSS_NIC = (
    f"/subscriptions/{SUB}/resourceGroups/uni/providers/Microsoft.Compute/"
    "virtualMachineScaleSets/pool/virtualMachines/3/networkInterfaces/pool-nic"
)


async def test_a_vms_nic_references_come_with_its_record(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    model = vm_model("group1", "web-1", 1)
    model["properties"]["networkProfile"] = {
        "networkInterfaces": [{"id": NIC}, {"id": 5}, {"primary": True}]
        + [{"id": f"{NIC}-{i}"} for i in range(10)]
    }
    arm.vms["group1"] = [model]
    record = await client(session, arm).get_vm(VM1, bearer=BEARER)
    assert record is not None
    # Strings only, and at most 8: a model listing more is not trusted to bound the reads.
    assert len(record.nic_ids) == 8 and record.nic_ids[0] == NIC


@pytest.mark.parametrize(
    ("nic_id", "version"),
    [(NIC, "2024-05-01"), (VMSS_NIC, "2018-10-01")],
    ids=["a Microsoft.Network NIC", "a uniform scale-set instance's NIC, under 2018-10-01"],
)
async def test_a_nics_private_ips_are_read_under_its_api_version(
    session: aiohttp.ClientSession, arm: FakeArm, nic_id: str, version: str
) -> None:
    arm.nics[nic_id.rsplit("/", 1)[1]] = ["10.0.0.4", "fd00::4"]
    c = client(session, arm)
    assert await c.get_nic_private_ips(nic_id, bearer=BEARER) == ("10.0.0.4", "fd00::4")
    assert arm.requests[-1].endswith(f"?api-version={version}")
    assert arm.auth[-1] == f"Bearer {BEARER}"
    assert c.calls == {"get_nic": 1}


async def test_a_missing_nic_is_none_and_a_vm_id_is_no_nic(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    c = client(session, arm)
    assert await c.get_nic_private_ips(NIC, bearer=BEARER) is None
    with pytest.raises(ValueError):
        await c.get_nic_private_ips(VM1.raw, bearer=BEARER)


async def test_a_listed_vm_id_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listing page's every VM becomes a record and then an entry of the group's map: the
    # ID parsed for the record is the one the map is keyed by, not parsed a second time.
    from gateway.azure import arm as arm_module
    from gateway.azure import vm_directory
    from gateway.azure.arm import VmPage, vm_record_from_model

    parsed: list[str] = []

    def counting(raw: str) -> Any:
        parsed.append(raw)
        return parse_resource_id(raw)

    monkeypatch.setattr(arm_module, "parse_resource_id", counting)
    monkeypatch.setattr(vm_directory, "parse_resource_id", counting)
    models = [vm_model("group1", f"web-{i}", i) for i in range(5)]
    records = tuple(vm_record_from_model(m) for m in models)
    assert parsed == [m["id"] for m in models]
    directory = vm_directory.VmDirectory(None, clock=FixedClock(NOW))  # type: ignore[arg-type]
    listing = vm_directory._Listing("group", VM1.group_key, VM1, created=0.0, expires=60.0)
    directory._merge(listing, VmPage(records, None))
    assert len(parsed) == len(models)
    assert sorted(listing.by_key) == sorted(parse_resource_id(m["id"]).key for m in models)
    # A record made by hand (no parsed ID kept) parses its ID when asked, and so does one
    # whose kept ID is not its own.
    by_hand = VmRecord(
        resource_id=models[0]["id"],
        name="web-0",
        vm_id=vm_id(0),
        resource_group="G",
        subscription=SUB,
    )
    assert by_hand.parsed_id().key == records[0].parsed_id().key
    other = VmRecord(**{**by_hand.__dict__, "rid": records[1].rid})
    assert other.parsed_id().key == records[0].parsed_id().key
    assert len(parsed) == len(models) + 2
