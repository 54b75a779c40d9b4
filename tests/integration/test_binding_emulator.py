"""VM binding under a join storm, against the Azure emulator (DESIGN §5).

Real pieces end to end: the emulator's Entra tokens (verified by the gateway's
``TokenVerifier``), its ARM with Azure's throttling, the gateway's ``ArmClient`` with the
``SubscriptionBudget`` and ``VmBinder``. Every claim about cost is read from the
emulator's own request counters; one ``FixedClock`` drives the emulator, the budget and
the caches, so refills, TTLs and ``Retry-After`` are exact and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.agent import make_ssl_context, run_join
from gateway.azure.arm import ArmClient
from gateway.azure.budget import SubscriptionBudget
from gateway.azure.jwks import JwksClient, TokenVerifier
from gateway.azure.token import TokenClaims
from gateway.azure.vm_directory import VmDirectory
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.config import Config
from gateway.core.errors import Code, GatewayError, Overloaded
from gateway.dev.devstack import agent_settings, dev_stack
from gateway.dev.emulator import ArmLimits, AzureEmulator, EmulatedVm, Latency
from gateway.join.binding import VmBinder, VmIdentity
from tests.support.gateway_proc import gateway_process
from tests.support.tokens import azure_token_yaml

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
SUB = "5a2b3c4d-0000-4000-8000-00000000aaaa"
ARM_KINDS = ("get_vm", "list_vms", "get_vmss_vm", "list_vmss_vms", "unknown")


@dataclass
class Stack:
    emu: AzureEmulator
    clock: FixedClock
    budget: SubscriptionBudget
    arm: ArmClient
    binder: VmBinder
    verifier: TokenVerifier
    session: aiohttp.ClientSession
    tenant: str
    _claims: dict[str, tuple[str, TokenClaims]] = field(default_factory=dict)

    async def prepare(self, vms: list[EmulatedVm]) -> None:
        """Mint and verify the VMs' tokens up front, so only binding runs in the storm."""
        for vm in vms:
            token = self.emu.token_for(vm)
            self._claims[vm.name] = (token, await self.verifier.verify(token))

    async def bind(self, vm: EmulatedVm, *, doc_vm_id: str | None = None) -> VmIdentity:
        if vm.name not in self._claims:
            await self.prepare([vm])
        token, claims = self._claims[vm.name]
        return await self.binder.bind(
            doc_vm_id=doc_vm_id or vm.vm_id,
            doc_subscription=vm.subscription,
            claims=claims,
            bearer=token,
        )

    def calls(self, kind: str | None = None) -> int:
        """ARM requests the emulator received (of one kind, or all)."""
        counters = self.emu.counters
        kinds = ARM_KINDS if kind is None else (kind,)
        return sum(counters.get(f"arm.{k}", 0) for k in kinds)

    def add_vms(self, rg: str, n: int, *, start: int = 0) -> list[EmulatedVm]:
        return [
            self.emu.add_vm(
                subscription=SUB,
                resource_group=rg,
                name=f"{rg}-vm-{i}",
                tenant=self.tenant,
                identity="system",
            )
            for i in range(start, start + n)
        ]


