"""Binding the access token to the attested document (DESIGN §3 step 5).

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

ARM reads are where join storms hurt (DESIGN §5), so VM records are cached per resource ID
and scale-set instance maps per scale set, both with single flight; an unknown vmId in a
scale set refreshes its map at most once per ``refresh_interval``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.azure.arm import ArmClient, VmRecord
from gateway.azure.resource_id import ResourceId, parse_resource_id
from gateway.azure.token import TokenClaims, normalize_guid
from gateway.cache import MemoryCache
from gateway.clock import Clock
from gateway.errors import Code, JoinRejected, Overloaded

__all__ = [
    "IdentityKind",
    "ScaleSetCacheEntry",
    "VmBinder",
    "VmCacheEntry",
    "VmIdentity",
    "resource_from_claims",
]

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class VmCacheEntry:
    """A cached VM lookup; ``seq`` orders loads so a caller can tell "read for me"."""

    record: VmRecord | None  # None: ARM said 404
    loaded_at: float
    seq: int


@dataclass(frozen=True)
class ScaleSetCacheEntry:
    """A cached scale-set instance map, by lowercase vmId."""

    by_vm_id: Mapping[str, VmRecord]
    loaded_at: float
    seq: int


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


def _scale_set_id(rid: ResourceId) -> ResourceId:
    """The scale set of a scale set or of one of its VMs."""
    return ResourceId(
        raw="/".join(rid.raw.split("/")[:9]),
        subscription=rid.subscription,
        resource_group=rid.resource_group,
        provider=rid.provider,
        types=rid.types[:1],
        name=rid.name,
    )


class VmBinder:
    """Parameters:

    * arm — the Resource Manager client; may be None only when ``enabled`` is False.
    * enabled — prove the vmId ↔ resource binding with ARM (DESIGN default: on).
    * clock — injected; cache TTLs and refresh limits use ``clock.monotonic()``.
    * vm_cache_ttl — how long a VM record or scale-set map is reused.
    * negative_ttl — how long "ARM says 404" is remembered.
    * refresh_interval — a scale-set map is refetched for an unknown vmId at most this often.
    * vm_cache, set_cache — the caches (default: fresh ``MemoryCache`` s on ``clock``; pass
      them to read their ``stats`` for metrics).
    """

    def __init__(
        self,
        arm: ArmClient | None,
        *,
        enabled: bool = True,
        clock: Clock,
        vm_cache_ttl: float = 300.0,
        negative_ttl: float = 30.0,
        refresh_interval: float = 30.0,
        vm_cache: MemoryCache[str, VmCacheEntry] | None = None,
        set_cache: MemoryCache[str, ScaleSetCacheEntry] | None = None,
    ) -> None:
        if enabled and arm is None:
            raise ValueError("VM binding is enabled but no ARM client was given")
        self._arm = arm
        self._enabled = enabled
        self._clock = clock
        self._vm_ttl = vm_cache_ttl
        self._negative_ttl = negative_ttl
        self._refresh = refresh_interval
        self._vms: MemoryCache[str, VmCacheEntry] = vm_cache or MemoryCache(
            "vm_records", clock=clock
        )
        self._sets: MemoryCache[str, ScaleSetCacheEntry] = set_cache or MemoryCache(
            "scale_set_maps", clock=clock
        )
        self._seq = 0

    @property
    def enabled(self) -> bool:
        return self._enabled

    async def bind(
        self, *, doc_vm_id: str, doc_subscription: str, claims: TokenClaims, bearer: str
    ) -> VmIdentity:
        """Bind the token's resource to the document; raise ``JoinRejected`` with the code
        of the first check that fails, or ``Overloaded`` when ARM cannot answer now."""
        rid, kind = resource_from_claims(claims)
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
        if not self._enabled or self._arm is None:
            return VmIdentity(
                resource_id=rid.raw,
                subscription_id=rid.subscription,
                resource_group=rid.resource_group,
                vm_name=(f"{rid.name}_{rid.instance_id}" if rid.is_scale_set_vm else rid.name),
                vm_id=vm_id,
                scale_set=rid.scale_set,
                identity_kind=kind,
                arm_verified=False,
            )
        if rid.is_vm:
            record = await self._bind_vm(self._arm, rid, vm_id, bearer)
        else:
            record = await self._bind_scale_set(self._arm, rid, vm_id, bearer)
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
        )

    def __repr__(self) -> str:
        return f"<VmBinder enabled={self._enabled} vms={self._vms!r} sets={self._sets!r}>"

    # -- single VM ----------------------------------------------------------------------

    async def _load_vm(self, arm: ArmClient, rid: ResourceId, bearer: str) -> VmCacheEntry:
        self._seq += 1
        seq = self._seq
        record = await arm.get_vm(rid, bearer=bearer)
        return VmCacheEntry(record, self._clock.monotonic(), seq)

    async def _bind_vm(self, arm: ArmClient, rid: ResourceId, vm_id: str, bearer: str) -> VmRecord:
        async def load() -> tuple[VmCacheEntry, float]:
            entry = await self._load_vm(arm, rid, bearer)
            return entry, (self._vm_ttl if entry.record is not None else self._negative_ttl)

        seq_at_start = self._seq
        started = self._clock.monotonic()
        entry = await self._vms.get_or_load(rid.key, load)
        if entry.record is None or entry.record.vm_id != vm_id:
            # A cached record may be stale (a VM deleted and recreated under the same name
            # gets a new vmId); reread once if it predates this call and the refresh limit.
            current = self._vms.get(rid.key)
            if current is not None and current is not entry:
                entry = current
            elif entry.seq <= seq_at_start and started - entry.loaded_at >= self._refresh:
                self._vms.delete(rid.key)
                entry = await self._vms.get_or_load(rid.key, load)
        if entry.record is None:
            raise JoinRejected(Code.VM_BINDING_FAILED, f"ARM has no VM {rid.raw!r}")
        if entry.record.vm_id != vm_id:
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"VM {rid.raw!r} has vmId {entry.record.vm_id}, the document {vm_id}",
            )
        return entry.record

    # -- scale sets ---------------------------------------------------------------------

    async def _bind_scale_set(
        self, arm: ArmClient, rid: ResourceId, vm_id: str, bearer: str
    ) -> VmRecord:
        ss = _scale_set_id(rid)

        async def load() -> tuple[ScaleSetCacheEntry, float]:
            self._seq += 1
            seq = self._seq
            records = await arm.list_vmss_vms(
                ss.subscription, ss.resource_group, ss.name, bearer=bearer
            )
            by_vm_id = {r.vm_id: r for r in records}
            ttl = self._vm_ttl if by_vm_id else self._negative_ttl
            return ScaleSetCacheEntry(by_vm_id, self._clock.monotonic(), seq), ttl

        seq_at_start = self._seq
        started = self._clock.monotonic()
        entry = await self._sets.get_or_load(ss.key, load)
        record = entry.by_vm_id.get(vm_id)
        if record is None:
            current = self._sets.get(ss.key)
            if current is not None and current is not entry:
                entry = current  # refreshed meanwhile
            elif entry.seq > seq_at_start:
                pass  # the map was read for this very call: the vmId is not in the set
            elif started - entry.loaded_at >= self._refresh:
                logger.info("unknown vmId in scale set %s: refreshing its instance map", ss.key)
                self._sets.delete(ss.key)
                entry = await self._sets.get_or_load(ss.key, load)
            else:
                # The map predates this join but is too young to reread: an instance
                # created since is not in it yet. Ask the agent to come back rather than
                # refuse a legitimate VM or spend ARM reads on every unknown vmId.
                wait = self._refresh - (started - entry.loaded_at)
                raise Overloaded(
                    Code.AZURE_BUDGET_EXHAUSTED,
                    retry_after=max(1.0, wait),
                    detail=f"vmId not in the cached instance map of {ss.key}; refresh limited",
                )
            record = entry.by_vm_id.get(vm_id)
        if record is None:
            raise JoinRejected(
                Code.VM_BINDING_FAILED, f"scale set {ss.raw!r} has no instance with vmId {vm_id}"
            )
        record_rid = parse_resource_id(record.resource_id)
        if not record_rid.key.startswith(ss.key + "/"):  # the list answered for another set
            raise JoinRejected(
                Code.VM_BINDING_FAILED, f"ARM listed {record.resource_id!r} under {ss.raw!r}"
            )
        if rid.is_scale_set_vm and record_rid.key != rid.key:
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"vmId {vm_id} is instance {record.resource_id!r}, the token names {rid.raw!r}",
            )
        return record
