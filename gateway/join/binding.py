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

ARM reads are where join storms hurt (DESIGN §5), so binding costs reads per resource
group, not per VM:

* a lone join is served by a point ``GET`` of the VM the token names (cached per resource
  ID, single flight, "not found" remembered for ``negative_ttl``);
* when misses pile up in one resource group — ``list_threshold`` distinct VMs of the group
  missing the cache within ``list_window`` seconds (default 3 within 5 s), or a listing of
  the group already under way — the join waits instead for *one* paged listing of the
  group (single flight per group), kept as a vmId → VM map for ``group_map_ttl``; every
  later join of that group is answered from the map without a call;
* a uniform scale set is always served by its instance list, kept the same way;
* a vmId missing from a map rereads it (single flight) at most once per
  ``refresh_interval``; until a reread is allowed such a join gets ``503`` +
  ``Retry-After`` (``AZURE_BUDGET_EXHAUSTED``): a VM created after the map was read comes
  back later, and a burst of unknown vmIds costs one listing, not one call each;
* if the identity may not list the group (ARM ``403``), the group falls back to point
  ``GET`` s for ``negative_ttl`` seconds.

Whose bearer token reads the list does not matter to the proof: the map is what ARM says
about the group's VMs, and each joining VM's own token was verified before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.azure.arm import ArmClient, VmRecord
from gateway.azure.resource_id import ResourceId, parse_resource_id
from gateway.azure.token import TokenClaims, normalize_guid
from gateway.core.cache import MemoryCache
from gateway.core.clock import Clock
from gateway.core.errors import Code, JoinRejected, Overloaded

__all__ = [
    "BindingStats",
    "GroupMapEntry",
    "IdentityKind",
    "ScaleSetCacheEntry",
    "VmBinder",
    "VmCacheEntry",
    "VmIdentity",
    "resource_from_claims",
]

logger = logging.getLogger(__name__)

IdentityKind = Literal["user_assigned", "system_assigned"]

_MAX_TRACKED_GROUPS = 10_000  # bound on the per-group miss bookkeeping


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


@dataclass(frozen=True)
class VmCacheEntry:
    """A cached VM lookup. ``seq`` numbers loads in the order they *finished*, so a caller
    that noted ``VmBinder._seq`` on arrival can tell "read during my call" (seq above it,
    its own load or one it joined) from "read before I came"."""

    record: VmRecord | None  # None: ARM said 404
    loaded_at: float
    seq: int


@dataclass(frozen=True)
class ScaleSetCacheEntry:
    """A cached scale-set instance map, by lowercase vmId."""

    by_vm_id: Mapping[str, VmRecord]
    loaded_at: float
    seq: int


@dataclass(frozen=True)
class GroupMapEntry:
    """A cached listing of one resource group's VMs, by lowercase vmId and by resource key
    (``ResourceId.key``); empty when ARM listed none (cached for ``negative_ttl``)."""

    by_vm_id: Mapping[str, VmRecord]
    by_key: Mapping[str, VmRecord]
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


def _group_key(rid: ResourceId) -> str:
    """Cache key of a resource's resource group (lowercase, like ``ResourceId.key``)."""
    return f"{rid.subscription}/{rid.resource_group.lower()}"


@dataclass
class BindingStats:
    """What binding cost ARM, for metrics and tests.

    ``point_gets``: VM GETs started; ``rg_lists``: resource-group listings started (all
    pages are one listing); ``set_lists``: scale-set instance listings started;
    ``refreshes``: listings (of either kind) started because an unknown vmId met a map;
    ``coalesced``: binds served by a load another bind started; ``map_hits``: binds decided
    by a cached or shared map; ``refresh_limited``: binds told to come back because a map
    was too young to reread; ``list_fallbacks``: listings refused (403) that fell back to
    point GETs.
    """

    point_gets: int = 0
    rg_lists: int = 0
    set_lists: int = 0
    refreshes: int = 0
    coalesced: int = 0
    map_hits: int = 0
    refresh_limited: int = 0
    list_fallbacks: int = 0


