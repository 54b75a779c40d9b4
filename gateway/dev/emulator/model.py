"""The emulator's data: VMs, identities, knobs (latency, limits, faults).

All frozen: the emulator swaps whole values instead of mutating shared ones, so a request
that already read a fault or a latency setting finishes with what it read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "SERVICES",
    "ArmLimits",
    "EmulatedVm",
    "Fault",
    "IdentityKind",
    "Latency",
    "ManagedIdentity",
    "Service",
]

IdentityKind = Literal["user", "system"]
Service = Literal["imds", "entra", "arm", "aia"]
SERVICES: tuple[Service, ...] = ("imds", "entra", "arm", "aia")


@dataclass(frozen=True)
class Latency:
    """Added delay per service, in seconds (real Azure is not on loopback)."""

    arm: float = 0.080
    entra: float = 0.100
    aia: float = 0.100
    imds: float = 0.0

    @classmethod
    def none(cls) -> Latency:
        return cls(arm=0.0, entra=0.0, aia=0.0, imds=0.0)

    def for_service(self, service: Service) -> float:
        return float(getattr(self, service))


@dataclass(frozen=True)
class ArmLimits:
    """Azure's throttling, per https://learn.microsoft.com/azure/azure-resource-manager/
    management/request-limits-and-throttling and Compute's API limits.

    ``read_burst``/``read_per_second``: the subscription-read token bucket per
    (subscription, principal). ``list_per_minute``: Compute's budget for list calls per
    subscription (a bucket of that size refilling evenly over a minute).
    """

    read_burst: int = 250
    read_per_second: float = 25.0
    list_per_minute: int = 300
    list_policy: str = "Microsoft.Compute/HighCostGet1Min"


@dataclass(frozen=True)
class Fault:
    """A fault switch for one service.

    ``status``: answer every request with this HTTP status (Azure-shaped error body).
    ``hang``: never answer (the client's timeout fires). ``drop``: close the connection
    without a response. ``remaining``: how many requests it still hits (None = until
    cleared). ``retry_after``: sent with 429/503.
    """

    status: int | None = None
    hang: bool = False
    drop: bool = False
    remaining: int | None = None
    retry_after: int | None = None

    def __post_init__(self) -> None:
        if sum((self.status is not None, self.hang, self.drop)) != 1:
            raise ValueError("a fault is exactly one of status=, hang=True, drop=True")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"fault status must be 4xx/5xx, not {self.status}")


@dataclass(frozen=True)
class ManagedIdentity:
    """A managed identity: ``resource_id`` is a user-assigned identity's own ID, or, for a
    system-assigned one, the VM's / scale set's ID (that is what ``xms_mirid`` carries)."""

    kind: IdentityKind
    tenant: str
    client_id: str
    principal_oid: str
    resource_id: str
    subscription: str
    resource_group: str


@dataclass(frozen=True)
class EmulatedVm:
    """One emulated VM (or uniform scale-set instance) and its IMDS endpoint."""

    name: str
    vm_id: str
    resource_id: str
    subscription: str
    resource_group: str
    tenant: str
    identity: IdentityKind
    client_id: str | None
    principal_oid: str
    scale_set: str | None
    instance_id: str | None
    imds_url: str
    location: str = "westeurope"
    tags: Mapping[str, str] = field(default_factory=dict)
    # A flexible-orchestration scale set's VM is an ordinary virtualMachines resource
    # whose properties.virtualMachineScaleSet.id names its set (``scale_set`` is None).
    flexible_scale_set: str | None = None
    # The private IPs of the VM's one network interface (``nic_id``), as Microsoft.Network
    # reports them in its ipConfigurations.
    private_ips: tuple[str, ...] = ()

    @property
    def nic_id(self) -> str:
        """Its NIC, as the VM model's networkProfile references it: a Microsoft.Network
        networkInterfaces resource, or for a uniform scale-set instance the NIC under the
        instance (named after the scale set's NIC configuration)."""
        if self.scale_set is not None:
            return f"{self.resource_id}/networkInterfaces/{self.scale_set}-nic"
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Network/networkInterfaces/{self.name}-nic"
        )

    @property
    def compute_resource_id(self) -> str:
        """What the token's ``xms_az_rid`` (or system ``xms_mirid``) names: the VM, or for
        a scale-set instance the scale set, with Azure's lower-case ``resourcegroups``."""
        base = f"/subscriptions/{self.subscription}/resourcegroups/{self.resource_group}"
        if self.scale_set is not None:
            return f"{base}/providers/Microsoft.Compute/virtualMachineScaleSets/{self.scale_set}"
        return f"{base}/providers/Microsoft.Compute/virtualMachines/{self.name}"
