"""A listing keeps its VM models as ARM sent them and makes a ``VmRecord`` only for the
VM a join asks for (``ListedVm``): the outcome of every join must be the one an eager
listing (every model made a record and checked when its page came) gave.

The behaviour tests here go through ``VmDirectory.find`` against the fake Resource Manager
only, so they state what any listing must answer, lazy or not; the tests at the end
check the laziness itself (what is made, and when) and that a listed model's record is
exactly the one ``vm_record_from_model`` makes of the same model.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.azure import arm as arm_module
from gateway.azure.arm import ArmClient, VmRecord, vm_record_from_model
from gateway.azure.resource_id import azure_name_key, parse_resource_id
from gateway.azure.vm_directory import VmDirectory
from gateway.core.clock import FixedClock
from gateway.core.errors import Code, GatewayError, JoinRejected, Overloaded
from tests.unit.arm_fake import NOW, SUB, FakeArm, start_fake_arm, vm_id, vm_model

BEARER = "eyJ.fake.bearer"
COMPUTE = f"/subscriptions/{SUB}/resourceGroups/group1/providers/Microsoft.Compute"


def token_rid(name: str, rg: str = "group1") -> Any:
    """A token's resource ID of a VM (tokens spell the segment names in lower case)."""
    return parse_resource_id(
        f"/subscriptions/{SUB}/resourcegroups/{rg}/providers/Microsoft.Compute/"
        f"virtualMachines/{name}"
    )


def vmid(i: int) -> str:
    return vm_id(i).lower()


def model(vm_name: str, i: int, *, rg: str = "group1", **fields: Any) -> dict[str, Any]:
    """A VM model of ``rg`` with vmId ``i`` (``fields`` override top-level fields)."""
    out = vm_model(rg, vm_name, i)
    out.update(fields)
    return out


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    async for fake in start_fake_arm():
        fake.page_size = 4
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def directory(
    session: aiohttp.ClientSession, arm: FakeArm, clock: FixedClock, **kw: Any
) -> tuple[VmDirectory, ArmClient]:
    client = ArmClient(session, endpoint=arm.base, clock=clock, timeout=2.0)
    kw.setdefault("list_threshold", 1)  # every join of a group waits on its listing
    return VmDirectory(client, clock=clock, refresh_interval=30, **kw), client


async def listed(d: VmDirectory, name: str = "web-0", i: int = 0) -> VmRecord:
    """Join ``name`` (vmId ``i``): the group is listed for it, to the end."""
    record = await d.find(token_rid(name), vmid(i), BEARER)
    await d.idle()
    return record


async def code_of(d: VmDirectory, name: str, i: int, rg: str = "group1") -> Code:
    with pytest.raises(GatewayError) as info:
        await d.find(token_rid(name, rg), vmid(i), BEARER)
    return info.value.code


GOOD = [model(f"web-{i}", i) for i in range(6)]
# Models a listing must not serve (each with a GUID vmId, so only making the record
# finds what is wrong with it), and what is wrong.
BAD: list[tuple[str, dict[str, Any]]] = [
    ("a name that is no string", model("web-10", 10, name=5)),
    ("an ID that does not parse", model("web-11", 11, id=f"{COMPUTE}/virtualMachines/web 11")),
    ("an ID naming a disk", model("web-12", 12, id=f"{COMPUTE}/disks/web-12")),
    ("an ID naming a scale set", model("web-13", 13, id=f"{COMPUTE}/virtualMachineScaleSets/ss")),
    ("a VM of another group", model("web-14", 14, rg="group2")),
    (
        "a VM of another subscription",
        model("web-15", 15, id=GOOD[0]["id"].replace(SUB, "0" * 8 + SUB[8:])),
    ),
]


@pytest.mark.parametrize(("why", "bad"), BAD, ids=[b[0] for b in BAD])
async def test_a_model_the_listing_must_not_serve_is_not_in_its_map(
    session: aiohttp.ClientSession, arm: FakeArm, why: str, bad: dict[str, Any]
) -> None:
    arm.vms["group1"] = [*GOOD[:3], bad, *GOOD[3:]]
    d, client = directory(session, arm, FixedClock(NOW))
    assert (await listed(d)).name == "web-0"
    calls = dict(client.calls)
    i = int(bad["properties"]["vmId"][:8])
    # Its vmId under the token of the VM it claims to be: unknown to a complete map too
    # young to reread (come back later, no call) ...
    with pytest.raises(Overloaded) as over:
        await d.find(token_rid(f"web-{i}"), vmid(i), BEARER)
    assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED and d.stats.refresh_limited == 1
    # ... under a listed VM's token: that VM has another vmId, a refusal ...
    assert await code_of(d, "web-1", i) == Code.VM_BINDING_FAILED
    assert client.calls == calls
    # ... and the VMs around it are served from the map.
    for good in GOOD:
        j = int(good["properties"]["vmId"][:8])
        assert (await d.find(token_rid(f"web-{j}"), vmid(j), BEARER)).name == f"web-{j}"
    assert client.calls == calls


