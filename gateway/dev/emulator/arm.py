"""Azure Resource Manager's Compute (and NIC) reads: URL parsing, JSON shapes, throttling,
errors.

Pure pieces only (no HTTP): the server module wires them to aiohttp.

* Paths are matched segment by segment, case-insensitively for the fixed segments, because
  ARM is case-insensitive and clients (and ARM itself, in resource IDs) vary the case of
  ``resourceGroups``.
* Throttling follows
  https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling
  (token bucket per subscription and principal: 250 burst, +25/s) and Compute's own budget
  for list calls (https://learn.microsoft.com/troubleshoot/azure/virtual-machines/windows/
  troubleshooting-throttling-errors), both reported in ``x-ms-ratelimit-remaining-*``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from .model import EmulatedVm, ManagedIdentity

__all__ = [
    "VMSS_NIC_API_VERSION",
    "ArmPath",
    "ArmPathKind",
    "TokenBucket",
    "arm_error",
    "arm_name_key",
    "nic_json",
    "parse_arm_path",
    "vm_json",
    "vmss_vm_json",
]

# Resource Manager compares names ASCII-case-insensitively and exactly otherwise: a group
# "\u212aube" (Kelvin sign) is not "kube", though Python's str.lower() maps one onto the
# other. The emulator states this itself rather than importing the product's helper.
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def arm_name_key(name: str) -> str:
    """How ARM compares a name: ASCII letters lowercased, every other character exact."""
    return name.translate(_ASCII_LOWER)


ArmPathKind = Literal[
    "get_vm", "list_vms", "get_vmss_vm", "list_vmss_vms", "get_nic", "get_vmss_nic"
]
# A uniform scale-set instance's NIC is served under this api-version only
# (https://learn.microsoft.com/rest/api/virtualnetwork/network-interface-in-vm-ss).
VMSS_NIC_API_VERSION = "2018-10-01"


@dataclass(frozen=True)
class ArmPath:
    kind: ArmPathKind
    subscription: str
    resource_group: str
    name: str | None = None
    scale_set: str | None = None
    instance_id: str | None = None

    @property
    def resource_group_scope(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"

    @property
    def read_action(self) -> str:
        """The Azure RBAC action the read needs (named in a 403's message)."""
        if self.kind in ("get_nic", "get_vmss_nic"):
            return "Microsoft.Network/networkInterfaces/read"
        return "Microsoft.Compute/virtualMachines/read"

    @property
    def scope(self) -> str:
        """The resource (or collection) the request reads, for authorization messages."""
        if self.kind == "get_nic":
            return (
                f"{self.resource_group_scope}/providers/Microsoft.Network/networkInterfaces/"
                f"{self.name}"
            )
        base = f"{self.resource_group_scope}/providers/Microsoft.Compute"
        if self.kind == "get_vmss_nic":
            return (
                f"{base}/virtualMachineScaleSets/{self.scale_set}/virtualMachines/"
                f"{self.instance_id}/networkInterfaces/{self.name}"
            )
        if self.scale_set is not None:
            tail = f"/virtualMachineScaleSets/{self.scale_set}/virtualMachines"
            return base + tail + (f"/{self.instance_id}" if self.instance_id else "")
        return base + "/virtualMachines" + (f"/{self.name}" if self.name else "")


def parse_arm_path(path: str) -> ArmPath | None:
    """Recognise the four Compute reads and the two NIC reads; ``None`` for anything
    else."""
    seg = path.strip("/").split("/")
    low = [arm_name_key(s) for s in seg]
    if len(seg) < 7 or low[0] != "subscriptions" or low[2] != "resourcegroups":
        return None
    if low[4] != "providers" or not all(seg[:7]):
        return None
    sub, rg = seg[1], seg[3]
    rest, rest_low = seg[6:], low[6:]
    if low[5] == "microsoft.network":
        if len(rest) == 2 and rest_low[0] == "networkinterfaces" and rest[1]:
            return ArmPath("get_nic", sub, rg, name=rest[1])
        return None
    if low[5] != "microsoft.compute":
        return None
    if (
        len(rest) == 6
        and rest_low[0::2] == ["virtualmachinescalesets", "virtualmachines", "networkinterfaces"]
        and all(rest)
    ):
        return ArmPath(
            "get_vmss_nic", sub, rg, name=rest[5], scale_set=rest[1], instance_id=rest[3]
        )
    if rest_low == ["virtualmachines"]:
        return ArmPath("list_vms", sub, rg)
    if len(rest) == 2 and rest_low[0] == "virtualmachines" and rest[1]:
        return ArmPath("get_vm", sub, rg, name=rest[1])
    if (
        len(rest) in (3, 4)
        and rest_low[0] == "virtualmachinescalesets"
        and rest_low[2] == "virtualmachines"
    ):
        if not rest[1]:
            return None
        if len(rest) == 3:
            return ArmPath("list_vmss_vms", sub, rg, scale_set=rest[1])
        if rest[3]:
            return ArmPath("get_vmss_vm", sub, rg, scale_set=rest[1], instance_id=rest[3])
    return None


class TokenBucket:
    """A token bucket on a monotonic clock (seconds)."""

    __slots__ = ("_capacity", "_last", "_rate", "_tokens")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self._capacity = capacity
        self._rate = rate
        self._tokens = capacity
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now

    def take(self, now: float) -> int | None:
        """Spend one token; ``None`` if granted, else the whole seconds to wait."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - self._tokens) / self._rate))

    def remaining(self, now: float) -> int:
        self._refill(now)
        return int(self._tokens)


def arm_error(code: str, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    """ARM's error envelope: ``{"error": {"code", "message"[, "details"]}}``."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return json.dumps({"error": err}, separators=(",", ":")).encode()


def _identity_json(identity: ManagedIdentity) -> dict[str, Any]:
    if identity.kind == "system":
        return {
            "type": "SystemAssigned",
            "principalId": identity.principal_oid,
            "tenantId": identity.tenant,
        }
    return {
        "type": "UserAssigned",
        "userAssignedIdentities": {
            identity.resource_id: {
                "principalId": identity.principal_oid,
                "clientId": identity.client_id,
            }
        },
    }


def vm_json(vm: EmulatedVm, identity: ManagedIdentity, *, time_created: str) -> str:
    """A standalone VM as ``GET .../virtualMachines/{name}`` returns it."""
    body: dict[str, Any] = {
        "name": vm.name,
        "id": vm.resource_id,
        "type": "Microsoft.Compute/virtualMachines",
        "location": vm.location,
        "identity": _identity_json(identity),
        "properties": {
            "vmId": vm.vm_id,
            "hardwareProfile": {"vmSize": "Standard_D2s_v5"},
            "storageProfile": {
                "imageReference": {
                    "publisher": "Canonical",
                    "offer": "ubuntu-24_04-lts",
                    "sku": "server",
                    "version": "latest",
                },
                "osDisk": {
                    "osType": "Linux",
                    "name": f"{vm.name}_OsDisk_1",
                    "createOption": "FromImage",
                },
            },
            "osProfile": {
                "computerName": vm.name,
                "adminUsername": "azureuser",
                "linuxConfiguration": {"disablePasswordAuthentication": True},
            },
            "networkProfile": _network_profile(vm),
            "provisioningState": "Succeeded",
            "timeCreated": time_created,
        },
    }
    if vm.tags:
        body["tags"] = dict(vm.tags)  # ARM leaves "tags" out when a resource has none
    if vm.flexible_scale_set is not None:
        body["properties"]["virtualMachineScaleSet"] = {
            "id": f"/subscriptions/{vm.subscription}/resourceGroups/{vm.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachineScaleSets/{vm.flexible_scale_set}"
        }
    return json.dumps(body, separators=(",", ":"))


def vmss_vm_json(vm: EmulatedVm, *, time_created: str) -> str:
    """A uniform scale-set instance as ``.../virtualMachineScaleSets/{ss}/virtualMachines``
    lists it (instances carry no ``identity``: the scale set does)."""
    body = {
        "name": f"{vm.scale_set}_{vm.instance_id}",
        "id": vm.resource_id,
        "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
        "location": vm.location,
        "instanceId": vm.instance_id,
        "sku": {"name": "Standard_D2s_v5", "tier": "Standard"},
        "properties": {
            "latestModelApplied": True,
            "vmId": vm.vm_id,
            "hardwareProfile": {"vmSize": "Standard_D2s_v5"},
            "osProfile": {"computerName": vm.name, "adminUsername": "azureuser"},
            "networkProfile": _network_profile(vm),
            "provisioningState": "Succeeded",
            "timeCreated": time_created,
        },
    }
    if vm.tags:
        body["tags"] = dict(vm.tags)
    return json.dumps(body, separators=(",", ":"))


def _network_profile(vm: EmulatedVm) -> dict[str, Any]:
    return {"networkInterfaces": [{"id": vm.nic_id, "properties": {"primary": True}}]}


def nic_json(vm: EmulatedVm) -> bytes:
    """The VM's NIC as ``GET {nic id}`` returns it (Microsoft.Network's shape): one IP
    configuration per private IP, the first primary."""
    configs = [
        {
            "name": f"ipconfig{i + 1}",
            "id": f"{vm.nic_id}/ipConfigurations/ipconfig{i + 1}",
            "properties": {
                "provisioningState": "Succeeded",
                "privateIPAddress": ip,
                "privateIPAllocationMethod": "Dynamic",
                "privateIPAddressVersion": "IPv6" if ":" in ip else "IPv4",
                "primary": i == 0,
                "subnet": {
                    "id": f"/subscriptions/{vm.subscription}/resourceGroups/{vm.resource_group}"
                    "/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default"
                },
            },
        }
        for i, ip in enumerate(vm.private_ips)
    ]
    body = {
        "name": vm.nic_id.rsplit("/", 1)[1],
        "id": vm.nic_id,
        "type": "Microsoft.Network/networkInterfaces",
        "location": vm.location,
        "properties": {
            "provisioningState": "Succeeded",
            "ipConfigurations": configs,
            "primary": True,
            "virtualMachine": {"id": vm.resource_id},
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()
