"""Binding the access token to the attested document (DESIGN §3 step 5): the decision.

The document proves "a VM with this vmId in this subscription asked, now"; the token
proves "this Azure resource asked". Neither alone says the two are the same machine:
Teleport compares only the subscription, so a token from one VM pairs with another VM's
document. Here the token's resource ID decides subscription and resource group, and
(unless the operator turns it off) Resource Manager confirms that the resource the token
names has the document's vmId.

Which claim names the VM (https://learn.microsoft.com/entra/identity-platform/
access-token-claims-reference, and Teleport's ``lib/join/azurejoin``):

* user-assigned identity: ``xms_mirid`` is the *identity's* ID
  (``…/Microsoft.ManagedIdentity/userAssignedIdentities/<name>``), and ``xms_az_rid`` the
  resource that asked (the VM or scale set);
* system-assigned identity: ``xms_mirid`` is the VM or scale set itself.

How ARM is read (point reads, group and scale-set listings, budgets) is
``gateway.azure.vm_directory.VmDirectory``'s business; this module only decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.azure.resource_id import ResourceId, parse_resource_id
from gateway.azure.token import TokenClaims, normalize_guid
from gateway.azure.vm_directory import DirectoryStats, NicAddress, VmDirectory
from gateway.core.errors import Code, JoinRejected

__all__ = [
    "IdentityKind",
    "VmBinder",
    "VmIdentity",
    "resource_from_claims",
]

IdentityKind = Literal["user_assigned", "system_assigned"]


@dataclass(frozen=True)
class VmIdentity:
    """The joining VM as the verified evidence describes it; what the allow rules see."""

    resource_id: str
    subscription_id: str  # lowercase GUID
    resource_group: str
    vm_name: str
    vm_id: str  # lowercase GUID
    scale_set: str | None
    identity_kind: IdentityKind
    arm_verified: bool
    location: str | None = None  # None: not known (binding off)
    tags: Mapping[str, str] | None = None
    instance_id: str | None = None  # a uniform scale set instance's, as ARM names it
    nic_ids: tuple[str, ...] = ()  # ARM's networkProfile (empty: binding off)


def resource_from_claims(claims: TokenClaims) -> tuple[ResourceId, IdentityKind]:
    """The VM / scale set the token speaks for, and which kind of identity it used."""
    if claims.xms_az_rid:
        rid = parse_resource_id(claims.xms_az_rid)
        if not rid.names_vm_or_scale_set:
            raise JoinRejected(
                Code.IDENTITY_UNSUPPORTED,
                f"xms_az_rid names a {rid.provider}/{'/'.join(rid.types)}, not a VM or scale set",
            )
        return rid, "user_assigned"
    if claims.xms_mirid:
        rid = parse_resource_id(claims.xms_mirid)
        if rid.is_user_assigned_identity:
            raise JoinRejected(
                Code.IDENTITY_UNSUPPORTED,
                "user-assigned identity token without xms_az_rid: it does not say which VM asked",
            )
        if not rid.names_vm_or_scale_set:
            raise JoinRejected(
                Code.IDENTITY_UNSUPPORTED,
                f"xms_mirid names a {rid.provider}/{'/'.join(rid.types)}, not a VM or scale set",
            )
        return rid, "system_assigned"
    raise JoinRejected(Code.IDENTITY_UNSUPPORTED, "token has neither xms_az_rid nor xms_mirid")


class VmBinder:
    """Parameters:

    * directory — where ARM's answer comes from; may be None only when ``enabled`` is
      False.
    * enabled — prove the vmId ↔ resource binding with ARM (DESIGN default: on).
    """

    def __init__(self, directory: VmDirectory | None, *, enabled: bool = True) -> None:
        if enabled and directory is None:
            raise ValueError("VM binding is enabled but no VM directory was given")
        self._directory = directory
        self._enabled = enabled

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def directory(self) -> VmDirectory | None:
        return self._directory

    @property
    def stats(self) -> DirectoryStats:
        """What binding cost ARM (the directory's counters; zeros when ARM is not read)."""
        return self._directory.stats if self._directory is not None else DirectoryStats()

    async def bind(
        self,
        *,
        doc_vm_id: str,
        doc_subscription: str,
        claims: TokenClaims,
        bearer: str,
        resource: tuple[ResourceId, IdentityKind] | None = None,
    ) -> VmIdentity:
        """Bind the token's resource to the document; raise ``JoinRejected`` with the code
        of the first check that fails, or ``Overloaded`` when ARM cannot answer now.

        ``resource`` is ``resource_from_claims(claims)`` when the caller has it already
        (the pipeline's identity step): the token's resource ID is then not parsed again."""
        rid, kind = resource if resource is not None else resource_from_claims(claims)
        doc_sub = normalize_guid(doc_subscription)
        if doc_sub is None or rid.subscription != doc_sub:
            raise JoinRejected(
                Code.SUBSCRIPTION_MISMATCH,
                f"token resource is in subscription {rid.subscription}, "
                f"the document in {doc_subscription!r}",
            )
        vm_id = normalize_guid(doc_vm_id)
        if vm_id is None:
            raise JoinRejected(Code.VM_BINDING_FAILED, "document vmId is not a GUID")
        if not self._enabled or self._directory is None:
            return VmIdentity(
                resource_id=rid.raw,
                subscription_id=rid.subscription,
                resource_group=rid.resource_group,
                vm_name=(f"{rid.name}_{rid.instance_id}" if rid.is_scale_set_vm else rid.name),
                vm_id=vm_id,
                scale_set=rid.scale_set,
                identity_kind=kind,
                arm_verified=False,
                instance_id=rid.instance_id,
            )
        record = await self._directory.find(rid, vm_id, bearer)
        if record.subscription != rid.subscription:  # ARM answered for what we asked
            raise JoinRejected(Code.VM_BINDING_FAILED, "ARM record is in another subscription")
        return VmIdentity(
            resource_id=record.resource_id,
            subscription_id=record.subscription,
            resource_group=record.resource_group,
            vm_name=record.name,
            vm_id=record.vm_id,
            scale_set=record.scale_set,
            identity_kind=kind,
            arm_verified=True,
            location=record.location,
            tags=record.tags,
            instance_id=record.instance_id,
            nic_ids=record.nic_ids,
        )

    async def nic_ips(self, identity: VmIdentity, *, bearer: str) -> frozenset[NicAddress]:
        """The private IPs of the bound VM's network interfaces, from Resource Manager;
        none when the VM was not read from ARM (binding off)."""
        if not identity.arm_verified or self._directory is None:
            return frozenset()
        return await self._directory.private_ips(
            vm_id=identity.vm_id,
            subscription=identity.subscription_id,
            nic_ids=identity.nic_ids,
            bearer=bearer,
        )

    def __repr__(self) -> str:
        return f"<VmBinder enabled={self._enabled} directory={self._directory!r}>"