@asynccontextmanager
async def stack(
    *, limits: ArmLimits | None = None, budget: dict[str, Any] | None = None, **binder_kw: Any
) -> AsyncIterator[Stack]:
    clock = FixedClock(NOW)
    async with AzureEmulator(
        latency=Latency.none(), clock=clock, arm_limits=limits, page_size=50
    ) as emu:
        connector = aiohttp.TCPConnector(ssl=emu.client_ssl_context(), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            sub_budget = SubscriptionBudget(clock=clock, **(budget or {"max_wait": 0}))
            arm = ArmClient(
                session, endpoint=emu.https_url, clock=clock, timeout=10.0, budget=sub_budget
            )
            verifier = TokenVerifier(
                JwksClient(
                    session, cloud=CLOUDS["public"], authority_host=emu.https_url, clock=clock
                ),
                cloud=CLOUDS["public"],
                clock=clock,
            )
            yield Stack(
                emu=emu,
                clock=clock,
                budget=sub_budget,
                arm=arm,
                binder=VmBinder(VmDirectory(arm, clock=clock, **binder_kw)),
                verifier=verifier,
                session=session,
                tenant=emu.add_tenant(),
            )


async def test_a_hundred_vms_of_one_group_cost_one_listing_and_a_few_gets() -> None:
    async with stack() as st:
        vms = st.add_vms("rg-storm", 100)
        await st.prepare(vms)
        st.emu.reset_counters()
        results = await asyncio.gather(*(st.bind(vm) for vm in vms))
        assert [r.vm_id for r in results] == [vm.vm_id for vm in vms]
        assert all(r.arm_verified for r in results)
        assert st.calls("list_vms") == 2, "one listing: 100 VMs in two pages of 50"
        assert st.calls("get_vm") <= 2, "only the joins before the pile-up use point GETs"
        assert st.calls() <= 4
        assert st.binder.stats.rg_lists == 1
        assert st.emu.counters.get("arm.429", 0) == 0
        # Every later join of the group is answered from the map.
        await asyncio.gather(*(st.bind(vm) for vm in vms))
        assert st.calls() <= 4


async def test_a_hundred_vms_in_five_groups_cost_calls_per_group() -> None:
    async with stack() as st:
        vms = [vm for g in range(5) for vm in st.add_vms(f"rg-{g}", 20)]
        await st.prepare(vms)
        st.emu.reset_counters()
        results = await asyncio.gather(*(st.bind(vm) for vm in vms))
        assert {r.resource_group for r in results} == {f"rg-{g}" for g in range(5)}
        assert st.calls("list_vms") == 5, "one single-page listing per group"
        assert st.calls("get_vm") <= 5 * 2
        assert st.calls() <= 5 * 3
        assert st.binder.stats.rg_lists == 5


async def test_a_vm_created_after_the_listing_costs_exactly_one_refresh() -> None:
    async with stack(refresh_interval=30) as st:
        vms = st.add_vms("rg-grow", 10)
        await asyncio.gather(*(st.bind(vm) for vm in vms))
        (new,) = st.add_vms("rg-grow", 1, start=10)
        await st.prepare([new])
        st.emu.reset_counters()
        st.clock.advance(5)
        with pytest.raises(Overloaded) as over:
            await st.bind(new)
        assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
        assert over.value.retry_after == pytest.approx(25)
        assert st.calls() == 0, "a young map is not reread"
        st.clock.advance(25)
        results = await asyncio.gather(*(st.bind(new) for _ in range(5)))
        assert {r.vm_id for r in results} == {new.vm_id}
        assert st.calls() == 1 and st.calls("list_vms") == 1
        assert st.binder.stats.refreshes == 1


async def test_a_burst_of_unknown_vmids_costs_one_refresh() -> None:
    async with stack(refresh_interval=30) as st:
        vms = st.add_vms("rg-probe", 20)
        await asyncio.gather(*(st.bind(vm) for vm in vms))
        st.emu.reset_counters()
        st.clock.advance(31)
        # Each VM's own token, with a document vmId ARM has never seen.
        outcomes = await asyncio.gather(
            *(st.bind(vm, doc_vm_id=str(uuid.uuid4())) for vm in vms), return_exceptions=True
        )
        assert all(isinstance(o, GatewayError) for o in outcomes)
        assert {o.code for o in outcomes if isinstance(o, GatewayError)} <= {
            Code.VM_BINDING_FAILED,
            Code.AZURE_BUDGET_EXHAUSTED,
        }
        assert st.calls() == 1, "one reread of the group for the whole burst"
        assert st.binder.stats.refreshes == 1
        # Right after the reread, more unknown vmIds cost nothing.
        st.clock.advance(1)
        for vm in vms[:5]:
            with pytest.raises(GatewayError) as info:
                await st.bind(vm, doc_vm_id=str(uuid.uuid4()))
            assert info.value.code == Code.VM_BINDING_FAILED
        assert st.calls() == 1


async def test_a_scale_set_storm_is_one_instance_listing_and_rate_limited() -> None:
    async with stack(refresh_interval=30) as st:
        instances = st.emu.add_scale_set(
            subscription=SUB,
            resource_group="rg-ss",
            name="pool",
            tenant=st.tenant,
            capacity=120,
            identity="user",
        )
        await st.prepare(instances)
        st.emu.reset_counters()
        results = await asyncio.gather(*(st.bind(vm) for vm in instances))
        assert {r.scale_set for r in results} == {"pool"}
        assert st.calls("list_vmss_vms") == 3, "one listing: 120 instances in three pages"
        assert st.calls() == 3
        assert st.binder.stats.set_lists == 1
        unknown = await asyncio.gather(
            *(st.bind(vm, doc_vm_id=str(uuid.uuid4())) for vm in instances[:30]),
            return_exceptions=True,
        )
        assert all(isinstance(o, Overloaded) for o in unknown), "come back after a reread"
        assert st.calls() == 3


async def test_a_429_stops_our_calls_until_retry_after() -> None:
    # ARM allows this principal 3 reads, then one per 10 s. Another tool spends one of
    # them behind our back, so our third read meets ARM's 429; from then on our budget
    # holds every call back until Retry-After has passed.
    limits = ArmLimits(read_burst=3, read_per_second=0.1, list_per_minute=100)
    budget = {"max_wait": 0, "safety_margin": 0.0}
    async with stack(limits=limits, budget=budget, list_threshold=100) as st:
        first = st.emu.add_vm(
            subscription=SUB, resource_group="rg-0", name="vm-0", tenant=st.tenant, identity="user"
        )
        vms = [first] + [
            st.emu.add_vm(
                subscription=SUB,
                resource_group=f"rg-{i}",
                name=f"vm-{i}",
                tenant=st.tenant,
                identity="user",
                client_id=first.client_id,  # one principal: one ARM bucket
            )
            for i in range(1, 8)
        ]
        await st.prepare(vms)
        st.emu.reset_counters()
        for vm in vms[:2]:
            await st.bind(vm)
        token = st.emu.token_for(first)
        url = f"{st.emu.https_url}{first.resource_id}?api-version=2024-07-01"
        async with st.session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200  # someone else's read
        with pytest.raises(Overloaded) as over:
            await st.bind(vms[2])
        assert over.value.code == Code.AZURE_BUDGET_EXHAUSTED
        assert over.value.retry_after == pytest.approx(10)
        assert (st.calls(), st.emu.counters.get("arm.429")) == (4, 1)
        assert st.budget.closed_for(SUB) == pytest.approx(10)

        st.clock.advance(4)
        outcomes = await asyncio.gather(*(st.bind(vm) for vm in vms[2:]), return_exceptions=True)
        for o in outcomes:
            assert isinstance(o, Overloaded) and o.code == Code.AZURE_BUDGET_EXHAUSTED
            assert o.retry_after == pytest.approx(6)
        assert st.calls() == 4, "no call reached ARM while it asked us to wait"

        st.clock.advance(6)
        identity = await st.bind(vms[2])
        assert identity.vm_id == vms[2].vm_id
        assert (st.calls(), st.emu.counters.get("arm.429")) == (5, 1)


async def test_our_budget_refuses_before_arm_would() -> None:
    # ARM's real limits; ours: 5 reads and no refill to speak of. A storm over many groups
    # (each a lone point GET) gets 503 + Retry-After from us, and ARM never sees a 6th call.
    async with stack(
        list_threshold=100, budget={"burst": 5, "refill_per_s": 0.01, "safety_margin": 0.0}
    ) as st:
        vms = [vm for g in range(12) for vm in st.add_vms(f"rg-b{g}", 1)]
        await st.prepare(vms)
        st.emu.reset_counters()
        outcomes = await asyncio.gather(*(st.bind(vm) for vm in vms), return_exceptions=True)
        bound = [o for o in outcomes if isinstance(o, VmIdentity)]
        refused = [o for o in outcomes if isinstance(o, Overloaded)]
        assert (len(bound), len(refused)) == (5, 7)
        assert {o.code for o in refused} == {Code.AZURE_BUDGET_EXHAUSTED}
        assert all(o.retry_after is not None and o.retry_after > 1 for o in refused)
        assert st.calls() == 5 and st.emu.counters.get("arm.429", 0) == 0


# -- the whole system under a tight list budget (issue 14) ---------------------------------

TIGHT_SUB = "11111111-1111-1111-1111-111111111111"


async def test_every_vm_joins_over_https_when_the_list_budget_is_tight(tmp_path: Path) -> None:
    """Azure's list limits are per subscription and shared with every other client of it,
    so a gateway may get a small part of them. Emulator: 12 list pages a minute, 10 VMs a
    page; 150 VMs in three groups join at once through the gateway (real HTTPS, the
    production dependencies, the reference auth service). Every VM joins on its first
    attempt, nothing meets a 429, and the gateway fetches at most the 15 pages that list
    each group once: when the list budget cannot fetch a page in time, the joins waiting
    on it are answered by point reads from the (larger) subscription-read budget."""
    clock = FixedClock(time.time())  # frozen: the whole storm happens within one refill
    limits = ArmLimits(list_per_minute=12)

    def tight(config: Config) -> Config:
        budget = dataclasses.replace(config.azure.arm_budget, list_per_minute=12)
        return dataclasses.replace(
            config, azure=dataclasses.replace(config.azure, arm_budget=budget)
        )

    async with (
        AzureEmulator(latency=Latency.none(), clock=clock, arm_limits=limits, page_size=10) as emu,
        dev_stack(
            tmp_path / "stack",
            tokens_yaml=azure_token_yaml(TIGHT_SUB),
            emulator=emu,
            clock=clock,
            adjust=tight,
        ) as st,
    ):
        tenant = emu.add_tenant()
        vms = [
            emu.add_vm(
                subscription=TIGHT_SUB,
                resource_group=f"rg-{g}",
                name=f"vm-{g}-{i}",
                tenant=tenant,
                identity="user",
            )
            for g in range(3)
            for i in range(50)
        ]
        emu.reset_counters()
        ctx = make_ssl_context(st.gateway_ca_file)
        outcomes = await asyncio.gather(
            *(run_join(agent_settings(st, vm, max_attempts=1), ssl_context=ctx) for vm in vms)
        )
        assert all(o.attempts == 1 for o in outcomes), "no join was told to come back"
        registered = Counter(r.registration.join.vm_id for r in await st.auth.records())
        assert all(registered[vm.vm_id] == 1 for vm in vms), "every VM registered once"
        counters = emu.counters
        pages = counters.get("arm.list_vms", 0)
        points = counters.get("arm.get_vm", 0)
        assert counters.get("arm.429", 0) == 0
        assert 1 <= pages <= 15, "at most one listing of each group"
        # Every VM was answered by a page or a point read; nothing was read twice.
        assert points + 10 * pages >= 150 and points <= 150
        stats = st.gateway.deps.binder.stats
        assert stats.list_stalls > 0, "the tight budget was met and point reads took over"
        assert stats.list_pages == pages


async def test_every_vm_joins_through_a_gateway_process_when_the_list_budget_is_tight(
    tmp_path: Path,
) -> None:
    """The same storm through ``join-gateway serve`` as its own process on the wall
    clock: the emulator's list bucket refills while the storm runs, and the gateway
    process knows only its configuration."""
    limits = ArmLimits(list_per_minute=12)

    def tight(config: Config) -> Config:
        budget = dataclasses.replace(config.azure.arm_budget, list_per_minute=12)
        return dataclasses.replace(
            config, azure=dataclasses.replace(config.azure, arm_budget=budget)
        )

    # One worker runs without the supervisor, which would create the metrics directory.
    (tmp_path / "gateway" / "prom").mkdir(parents=True)
    async with (
        AzureEmulator(latency=Latency.none(), arm_limits=limits, page_size=10) as emu,
        dev_stack(
            tmp_path / "stack",
            tokens_yaml=azure_token_yaml(TIGHT_SUB),
            emulator=emu,
            adjust=tight,
            start_gateway=False,
        ) as st,
        gateway_process(st.config, tmp_path / "gateway", st.gateway_ca_file, workers=1) as gp,
    ):
        tenant = emu.add_tenant()
        vms = [
            emu.add_vm(
                subscription=TIGHT_SUB,
                resource_group=f"rg-{g}",
                name=f"vm-{g}-{i}",
                tenant=tenant,
                identity="user",
            )
            for g in range(3)
            for i in range(50)
        ]
        emu.reset_counters()
        ctx = make_ssl_context(st.gateway_ca_file)
        outcomes = await asyncio.gather(
            *(
                run_join(
                    agent_settings(st, vm, gateway_url=gp.url, max_attempts=1), ssl_context=ctx
                )
                for vm in vms
            )
        )
        assert all(o.attempts == 1 for o in outcomes), "no join was told to come back"
        registered = Counter(r.registration.join.vm_id for r in await st.auth.records())
        assert all(registered[vm.vm_id] == 1 for vm in vms), "every VM registered once"
        counters = emu.counters
        assert counters.get("arm.429", 0) == 0
        assert 1 <= counters.get("arm.list_vms", 0) <= 15, "at most one listing of each group"
        assert counters.get("arm.get_vm", 0) <= 150
