"""The allow-rule fields end to end: emulator, auth service and gateway over real TLS.

VMs differ by location, tags, scale set (uniform; flexible with system- and user-assigned
identities, whose tokens look like standalone VMs' and whose set only Resource Manager
knows), name and identity; each joins over HTTPS and is admitted or refused with the
code the rules say. Joins from a subscription no rule names cost no Resource Manager call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.joins import post_join

pytestmark = pytest.mark.asyncio(loop_scope="module")

S1 = "11111111-1111-1111-1111-111111111111"
S2 = "33333333-3333-3333-3333-333333333333"
S_NONE = "55555555-5555-5555-5555-555555555555"
CI_ALLOWED = "aaaaaaaa-0000-4000-8000-000000000001"
CI_OTHER = "aaaaaaaa-0000-4000-8000-000000000002"

TOKENS = f"""
kind: token
version: v2
metadata:
  name: rules
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {S1}
        locations: [westeurope]
        tags:
          env: [prod, staging]
      - subscription: {S1}
        identities: ["{CI_ALLOWED}"]
      - subscription: {S2}
        scale_sets: ["pool-*"]
      - subscription: {S2}
        vm_names: ["web-?"]
        resource_groups: ["kube"]
"""


@dataclass
class Vms:
    prod: EmulatedVm
    staging_eastus: EmulatedVm
    dev: EmulatedVm
    untagged: EmulatedVm
    allowed_identity: EmulatedVm
    other_identity: EmulatedVm
    uniform: EmulatedVm
    flex_system: EmulatedVm
    flex_user: EmulatedVm
    flex_other_set: EmulatedVm
    web_1: EmulatedVm
    web_12: EmulatedVm
    kelvin_group: EmulatedVm
    nobody: EmulatedVm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    async with dev_stack(tmp_path_factory.mktemp("rules"), tokens_yaml=TOKENS) as st:
        yield st


@pytest.fixture(scope="module")
def vms(stack: DevStack) -> Vms:
    emu = stack.emulator
    t = emu.add_tenant()

    def vm(sub: str, rg: str, name: str, **kw: Any) -> EmulatedVm:
        kw.setdefault("identity", "system")
        return emu.add_vm(subscription=sub, resource_group=rg, name=name, tenant=t, **kw)

    def flex(name: str, identity: str, **kw: Any) -> EmulatedVm:
        return emu.add_flexible_scale_set(
            subscription=S2,
            resource_group="flex",
            name=name,
            tenant=t,
            capacity=2,
            identity=identity,  # type: ignore[arg-type]
            **kw,
        )[1]

    uniform = emu.add_scale_set(
        subscription=S2, resource_group="uni", name="pool-u", tenant=t, capacity=2, identity="user"
    )[1]
    return Vms(
        prod=vm(S1, "app", "prod-1", tags={"env": "prod"}),
        staging_eastus=vm(S1, "app", "stg-1", tags={"env": "staging"}, location="eastus"),
        dev=vm(S1, "app", "dev-1", tags={"env": "dev"}),
        untagged=vm(S1, "app", "bare-1"),
        allowed_identity=vm(S1, "ids", "id-ok", identity="user", client_id=CI_ALLOWED),
        other_identity=vm(S1, "ids", "id-no", identity="user", client_id=CI_OTHER),
        uniform=uniform,
        flex_system=flex("pool-flex-sys", "system"),
        flex_user=flex("pool-flex-usr", "user"),
        flex_other_set=flex("batch", "system"),
        web_1=vm(S2, "kube", "web-1"),
        web_12=vm(S2, "kube", "web-12"),
        kelvin_group=vm(S2, "\u212aube", "web-2"),
        nobody=vm(S_NONE, "app", "nobody-1"),
    )


CASES: list[tuple[str, str, int, str | None]] = [
    ("a VM tagged prod in westeurope joins (tags AND location)", "prod", 200, None),
    ("a staging VM in eastus is refused (location)", "staging_eastus", 403, "not_allowed"),
    ("a VM tagged dev is refused (tag value)", "dev", 403, "not_allowed"),
    ("a VM without the tag is refused", "untagged", 403, "not_allowed"),
    ("the allowed managed identity joins", "allowed_identity", 200, None),
    ("another managed identity is refused", "other_identity", 403, "not_allowed"),
    ("a uniform scale-set instance in pool-* joins", "uniform", 200, None),
    ("a flexible scale set's VM (system identity) joins", "flex_system", 200, None),
    ("a flexible scale set's VM (user identity) joins", "flex_user", 200, None),
    ("a flexible VM of another set is refused", "flex_other_set", 403, "not_allowed"),
    ("a VM whose name matches web-? joins", "web_1", 200, None),
    ("web-12 does not match web-? (one character)", "web_12", 403, "not_allowed"),
    ("a group named with a Kelvin sign is not kube", "kelvin_group", 403, "not_allowed"),
]


async def _join(stack: DevStack, vm: EmulatedVm, keys_dir: Path) -> tuple[int, str | None]:
    status, data = await post_join(stack, vm, keys_dir, token="rules")
    return status, (data.get("error") or {}).get("code")


@pytest.mark.parametrize(
    ("attr", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_rules_over_https(
    stack: DevStack, vms: Vms, tmp_path: Path, attr: str, status: int, code: str | None
) -> None:
    assert await _join(stack, getattr(vms, attr), tmp_path) == (status, code)


async def test_a_subscription_no_rule_names_costs_no_arm_call(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    before = {k: v for k, v in stack.emulator.counters.items() if k.startswith("arm.")}
    for _ in range(3):
        assert await _join(stack, vms.nobody, tmp_path) == (403, "not_allowed")
    after = {k: v for k, v in stack.emulator.counters.items() if k.startswith("arm.")}
    assert after == before