async def test_a_model_not_served_is_refused_to_the_join_the_listing_was_read_for(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [*GOOD, *(bad for _, bad in BAD)]
    d, client = directory(session, arm, FixedClock(NOW))
    # The listing is read for this join: its vmId is not in it, a refusal, no other call.
    assert await code_of(d, "web-11", 11) == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vms": 3}


async def test_a_listing_of_models_none_of_which_it_serves_lists_no_vm(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    # No VM in the map: refused without a call, and the map kept for negative_ttl only.
    arm.vms["group1"] = [bad for _, bad in BAD]
    clock = FixedClock(NOW)
    d, client = directory(session, arm, clock, negative_ttl=10, vm_cache_ttl=300)
    for name, i in (("web-10", 10), ("web-14", 14), ("web-10", 10)):
        assert await code_of(d, name, i) == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vms": 2}
    clock.advance(11)
    assert await code_of(d, "web-10", 10) == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vms": 4}, "listed again after negative_ttl"


async def test_a_vm_id_listed_twice_is_the_last_model_the_listing_serves(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    wrong_group = model("web-1", 1, rg="group2")
    arm.page_size = 3  # duplicates within a page and across pages
    arm.vms["group1"] = [
        model("web-0", 0),
        model("web-1", 1),
        wrong_group,  # vmId 1 again, not of this group: web-1 stays
        model("web-2", 2),
        model("web-3", 2),  # vmId 2 again, a VM of the group: it replaces web-2
        model("web-4", 4, name=5),  # malformed ...
        model("web-4", 4),  # ... and its vmId again, well formed: served
        model("web-5", 5),
        model("web-5", 6),  # web-5's ID again, another vmId: both vmIds are web-5
    ]
    d, client = directory(session, arm, FixedClock(NOW))
    await listed(d)
    calls = dict(client.calls)
    assert (await d.find(token_rid("web-1"), vmid(1), BEARER)).resource_group == "GROUP1"
    assert (await d.find(token_rid("web-3"), vmid(2), BEARER)).name == "web-3"
    assert await code_of(d, "web-2", 2) == Code.VM_BINDING_FAILED, "vmId 2 is web-3 now"
    assert (await d.find(token_rid("web-4"), vmid(4), BEARER)).name == "web-4"
    assert (await d.find(token_rid("web-5"), vmid(5), BEARER)).vm_id == vmid(5)
    assert (await d.find(token_rid("web-5"), vmid(6), BEARER)).vm_id == vmid(6)
    assert client.calls == calls


async def test_a_malformed_model_does_not_hide_a_good_one_listed_before(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    arm.vms["group1"] = [model("web-0", 0), model("web-1", 1), model("web-1", 1, name=5)]
    d, client = directory(session, arm, FixedClock(NOW))
    await listed(d)
    assert (await d.find(token_rid("web-1"), vmid(1), BEARER)).name == "web-1"
    # A token naming web-1 with another vmId: the map knows web-1's (the good model's).
    assert await code_of(d, "web-1", 0) == Code.VM_BINDING_FAILED
    assert client.calls == {"list_vms": 1}


async def test_a_scale_set_serves_only_its_own_instances(
    session: aiohttp.ClientSession, arm: FakeArm
) -> None:
    pool = f"{COMPUTE}/virtualMachineScaleSets/pool"

    def instance(ss: str, n: int, i: int, **fields: Any) -> dict[str, Any]:
        out = {
            "id": f"{COMPUTE}/virtualMachineScaleSets/{ss}/virtualMachines/{n}",
            "name": f"{ss}_{n}",
            "properties": {"vmId": vm_id(i)},
        }
        return {**out, **fields}

    arm.vmss["pool"] = [
        instance("pool", 0, 100),
        instance("other", 1, 101),  # another scale set's instance
        instance("pool", 2, 102, name=None),  # malformed
        instance("pool", 3, 103),
    ]
    d, client = directory(session, arm, FixedClock(NOW))
    ss = parse_resource_id(pool.replace("resourceGroups", "resourcegroups"))
    assert (await d.find(ss, vmid(100), BEARER)).instance_id == "0"
    await d.idle()
    assert (await d.find(ss, vmid(103), BEARER)).instance_id == "3"
    for i in (101, 102):
        with pytest.raises(Overloaded) as over:  # a complete map too young to reread
            await d.find(ss, vmid(i), BEARER)
        assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
    assert client.calls == {"list_vmss_vms": 1}


# -- the laziness itself ----------------------------------------------------------------


async def test_a_listed_vm_is_made_a_record_only_when_a_join_asks_and_only_once(
    session: aiohttp.ClientSession, arm: FakeArm, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    real = arm_module.parse_resource_id

    def counting(raw: str) -> Any:
        made.append(raw.rsplit("/", 1)[1])
        return real(raw)

    monkeypatch.setattr(arm_module, "parse_resource_id", counting)
    arm.vms["group1"] = [model(f"web-{i}", i) for i in range(12)]
    d, client = directory(session, arm, FixedClock(NOW))
    assert (await listed(d, "web-5", 5)).name == "web-5"
    # web-5 for its join; web-0 when the last page came, to tell a map with a VM from an
    # empty one (which is kept for negative_ttl only); no other.
    assert sorted(made) == ["web-0", "web-5"]
    for _ in range(3):
        assert (await d.find(token_rid("web-5"), vmid(5), BEARER)).name == "web-5"
        assert (await d.find(token_rid("web-0"), vmid(0), BEARER)).name == "web-0"
    assert (await d.find(token_rid("web-7"), vmid(7), BEARER)).name == "web-7"
    assert sorted(made) == ["web-0", "web-5", "web-7"]
    assert client.calls == {"list_vms": 3}


LISTED_MODELS: list[tuple[str, Any]] = [
    ("an emulator-shaped VM", model("web-1", 1, tags={"env": "prod", "n": 1, "x": None})),
    (
        "NICs and a flexible scale set",
        model(
            "web-2",
            2,
            location=7,
            properties={
                "vmId": vm_id(2),
                "networkProfile": {
                    "networkInterfaces": [{"id": "/nic-a"}, {"id": 5}, "x", {"id": ""}]
                    + [{"id": f"/nic-{i}"} for i in range(10)]
                },
                "virtualMachineScaleSet": {"id": f"{COMPUTE}/virtualMachineScaleSets/flex"},
            },
        ),
    ),
    (
        "a scale set instance",
        {
            "id": f"{COMPUTE}/virtualMachineScaleSets/pool/virtualMachines/3",
            "name": "pool_3",
            "properties": {
                "vmId": vm_id(3),
                "networkProfile": {"networkInterfaces": {}},
                # The instance's ID names its set; a reference to another is not read.
                "virtualMachineScaleSet": {"id": f"{COMPUTE}/virtualMachineScaleSets/flex"},
            },
        },
    ),
    ("a tags list", model("web-4", 4, tags=["a"])),
    (
        "a scale-set reference that is not one",
        model(
            "web-5",
            5,
            properties={"vmId": vm_id(5), "virtualMachineScaleSet": {"id": f"{COMPUTE}/disks/d"}},
        ),
    ),
    *BAD,
    ("no vmId", model("web-6", 6, properties={"vmId": "not-a-guid"})),
    ("properties not an object", model("web-7", 7, properties=[vm_id(7)])),
    ("no id", {"name": "web-8", "properties": {"vmId": vm_id(8)}}),
    ("an id that is no string", model("web-9", 9, id=["x"])),
]


@pytest.mark.parametrize(("why", "item"), LISTED_MODELS, ids=[m[0] for m in LISTED_MODELS])
def test_a_listed_models_record_is_the_one_a_model_read_whole_gives(
    why: str, item: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.azure.arm import listed_vm

    try:
        expected: VmRecord | None = vm_record_from_model(item)
    except (ValueError, JoinRejected):
        expected = None
    caplog.set_level(logging.WARNING)
    lazy = listed_vm(item)
    record = None if lazy is None else lazy.record()
    assert record == expected
    if record is not None and expected is not None:
        assert record.rid == expected.rid and record.parsed_id() is record.rid
    if lazy is not None:
        assert lazy.record() is record, "made once, kept"
        assert (
            lazy.key == azure_name_key(item["id"])
            and lazy.vm_id == item["properties"]["vmId"].lower()
        )
        if record is not None:
            assert lazy.key == record.parsed_id().key, "the map's key is the record's"
    warned = [r for r in caplog.records if "malformed VM model" in r.getMessage()]
    assert len(warned) == (record is None), "a malformed model is logged once"