class VmBinder:
    """Parameters:

    * arm — the Resource Manager client; may be None only when ``enabled`` is False.
    * enabled — prove the vmId ↔ resource binding with ARM (DESIGN default: on).
    * clock — injected; cache TTLs, the miss window and refresh limits use
      ``clock.monotonic()``.
    * vm_cache_ttl — how long a VM record or scale-set map is reused.
    * negative_ttl — how long "ARM says 404" (or an empty listing) is remembered.
    * refresh_interval — a resource-group or scale-set map is reread for an unknown vmId at
      most this often; in between such a join gets ``503`` + ``Retry-After``.
    * list_threshold, list_window — resource-group list mode: when misses for at least
      ``list_threshold`` distinct VMs of one resource group fall within ``list_window``
      seconds (counting this one), or a listing of the group is already under way, the
      bind waits for one listing of the group instead of a point GET.
    * group_map_ttl — how long a resource-group map is reused (default ``vm_cache_ttl``).
    * vm_cache, set_cache, group_cache — the caches (default: fresh ``MemoryCache`` s on
      ``clock``; pass them to read their ``stats`` for metrics).
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
        list_threshold: int = 3,
        list_window: float = 5.0,
        group_map_ttl: float | None = None,
        vm_cache: MemoryCache[str, VmCacheEntry] | None = None,
        set_cache: MemoryCache[str, ScaleSetCacheEntry] | None = None,
        group_cache: MemoryCache[str, GroupMapEntry] | None = None,
    ) -> None:
        if enabled and arm is None:
            raise ValueError("VM binding is enabled but no ARM client was given")
        if list_threshold < 1 or list_window < 0:
            raise ValueError("list_threshold must be >= 1 and list_window >= 0")
        self._arm = arm
        self._enabled = enabled
        self._clock = clock
        self._vm_ttl = vm_cache_ttl
        self._negative_ttl = negative_ttl
        self._refresh = refresh_interval
        self._list_threshold = list_threshold
        self._list_window = list_window
        self._group_ttl = vm_cache_ttl if group_map_ttl is None else group_map_ttl
        self._vms: MemoryCache[str, VmCacheEntry] = (
            vm_cache if vm_cache is not None else MemoryCache("vm_records", clock=clock)
        )
        self._sets: MemoryCache[str, ScaleSetCacheEntry] = (
            set_cache if set_cache is not None else MemoryCache("scale_set_maps", clock=clock)
        )
        self._groups: MemoryCache[str, GroupMapEntry] = (
            group_cache
            if group_cache is not None
            else MemoryCache("resource_group_maps", clock=clock)
        )
        # Resource group -> {VM key: monotonic time of its last cache miss}, oldest first.
        self._misses: dict[str, dict[str, float]] = {}
        self._listing: set[str] = set()  # resource groups with a listing under way
        self._unlistable: dict[str, float] = {}  # resource group -> until (403 on list)
        self._seq = 0
        self.stats = BindingStats()

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
            location=record.location,
            tags=record.tags,
        )

    def __repr__(self) -> str:
        return (
            f"<VmBinder enabled={self._enabled} vms={self._vms!r} sets={self._sets!r} "
            f"groups={self._groups!r} {self.stats}>"
        )

    # -- single VM: point GET or resource-group map -------------------------------------

    async def _bind_vm(self, arm: ArmClient, rid: ResourceId, vm_id: str, bearer: str) -> VmRecord:
        seq_at_start = self._seq
        started = self._clock.monotonic()
        gkey = _group_key(rid)
        group = self._groups.get(gkey)
        if group is None and (
            gkey in self._listing  # a listing under way answers this join too
            or (self._vms.get(rid.key) is None and self._wants_listing(gkey, rid))
        ):
            group = await self._listing_or_none(arm, rid, gkey, bearer, seq_at_start)
        if group is not None:
            return await self._bind_in_group(arm, rid, vm_id, bearer, group, seq_at_start, started)
        return await self._bind_point(arm, rid, vm_id, bearer, seq_at_start, started)

    def _wants_listing(self, gkey: str, rid: ResourceId) -> bool:
        """Record this miss; True when the group's misses call for one listing."""
        if gkey in self._listing:
            return True
        until = self._unlistable.get(gkey)
        if until is not None:
            if until > self._clock.monotonic():
                return False
            del self._unlistable[gkey]
        now = self._clock.monotonic()
        misses = self._misses.pop(gkey, None) or {}
        misses.pop(rid.key, None)
        misses[rid.key] = now  # newest last
        cutoff = now - self._list_window
        for key in [k for k, t in misses.items() if t < cutoff]:
            del misses[key]
        while len(misses) > max(64, 4 * self._list_threshold):
            del misses[next(iter(misses))]
        self._misses[gkey] = misses  # most recently active group last
        while len(self._misses) > _MAX_TRACKED_GROUPS:
            del self._misses[next(iter(self._misses))]
        return len(misses) >= self._list_threshold

    async def _listing_or_none(
        self, arm: ArmClient, rid: ResourceId, gkey: str, bearer: str, seq_at_start: int
    ) -> GroupMapEntry | None:
        """The group's map (one listing for all concurrent callers), or None when this
        identity may not list the group: then point GETs serve it for a while."""
        try:
            return await self._load_group(arm, rid, gkey, bearer, seq_at_start, refresh=False)
        except JoinRejected as exc:
            if gkey not in self._unlistable:  # the listing's waiters all land here
                self.stats.list_fallbacks += 1
                while len(self._unlistable) >= _MAX_TRACKED_GROUPS:
                    del self._unlistable[next(iter(self._unlistable))]
                self._unlistable[gkey] = self._clock.monotonic() + self._negative_ttl
                logger.info(
                    "cannot list resource group %s (%s): point GETs instead", gkey, exc.code
                )
            return None

    async def _load_group(
        self,
        arm: ArmClient,
        rid: ResourceId,
        gkey: str,
        bearer: str,
        seq_at_start: int,
        *,
        refresh: bool,
    ) -> GroupMapEntry:
        ran = False

        async def load() -> tuple[GroupMapEntry, float]:
            nonlocal ran
            ran = True
            self.stats.rg_lists += 1
            if refresh:
                self.stats.refreshes += 1
            self._listing.add(gkey)
            try:
                records = await arm.list_vms(rid.subscription, rid.resource_group, bearer=bearer)
            finally:
                self._listing.discard(gkey)
            self._seq += 1
            seq = self._seq
            by_vm_id: dict[str, VmRecord] = {}
            by_key: dict[str, VmRecord] = {}
            for r in records:
                r_rid = parse_resource_id(r.resource_id)
                if not r_rid.is_vm or _group_key(r_rid) != gkey:
                    logger.warning("ARM listed %s under %s: ignored", r.resource_id[:200], gkey)
                    continue
                by_vm_id[r.vm_id] = r
                by_key[r_rid.key] = r
            ttl = self._group_ttl if by_key else self._negative_ttl
            return GroupMapEntry(by_vm_id, by_key, self._clock.monotonic(), seq), ttl

        entry = await self._groups.get_or_load(gkey, load)
        if not ran and entry.seq > seq_at_start:
            self.stats.coalesced += 1
        return entry

    async def _bind_in_group(
        self,
        arm: ArmClient,
        rid: ResourceId,
        vm_id: str,
        bearer: str,
        entry: GroupMapEntry,
        seq_at_start: int,
        started: float,
    ) -> VmRecord:
        gkey = _group_key(rid)
        if vm_id not in entry.by_vm_id and entry.by_key:
            current = self._groups.get(gkey)
            if current is not None and current is not entry:
                entry = current  # refreshed meanwhile
            elif entry.seq > seq_at_start:
                pass  # read for this very call: the vmId is not in the group
            elif (
                rid.key in entry.by_key
                and entry.by_key[rid.key].vm_id != vm_id
                and (started - entry.loaded_at < self._refresh)
            ):
                pass  # the named VM has another vmId: refused below, no call
            elif started - entry.loaded_at >= self._refresh:
                logger.info("unknown vmId in resource group %s: refreshing its map", gkey)
                self._groups.delete(gkey)
                entry = await self._load_group(arm, rid, gkey, bearer, seq_at_start, refresh=True)
            else:
                # The map predates this join and is too young to reread: a VM created
                # since is not in it yet. Ask the agent to come back rather than spend a
                # read per unknown vmId.
                self.stats.refresh_limited += 1
                wait = self._refresh - (started - entry.loaded_at)
                raise Overloaded(
                    Code.AZURE_BUDGET_EXHAUSTED,
                    retry_after=max(1.0, wait),
                    detail=f"vmId not in the cached VM map of {gkey}; refresh limited",
                )
        self.stats.map_hits += 1
        record = entry.by_vm_id.get(vm_id)
        if record is None:
            named = entry.by_key.get(rid.key)
            if named is None:
                raise JoinRejected(Code.VM_BINDING_FAILED, f"ARM has no VM {rid.raw!r}")
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"VM {rid.raw!r} has vmId {named.vm_id}, the document {vm_id}",
            )
        if parse_resource_id(record.resource_id).key != rid.key:
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"vmId {vm_id} is VM {record.resource_id!r}, the token names {rid.raw!r}",
            )
        return record

    async def _bind_point(
        self,
        arm: ArmClient,
        rid: ResourceId,
        vm_id: str,
        bearer: str,
        seq_at_start: int,
        started: float,
    ) -> VmRecord:
        ran = False

        async def load() -> tuple[VmCacheEntry, float]:
            nonlocal ran
            ran = True
            self.stats.point_gets += 1
            record = await arm.get_vm(rid, bearer=bearer)
            self._seq += 1
            seq = self._seq
            entry = VmCacheEntry(record, self._clock.monotonic(), seq)
            return entry, (self._vm_ttl if record is not None else self._negative_ttl)

        entry = await self._vms.get_or_load(rid.key, load)
        if not ran and entry.seq > seq_at_start:
            self.stats.coalesced += 1
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
        refresh = False
        ran = False

        async def load() -> tuple[ScaleSetCacheEntry, float]:
            nonlocal ran
            ran = True
            self.stats.set_lists += 1
            if refresh:
                self.stats.refreshes += 1
            records = await arm.list_vmss_vms(
                ss.subscription, ss.resource_group, ss.name, bearer=bearer
            )
            self._seq += 1
            seq = self._seq
            by_vm_id = {r.vm_id: r for r in records}
            ttl = self._vm_ttl if by_vm_id else self._negative_ttl
            return ScaleSetCacheEntry(by_vm_id, self._clock.monotonic(), seq), ttl

        seq_at_start = self._seq
        started = self._clock.monotonic()
        entry = await self._sets.get_or_load(ss.key, load)
        if not ran and entry.seq > seq_at_start:
            self.stats.coalesced += 1
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
                refresh, ran = True, False
                entry = await self._sets.get_or_load(ss.key, load)
                if not ran and entry.seq > seq_at_start:
                    self.stats.coalesced += 1
            else:
                # The map predates this join but is too young to reread: an instance
                # created since is not in it yet. Ask the agent to come back rather than
                # refuse a legitimate VM or spend ARM reads on every unknown vmId.
                self.stats.refresh_limited += 1
                wait = self._refresh - (started - entry.loaded_at)
                raise Overloaded(
                    Code.AZURE_BUDGET_EXHAUSTED,
                    retry_after=max(1.0, wait),
                    detail=f"vmId not in the cached instance map of {ss.key}; refresh limited",
                )
            record = entry.by_vm_id.get(vm_id)
        self.stats.map_hits += 1
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
