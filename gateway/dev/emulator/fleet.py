"""Fleet generation: many VMs over subscriptions, resource groups and scale sets.

Shared by the ``emulator`` subcommand, the demo and the benchmarks so they all speak of the
same shapes. Tenant and subscription GUIDs come from a seeded RNG, so a benchmark's allow
rules can be written before the fleet exists.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from .model import EmulatedVm, IdentityKind
from .server import AzureEmulator

__all__ = ["Fleet", "IdentityMix", "apply_fleet_spec", "build_fleet"]

IdentityMix = Literal["user", "system", "mixed"]


@dataclass(frozen=True)
class Fleet:
    tenants: tuple[str, ...]
    subscriptions: tuple[str, ...]
    # (subscription, resource group)
    resource_groups: tuple[tuple[str, str], ...]
    vms: tuple[EmulatedVm, ...]

    def __repr__(self) -> str:
        return (
            f"Fleet(tenants={len(self.tenants)}, subscriptions={len(self.subscriptions)}, "
            f"resource_groups={len(self.resource_groups)}, vms={len(self.vms)})"
        )


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_fleet(
    emu: AzureEmulator,
    *,
    vms: int,
    subscriptions: int = 1,
    resource_groups: int = 1,
    scale_set_fraction: float = 0.0,
    scale_set_capacity: int = 10,
    tenants: int = 1,
    identity: IdentityMix = "user",
    seed: int = 0,
    location: str = "westeurope",
    name_prefix: str = "",
) -> Fleet:
    """Add ``vms`` VMs to a started emulator.

    Resource groups (``rg-000``…) are spread round-robin over subscriptions, subscriptions
    over tenants. ``round(vms * scale_set_fraction)`` of the VMs are uniform scale-set
    instances (scale sets of ``scale_set_capacity``), the rest standalone VMs (``vm-00000``…),
    both spread round-robin over resource groups. With ``identity="user"`` each resource
    group has one user-assigned identity shared by its VMs and scale sets (how operators
    set it up); ``"system"`` gives every VM / scale set its own; ``"mixed"`` alternates by
    resource group.
    """
    if vms < 0 or subscriptions < 1 or resource_groups < 1 or tenants < 1:
        raise ValueError("vms >= 0, and subscriptions, resource_groups, tenants >= 1")
    if not 0.0 <= scale_set_fraction <= 1.0:
        raise ValueError("scale_set_fraction must be within [0, 1]")
    if scale_set_capacity < 1:
        raise ValueError("scale_set_capacity must be >= 1")
    rng = random.Random(seed)
    tids = tuple(emu.add_tenant(_guid(rng)) for _ in range(tenants))
    subs = tuple(_guid(rng) for _ in range(subscriptions))
    rgs = tuple(
        (subs[k % subscriptions], f"{name_prefix}rg-{k:03d}") for k in range(resource_groups)
    )
    rg_identity: list[IdentityKind] = [
        "system" if identity == "system" or (identity == "mixed" and k % 2) else "user"
        for k in range(resource_groups)
    ]
    rg_client = [_guid(rng) for _ in range(resource_groups)]

    def tenant_of(sub: str) -> str:
        return tids[subs.index(sub) % tenants]

    out: list[EmulatedVm] = []
    ss_vms = round(vms * scale_set_fraction)
    s = 0
    while ss_vms > 0:
        cap = min(scale_set_capacity, ss_vms)
        k = s % resource_groups
        sub, rg = rgs[k]
        out += emu.add_scale_set(
            subscription=sub,
            resource_group=rg,
            name=f"{name_prefix}ss-{s:04d}",
            tenant=tenant_of(sub),
            capacity=cap,
            identity=rg_identity[k],
            client_id=rg_client[k] if rg_identity[k] == "user" else None,
            location=location,
            identity_name=f"{name_prefix}id-{rg}",
        )
        ss_vms -= cap
        s += 1
    for i in range(vms - round(vms * scale_set_fraction)):
        k = i % resource_groups
        sub, rg = rgs[k]
        out.append(
            emu.add_vm(
                subscription=sub,
                resource_group=rg,
                name=f"{name_prefix}vm-{i:05d}",
                tenant=tenant_of(sub),
                identity=rg_identity[k],
                client_id=rg_client[k] if rg_identity[k] == "user" else None,
                location=location,
                identity_name=f"{name_prefix}id-{rg}",
            )
        )
    return Fleet(tenants=tids, subscriptions=subs, resource_groups=rgs, vms=tuple(out))


_GENERATE_KEYS = {
    "vms",
    "subscriptions",
    "resource_groups",
    "scale_set_fraction",
    "scale_set_capacity",
    "tenants",
    "identity",
    "seed",
    "location",
    "name_prefix",
}
_VM_KEYS = {"name", "subscription", "resource_group", "tenant", "identity", "client_id", "location"}
_SS_KEYS = _VM_KEYS | {"capacity"}


def _check_keys(where: str, item: object, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping")
    unknown = set(item) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    missing = required - set(item)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    return item


def apply_fleet_spec(emu: AzureEmulator, spec: object) -> Fleet:
    """Build a fleet from a parsed FLEET.yaml.

    Shape (every section optional)::

        generate: {vms: 100, subscriptions: 2, resource_groups: 4, ...}  # build_fleet kwargs
        tenants: [<tid>, ...]
        vms:
          - {name, subscription, resource_group, tenant, identity: user|system,
             client_id?, location?}
        scale_sets:
          - {name, subscription, resource_group, tenant, capacity, identity, client_id?,
             location?}

    Tenants named by VMs are added if missing. Unknown keys are errors.
    """
    top = _check_keys("fleet", spec, {"generate", "tenants", "vms", "scale_sets"}, set())
    tenants: list[str] = []
    subs: list[str] = []
    rgs: list[tuple[str, str]] = []
    vms: list[EmulatedVm] = []
    if "generate" in top:
        gen = _check_keys("fleet.generate", top["generate"], _GENERATE_KEYS, {"vms"})
        built = build_fleet(emu, **gen)
        tenants += built.tenants
        subs += built.subscriptions
        rgs += built.resource_groups
        vms += built.vms
    for tid in top.get("tenants") or []:
        tenants.append(emu.add_tenant(str(tid)))
    req = {"name", "subscription", "resource_group", "tenant", "identity"}
    for i, raw in enumerate(top.get("vms") or []):
        item = _check_keys(f"fleet.vms[{i}]", raw, _VM_KEYS, req)
        tid = emu.add_tenant(str(item["tenant"]))
        vms.append(
            emu.add_vm(
                subscription=str(item["subscription"]),
                resource_group=str(item["resource_group"]),
                name=str(item["name"]),
                tenant=tid,
                identity=_identity_kind(item["identity"]),
                client_id=item.get("client_id"),
                location=str(item.get("location", "westeurope")),
            )
        )
    for i, raw in enumerate(top.get("scale_sets") or []):
        item = _check_keys(f"fleet.scale_sets[{i}]", raw, _SS_KEYS, req | {"capacity"})
        tid = emu.add_tenant(str(item["tenant"]))
        vms += emu.add_scale_set(
            subscription=str(item["subscription"]),
            resource_group=str(item["resource_group"]),
            name=str(item["name"]),
            tenant=tid,
            capacity=int(item["capacity"]),
            identity=_identity_kind(item["identity"]),
            client_id=item.get("client_id"),
            location=str(item.get("location", "westeurope")),
        )
    for vm in vms:
        if vm.tenant not in tenants:
            tenants.append(vm.tenant)
        if vm.subscription not in subs:
            subs.append(vm.subscription)
        if (vm.subscription, vm.resource_group) not in rgs:
            rgs.append((vm.subscription, vm.resource_group))
    return Fleet(
        tenants=tuple(tenants),
        subscriptions=tuple(subs),
        resource_groups=tuple(rgs),
        vms=tuple(vms),
    )


def _identity_kind(value: object) -> IdentityKind:
    if value == "user":
        return "user"
    if value == "system":
        return "system"
    raise ValueError(f"identity must be 'user' or 'system', not {value!r}")
