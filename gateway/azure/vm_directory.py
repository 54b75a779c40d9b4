"""Which VM has this vmId? The ARM read strategy behind VM binding (DESIGN §5).

``VmDirectory.find(rid, vm_id, bearer)`` answers with the ``VmRecord`` Resource Manager
has for the resource the token names, spending as few reads as it can from budgets that
are shared with every other client of the subscription. Two kinds of read answer it:

* a **point read** — ``GET`` of the VM (or scale-set instance) the token names: one
  subscription read, cached per resource ID, single flight, "not found" remembered for
  ``negative_ttl``;
* a **listing** — the pages of a resource group's VMs (or a scale set's instances):
  one subscription read *and* one of Compute's list calls per page, kept as a vmId → VM
  map that answers every later join of the group without a call.

How they are chosen:

* A lone join is a point read. When misses pile up in one resource group —
  ``list_threshold`` distinct VMs of the group within ``list_window`` seconds — or a
  listing of the group has begun, the join waits on the listing instead. A uniform scale
  set's token names the scale set, not the instance, so scale sets are always listed.
* **A listing is paged, resumable and shared.** Pages are fetched one at a time, each as
  its own task detached from the joins waiting on it (a waiter's cancellation cancels
  only that waiter), and merged into the map as they arrive: a partial map already serves
  the VMs it contains, and a page fetched is never fetched again within the map's
  lifetime (``group_map_ttl`` from its first page), whether the listing runs to its end
  or pauses and is resumed by a later join.
* **Listings are prioritised by the joins waiting on them.** Compute's list budget is per
  subscription, so per subscription at most ``parallel_lists`` pages are in flight, and
  the next page goes to the listing most joins are waiting on.
* **Every budget is used.** A join waits on a listing only while its next page can be
  fetched within ``list_wait`` seconds (our budget's and ARM's ``Retry-After`` holds,
  ``ArmClient.ready_in``). When it cannot — the list budget is spent — the listing pauses
  and its waiters are resolved by point reads from the subscription-read budget instead,
  which under Azure's limits (250 burst, +25/s, against 300 list calls a minute shared
  with every other tool) is the larger of the two. Only a join that needs a listing
  (a scale set's token) or finds both budgets spent gets ``503`` + ``Retry-After``.
* A vmId missing from a *complete* map rereads it (a new listing; the old map keeps
  answering the vmIds it knows meanwhile) at most once per ``refresh_interval``; until
  then such a join gets ``503`` + ``Retry-After`` (``AZURE_BUDGET_EXHAUSTED``): a burst of
  unknown vmIds costs one listing, not one call each.
* If the identity may not list the group (ARM ``403``), the group is served by point
  reads for ``negative_ttl`` seconds.

Whose bearer token reads a list page does not matter to the proof: the map is what ARM
says about the group's VMs, and each joining VM's own token was verified before. The
most recent waiter's token reads the next page (the freshest one at hand).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.azure.arm import ArmClient, ListedVm, VmPage, VmRecord
from gateway.azure.resource_id import ResourceId, parse_resource_id
from gateway.core.cache import MemoryCache
from gateway.core.clock import Clock
from gateway.core.errors import Code, JoinRejected, Overloaded

__all__ = ["DirectoryStats", "NicAddress", "VmCacheEntry", "VmDirectory"]

NicAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = logging.getLogger(__name__)

_MAX_TRACKED_GROUPS = 10_000  # bound on listings, miss bookkeeping and 403 memory
_MAX_PAGES = 200  # a listing longer than this is a broken answer, not a fleet

ListingKind = Literal["group", "scale_set"]
Observer = Callable[[str], None]


@dataclass(frozen=True)
class VmCacheEntry:
    """A point read. ``seq`` numbers reads in the order they *finished*, so a caller that
    noted ``VmDirectory._seq`` on arrival can tell "read during my call" (seq above it)
    from "read before I came"."""

    record: VmRecord | None  # None: ARM said 404
    loaded_at: float
    seq: int


@dataclass
class DirectoryStats:
    """What finding VMs cost ARM, for metrics and tests.

    ``point_gets``: point reads started; ``rg_lists`` / ``set_lists``: listings started
    (of a resource group / a scale set; a listing is many pages); ``list_pages``: pages
    fetched; ``refreshes``: listings started because an unknown vmId met a complete map;
    ``coalesced``: finds answered by a listing another find started; ``map_hits``: finds
    decided by a map (complete or partial); ``partial_hits``: of those, by a map still
    being listed; ``list_stalls``: finds that turned to a point read (or a 503) because
    the listing could not fetch its next page within ``list_wait``; ``refresh_limited``:
    finds told to come back because a map was too young to reread; ``list_fallbacks``:
    listings refused (403) that fell back to point reads.
    """

    point_gets: int = 0
    rg_lists: int = 0
    set_lists: int = 0
    list_pages: int = 0
    refreshes: int = 0
    coalesced: int = 0
    map_hits: int = 0
    partial_hits: int = 0
    list_stalls: int = 0
    refresh_limited: int = 0
    list_fallbacks: int = 0


class _Listing:
    """One listing of a resource group or scale set, page by page (see the module doc)."""

    def __init__(
        self,
        kind: ListingKind,
        key: str,
        rid: ResourceId,
        *,
        created: float,
        expires: float,
    ) -> None:
        self.kind = kind
        self.key = key  # ResourceId.group_key or the scale set's ResourceId.key
        self.subscription = rid.subscription
        self.resource_group = rid.resource_group
        self.scale_set = rid.name if kind == "scale_set" else None
        self.created = created
        self.expires = expires
        # vmId -> the VM, and its resource ID's key (ResourceId.key) -> the VM: a record
        # once a find asked for it (checked to belong here), a ListedVm until then.
        self.by_vm_id: dict[str, VmRecord | ListedVm] = {}
        self.by_key: dict[str, VmRecord | ListedVm] = {}
        self.next_link: str | None = None
        self.pages = 0
        self.complete = False
        self.completed_at = 0.0
        self.completed_seq = 0
        self.fetching = False
        self.waiters = 0
        self.bearer = ""
        self.stalled_for: float | None = None  # set while paused for the list budget
        # What stopped the last page: ARM's refusal, an outage, or a bug of ours (kept for
        # the waiters to raise: the fetch runs detached, so nobody else would see it).
        self.failure: Exception | None = None
        self.changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def notify(self) -> None:
        """Wake every waiter to look again (a page, a pause, a failure)."""
        if not self.changed.done():
            self.changed.set_result(None)
        self.changed = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "paused" if self.stalled_for else "partial"
        return (
            f"<_Listing {self.kind} {self.key} {state} pages={self.pages} "
            f"vms={len(self.by_vm_id)} waiters={self.waiters}>"
        )


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


class VmDirectory:
    """Parameters:

    * arm — the Resource Manager client (its budget and ``Retry-After`` holds decide
      ``ready_in``).
    * clock — injected; TTLs, the miss window and refresh limits use ``clock.monotonic()``.
    * vm_cache_ttl — how long a point read is reused.
    * negative_ttl — how long "ARM says 404", an empty listing or a 403 on list is kept.
    * refresh_interval — a complete map is reread for an unknown vmId at most this often.
    * list_threshold, list_window — see the module doc.
    * group_map_ttl — a map's lifetime, from its first page (default ``vm_cache_ttl``).
    * list_wait — the longest a join waits for a listing's next page to become
      affordable before it turns to a point read (our budget's ``max_wait``).
    * parallel_lists — list pages in flight at once per subscription.
    * cache_maps — False (``cache.enabled: false``, the benchmark's naive baseline): every
      find that needs a listing lists on its own, as a gateway without caches would.
    * vm_cache — the point-read cache (default a fresh ``MemoryCache`` on ``clock``).
    * group_observer, set_observer — told "hit", "miss" or "coalesced" per find answered
      by a group / scale-set map (metrics, like ``MemoryCache``'s observer).
    """

    def __init__(
        self,
        arm: ArmClient,
        *,
        clock: Clock,
        vm_cache_ttl: float = 300.0,
        negative_ttl: float = 30.0,
        refresh_interval: float = 30.0,
        list_threshold: int = 3,
        list_window: float = 5.0,
        group_map_ttl: float | None = None,
        list_wait: float = 1.0,
        parallel_lists: int = 4,
        cache_maps: bool = True,
        vm_cache: MemoryCache[str, VmCacheEntry] | None = None,
        group_observer: Observer | None = None,
        set_observer: Observer | None = None,
    ) -> None:
        if list_threshold < 1 or list_window < 0:
            raise ValueError("list_threshold must be >= 1 and list_window >= 0")
        if list_wait < 0 or parallel_lists < 1:
            raise ValueError("list_wait must be >= 0 and parallel_lists >= 1")
        self._arm = arm
        self._clock = clock
        self._vm_ttl = vm_cache_ttl
        self._negative_ttl = negative_ttl
        self._refresh = refresh_interval
        self._list_threshold = list_threshold
        self._list_window = list_window
        self._map_ttl = vm_cache_ttl if group_map_ttl is None else group_map_ttl
        self._list_wait = list_wait
        self._parallel = parallel_lists
        self._cache_maps = cache_maps
        self._vms: MemoryCache[str, VmCacheEntry] = (
            vm_cache if vm_cache is not None else MemoryCache("vm_records", clock=clock)
        )
        self._observers: dict[ListingKind, Observer] = {
            "group": group_observer or _ignore,
            "scale_set": set_observer or _ignore,
        }
        self._listings: dict[str, _Listing] = {}  # "group:<key>" / "scale_set:<key>"
        self._previous: dict[str, _Listing] = {}  # complete maps being reread
        # Subscription -> listings that run (neither complete, failed nor paused).
        self._active: dict[str, set[_Listing]] = {}
        self._in_flight: dict[str, int] = {}  # subscription -> pages being fetched
        self._tasks: set[asyncio.Task[None]] = set()
        # Resource group -> {VM key: monotonic time of its last miss}, oldest first.
        self._misses: dict[str, dict[str, float]] = {}
        self._unlistable: dict[str, float] = {}  # group key -> until (403 on list)
        # vmId -> its NICs' private IPs, for as long as a VM record lives.
        self._nic_ips: MemoryCache[str, frozenset[NicAddress]] = MemoryCache("nic_ips", clock=clock)
        self._seq = 0
        self._closed = False
        self.stats = DirectoryStats()

    async def find(self, rid: ResourceId, vm_id: str, bearer: str) -> VmRecord:
        """ARM's record of the VM ``rid`` names (a VM, a scale set or one of its
        instances) whose vmId is ``vm_id`` (lowercase). Raises ``JoinRejected
        (VM_BINDING_FAILED)`` when ARM says there is none, ``Overloaded`` when ARM cannot
        answer now (``Retry-After`` set)."""
        if rid.is_vm:
            return await self._find_vm(rid, vm_id, bearer)
        if rid.is_scale_set or rid.is_scale_set_vm:
            return await self._find_in_scale_set(rid, vm_id, bearer)
        raise JoinRejected(Code.IDENTITY_UNSUPPORTED, f"{rid.raw[:200]!r} is not a VM")

    async def private_ips(
        self, *, vm_id: str, subscription: str, nic_ids: tuple[str, ...], bearer: str
    ) -> frozenset[NicAddress]:
        """The private IPs of the VM's network interfaces (``nic_ids``, from its record),
        read once per ``vm_cache_ttl`` per VM like the record itself. A NIC outside the
        VM's subscription or that ARM no longer has gives no address."""

        async def load() -> tuple[frozenset[NicAddress], float]:
            found: set[NicAddress] = set()
            for nic_id in nic_ids:
                try:
                    if not _in_subscription(nic_id, subscription):
                        raise ValueError("not in the VM's subscription")
                    ips = await self._arm.get_nic_private_ips(nic_id, bearer=bearer)
                except ValueError as exc:  # a reference that is no NIC of this VM's
                    logger.warning("skipping NIC reference %r: %s", nic_id[:200], exc)
                    continue
                for ip in ips or ():
                    try:
                        found.add(ipaddress.ip_address(ip))
                    except ValueError:
                        logger.warning("NIC %r has a malformed IP %r", nic_id[:200], ip[:64])
            return frozenset(found), self._vm_ttl

        return await self._nic_ips.get_or_load(vm_id, load)

    async def idle(self) -> None:
        """Wait until no page is being fetched (tests and shutdown: listings run detached
        from the finds that started them)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel page fetches still in flight (shutdown)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return (
            f"<VmDirectory vms={self._vms!r} listings={len(self._listings)} "
            f"in_flight={sum(self._in_flight.values())} {self.stats}>"
        )

    # -- single VMs: point read or resource-group map ------------------------------------

    async def _find_vm(self, rid: ResourceId, vm_id: str, bearer: str) -> VmRecord:
        seq_at_start = self._seq
        started = self._clock.monotonic()
        gkey = rid.group_key
        listing = self._current("group", gkey)
        if listing is not None:
            known = self._known(listing, vm_id)
            if known is not None:
                self._observers["group"]("hit")
                return self._in_group(known, rid, vm_id)
            if listing.complete:
                found = await self._complete_miss(listing, rid, vm_id, bearer, seq_at_start)
                return self._in_group(found, rid, vm_id)
        cached = self._vms.get(rid.key)
        if cached is not None and cached.record is not None and cached.record.vm_id == vm_id:
            # A point read already answered this VM (served from its cache, no call).
            return await self._point(rid, vm_id, bearer, seq_at_start, started)
        if (listing is not None or cached is None) and self._wants_listing(gkey, rid, listing):
            if listing is None:
                listing = self._start("group", gkey, rid, refresh=False)
            record = await self._wait_for(listing, vm_id, bearer)
            if record is not None:
                return self._in_group(record, rid, vm_id)
            if listing.complete:
                found = await self._complete_miss(listing, rid, vm_id, bearer, seq_at_start)
                return self._in_group(found, rid, vm_id)
        return await self._point(rid, vm_id, bearer, seq_at_start, started)

    def _wants_listing(self, gkey: str, rid: ResourceId, listing: _Listing | None) -> bool:
        """Record this miss; True when the group is (being) listed or its misses call
        for a listing, and the group may be listed."""
        now = self._clock.monotonic()
        until = self._unlistable.get(gkey)
        if until is not None:
            if until > now:
                return False
            del self._unlistable[gkey]
        if listing is not None:
            return True  # begun: resume it rather than spend a read per VM
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

    def _in_group(self, record: VmRecord, rid: ResourceId, vm_id: str) -> VmRecord:
        if record.parsed_id().key != rid.key:
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"vmId {vm_id} is VM {record.resource_id!r}, the token names {rid.raw!r}",
            )
        return record

    async def _point(
        self, rid: ResourceId, vm_id: str, bearer: str, seq_at_start: int, started: float
    ) -> VmRecord:
        """A point read of the VM (or scale-set instance) ``rid`` names, cached."""
        ran = False

        async def load() -> tuple[VmCacheEntry, float]:
            nonlocal ran
            ran = True
            self.stats.point_gets += 1
            if rid.is_scale_set_vm:
                record = await self._arm.get_vmss_vm(rid, bearer=bearer)
            else:
                record = await self._arm.get_vm(rid, bearer=bearer)
            self._seq += 1
            entry = VmCacheEntry(record, self._clock.monotonic(), self._seq)
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

    async def _find_in_scale_set(self, rid: ResourceId, vm_id: str, bearer: str) -> VmRecord:
        seq_at_start = self._seq
        started = self._clock.monotonic()
        ss = _scale_set_id(rid)
        listing = self._current("scale_set", ss.key)
        record = None if listing is None else self._known(listing, vm_id)
        if record is not None:
            self._observers["scale_set"]("hit")
        elif listing is not None and listing.complete:
            record = await self._complete_miss(listing, rid, vm_id, bearer, seq_at_start)
        else:
            if listing is None:
                listing = self._start("scale_set", ss.key, ss, refresh=False)
            record = await self._wait_for(listing, vm_id, bearer)
            if record is None and listing.complete:
                record = await self._complete_miss(listing, rid, vm_id, bearer, seq_at_start)
            elif record is None:
                # The listing cannot go on in time (or may not run). A token that names
                # the instance is answered by a point read; one that names the scale set
                # (a uniform scale set's identity does) can only wait for the listing.
                if rid.is_scale_set_vm:
                    return await self._point(rid, vm_id, bearer, seq_at_start, started)
                if isinstance(listing.failure, JoinRejected):
                    raise listing.failure
                wait = listing.stalled_for or self._arm.ready_in(rid.subscription, kind="list")
                raise Overloaded(
                    Code.AZURE_BUDGET_EXHAUSTED,
                    retry_after=max(1.0, wait),
                    detail=f"listing scale set {ss.key} waits {wait:.1f}s for the list budget",
                )
        record_rid = record.parsed_id()
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

    # -- maps ---------------------------------------------------------------------------

    def _current(self, kind: ListingKind, key: str) -> _Listing | None:
        listing = self._listings.get(f"{kind}:{key}")
        if listing is None:
            return None
        if listing.expires <= self._clock.monotonic():
            if not listing.fetching and not listing.waiters:
                del self._listings[f"{kind}:{key}"]
            return None
        return listing

    def _known(self, listing: _Listing, vm_id: str) -> VmRecord | None:
        """The vmId's record in the map, or, while a reread is partial, in the map it
        replaces (still within its lifetime)."""
        record = _entry(listing, listing.by_vm_id, vm_id)
        if record is not None:
            self.stats.map_hits += 1
            if not listing.complete:
                self.stats.partial_hits += 1
            return record
        previous = self._previous.get(f"{listing.kind}:{listing.key}")
        if previous is not None and previous.expires > self._clock.monotonic():
            record = _entry(previous, previous.by_vm_id, vm_id)
            if record is not None:
                self.stats.map_hits += 1
        return record

    def _start(self, kind: ListingKind, key: str, rid: ResourceId, *, refresh: bool) -> _Listing:
        now = self._clock.monotonic()
        listing = _Listing(kind, key, rid, created=now, expires=now + self._map_ttl)
        if not self._cache_maps:
            return listing  # private to this find: nothing is shared or kept
        name = f"{kind}:{key}"
        old = self._listings.pop(name, None)
        if refresh and old is not None and old.complete:
            self._previous[name] = old
        if len(self._listings) >= _MAX_TRACKED_GROUPS:
            for stale in [k for k, v in self._listings.items() if v.expires <= now]:
                del self._listings[stale]
            idle = [k for k, v in self._listings.items() if not v.waiters and not v.fetching]
            for k in idle[: max(0, len(self._listings) - _MAX_TRACKED_GROUPS + 1)]:
                del self._listings[k]
        while len(self._previous) > _MAX_TRACKED_GROUPS:
            del self._previous[next(iter(self._previous))]
        self._listings[name] = listing
        if kind == "group":
            self.stats.rg_lists += 1
        else:
            self.stats.set_lists += 1
        if refresh:
            self.stats.refreshes += 1
        return listing

    async def _complete_miss(
        self, listing: _Listing, rid: ResourceId, vm_id: str, bearer: str, seq_at_start: int
    ) -> VmRecord:
        """The vmId is not in a complete map: refuse, reread the map, or ask the agent to
        come back, depending on when the map was read."""
        named = _entry(listing, listing.by_key, rid.key)
        started = self._clock.monotonic()
        age = started - listing.completed_at
        if not listing.by_key:  # complete: empty iff no VM (_merge checked, _lists_any)
            pass  # ARM lists no VM there (kept for negative_ttl): refused, no call
        elif listing.completed_seq > seq_at_start:
            pass  # read for this very call: the vmId is not there
        elif named is not None and named.vm_id != vm_id and age < self._refresh:
            pass  # the named VM has another vmId: refused below, no call
        elif age >= self._refresh and self._cache_maps:
            what = "resource group" if listing.kind == "group" else "scale set"
            logger.info("unknown vmId in %s %s: rereading its map", what, listing.key)
            fresh = self._current(listing.kind, listing.key)
            if fresh is None or fresh is listing:
                fresh = self._start(listing.kind, listing.key, rid, refresh=True)
            record = await self._wait_for(fresh, vm_id, bearer)
            if record is not None:
                return record
            if fresh.complete:
                return await self._complete_miss(fresh, rid, vm_id, bearer, seq_at_start)
            if listing.kind == "group" or rid.is_scale_set_vm:
                return await self._point(rid, vm_id, bearer, seq_at_start, started)
            wait = fresh.stalled_for or self._arm.ready_in(rid.subscription, kind="list")
            raise Overloaded(
                Code.AZURE_BUDGET_EXHAUSTED,
                retry_after=max(1.0, wait),
                detail=f"rereading {listing.key} waits {wait:.1f}s for the list budget",
            )
        else:
            # The map predates this join and is too young to reread: a VM created since is
            # not in it yet. Ask the agent to come back rather than spend a read per
            # unknown vmId.
            self.stats.refresh_limited += 1
            raise Overloaded(
                Code.AZURE_BUDGET_EXHAUSTED,
                retry_after=max(1.0, self._refresh - age),
                detail=f"vmId not in the cached VM map of {listing.key}; refresh limited",
            )
        if listing.kind == "scale_set":
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"scale set {listing.key!r} has no instance with vmId {vm_id}",
            )
        if named is None:
            raise JoinRejected(Code.VM_BINDING_FAILED, f"ARM has no VM {rid.raw!r}")
        raise JoinRejected(
            Code.VM_BINDING_FAILED,
            f"VM {rid.raw!r} has vmId {named.vm_id}, the document {vm_id}",
        )

    # -- listing, page by page ----------------------------------------------------------

    async def _wait_for(self, listing: _Listing, vm_id: str, bearer: str) -> VmRecord | None:
        """Wait on ``listing`` until it has ``vm_id`` (the record), is complete (None), or
        cannot go on in time: paused for the list budget, refused with 403 (None; the
        caller turns to a point read). Raises the listing's ``Overloaded`` failure."""
        if (
            not listing.fetching
            and self._arm.ready_in(listing.subscription, kind="list") > self._list_wait
        ):
            # Its next page is not affordable within the wait a join can afford: do not
            # queue behind it (the point-read budget is separate and likely larger).
            self.stats.list_stalls += 1
            return None
        mine = listing.pages == 0 and not listing.fetching
        self._observers[listing.kind]("miss" if mine else "coalesced")
        listing.waiters += 1
        listing.bearer = bearer  # the freshest token at hand reads the next page
        if not listing.fetching:
            # Affordable again: a pause or a failure seen by earlier waiters is over, and
            # the listing resumes where it stopped.
            listing.stalled_for = None
            listing.failure = None
        try:
            if not self._cache_maps:
                while not listing.complete and listing.failure is None:
                    await self._fetch(listing)
            else:
                self._active.setdefault(listing.subscription, set()).add(listing)
                self._pump(listing.subscription)
            while True:
                record = _entry(listing, listing.by_vm_id, vm_id)
                if record is not None:
                    if not mine:
                        self.stats.coalesced += 1
                    self.stats.map_hits += 1
                    if not listing.complete:
                        self.stats.partial_hits += 1
                    return record
                if listing.complete:
                    return None
                failure = listing.failure
                if isinstance(failure, JoinRejected):
                    return None  # may not list: point reads serve the group
                if failure is not None:
                    if isinstance(failure, Overloaded) and (
                        failure.code == Code.AZURE_BUDGET_EXHAUSTED
                    ):
                        self.stats.list_stalls += 1
                        return None  # our list budget or ARM's: the read budget may do
                    raise failure
                if listing.stalled_for is not None and not listing.fetching:
                    self.stats.list_stalls += 1
                    return None
                # shield: this waiter's cancellation must not touch the listing.
                await asyncio.shield(listing.changed)
        finally:
            listing.waiters -= 1

    def _pump(self, subscription: str) -> None:
        """Start page fetches for the subscription's running listings, those most joins
        wait on first, while pages are affordable and fewer than ``parallel_lists`` are in
        flight. A listing runs to its end while it can (the rest of a group usually joins
        next); when the next page is not affordable within ``list_wait``, every listing
        not fetching pauses and its waiters turn to point reads. A join resumes it."""
        in_flight = self._in_flight.get(subscription, 0)
        active = self._active.get(subscription, set())
        started = 0  # fetches started here, whose budget is not reserved yet
        while in_flight < self._parallel and not self._closed:
            for done in [x for x in active if x.complete or x.failure is not None]:
                active.discard(done)
            ready = [listing for listing in active if not listing.fetching]
            if not ready:
                break
            wait = self._arm.ready_in(subscription, kind="list", ahead=started)
            if wait > self._list_wait:
                for listing in ready:
                    active.discard(listing)
                    listing.stalled_for = wait
                    listing.notify()
                break
            best = max(ready, key=lambda listing: (listing.waiters, -listing.created))
            best.fetching = True
            best.stalled_for = None
            best.failure = None
            in_flight += 1
            started += 1
            task = asyncio.create_task(self._fetch_and_pump(best))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._in_flight[subscription] = in_flight
        if not in_flight:
            del self._in_flight[subscription]
        if not active:
            self._active.pop(subscription, None)

    async def _fetch_and_pump(self, listing: _Listing) -> None:
        try:
            await self._fetch(listing)
        finally:
            self._in_flight[listing.subscription] = self._in_flight.get(listing.subscription, 1) - 1
            self._pump(listing.subscription)

    async def _fetch(self, listing: _Listing) -> None:
        """Fetch the listing's next page and merge it; failures are kept on the listing
        for its waiters (never raised: this runs detached)."""
        listing.fetching = True
        try:
            if listing.pages >= _MAX_PAGES:
                raise Overloaded(
                    Code.DEPENDENCY_UNAVAILABLE,
                    retry_after=5.0,
                    detail=f"listing {listing.key}: more than {_MAX_PAGES} pages",
                )
            page = await self._read_page(listing)
        except JoinRejected as exc:
            listing.failure = exc
            if listing.kind == "group":
                self._refused(listing, exc)
        except Overloaded as exc:
            listing.failure = exc  # the pages so far stay: a later join resumes here
        except Exception as exc:
            logger.exception("listing %s failed", listing.key)
            listing.failure = exc
        else:
            self._merge(listing, page)
        finally:
            listing.fetching = False
            listing.notify()

    async def _read_page(self, listing: _Listing) -> VmPage:
        if listing.scale_set is None:
            return await self._arm.list_vms_page(
                listing.subscription,
                listing.resource_group,
                bearer=listing.bearer,
                next_link=listing.next_link,
            )
        return await self._arm.list_vmss_vms_page(
            listing.subscription,
            listing.resource_group,
            listing.scale_set,
            bearer=listing.bearer,
            next_link=listing.next_link,
        )

    def _merge(self, listing: _Listing, page: VmPage) -> None:
        """Add a page to the listing's map: its models as they are (checked and made
        records when a find asks for one, ``_entry``), its records checked now."""
        by_vm_id, by_key = listing.by_vm_id, listing.by_key
        for model in page.models:
            if model.vm_id in by_vm_id or model.key in by_key:
                # Another VM of the listing has this vmId or ID: the later one replaces it
                # only if it is a record of this listing, so it must be checked now.
                record = _admitted(listing, model)
                if record is not None:
                    by_vm_id[record.vm_id] = by_key[model.key] = record
            else:
                by_vm_id[model.vm_id] = by_key[model.key] = model
        for record in page.records:
            if _belongs(listing, record):
                by_vm_id[record.vm_id] = by_key[record.parsed_id().key] = record
        listing.pages += 1
        self.stats.list_pages += 1
        listing.next_link = page.next_link
        self._seq += 1
        if page.next_link is None:
            now = self._clock.monotonic()
            listing.complete = True
            listing.completed_at = now
            listing.completed_seq = self._seq
            # Whether it has a VM at all decides its lifetime. Models not asked for are
            # checked until one passes, and those that fail leave the map: from here on
            # the map is empty exactly when it has no VM (_complete_miss counts on it).
            listed = _lists_any(listing)
            ttl = self._map_ttl if listed else self._negative_ttl
            listing.expires = min(listing.expires, now + ttl) if listed else now + ttl
            self._previous.pop(f"{listing.kind}:{listing.key}", None)

    def _refused(self, listing: _Listing, exc: JoinRejected) -> None:
        """ARM refused this identity the listing (403): point reads serve the group."""
        self._listings.pop(f"group:{listing.key}", None)
        if listing.key in self._unlistable:
            return
        self.stats.list_fallbacks += 1
        while len(self._unlistable) >= _MAX_TRACKED_GROUPS:
            del self._unlistable[next(iter(self._unlistable))]
        self._unlistable[listing.key] = self._clock.monotonic() + self._negative_ttl
        logger.info(
            "cannot list resource group %s (%s): point reads instead", listing.key, exc.code
        )


def _entry(listing: _Listing, index: dict[str, VmRecord | ListedVm], key: str) -> VmRecord | None:
    """The record ``index`` (``listing.by_vm_id`` or ``.by_key``) has under ``key``: a
    model listed but not asked for before is made a record and checked now, and the
    answer kept in both indexes (a model that is malformed or not of this listing is
    taken out: it is not in the map, as if never listed)."""
    found = index.get(key)
    if not isinstance(found, ListedVm):
        return found
    record = _admitted(listing, found)
    for index_, key_ in ((listing.by_vm_id, found.vm_id), (listing.by_key, found.key)):
        if index_.get(key_) is found:
            if record is None:
                del index_[key_]
            else:
                index_[key_] = record
    return record


def _admitted(listing: _Listing, model: ListedVm) -> VmRecord | None:
    """The model's record if it is well formed and a VM of the listing, else None."""
    record = model.record()
    return record if record is not None and _belongs(listing, record) else None


def _belongs(listing: _Listing, record: VmRecord) -> bool:
    """The record is a VM of the listing's resource group (a standalone VM) or an
    instance of its scale set; anything else ARM listed there is ignored (logged)."""
    r_rid = record.parsed_id()
    if listing.kind == "group":
        belongs = r_rid.is_vm and r_rid.group_key == listing.key
    else:
        belongs = r_rid.is_scale_set_vm and r_rid.key.startswith(listing.key + "/")
    if not belongs:
        logger.warning("ARM listed %s under %s: ignored", record.resource_id[:200], listing.key)
    return belongs


def _lists_any(listing: _Listing) -> bool:
    """The map has a VM: models not asked for yet are checked, first listed first, until
    one passes (usually the first; each model is checked once, ``_entry``)."""
    # A copy of the keys to walk (_entry takes failed models out); restarting iter() on
    # the dict after each would rescan the deleted slots, quadratic in a broken answer.
    return any(_entry(listing, listing.by_key, key) is not None for key in list(listing.by_key))


def _in_subscription(resource_id: str, subscription: str) -> bool:
    """``resource_id`` parses and is in ``subscription`` (Azure keeps a VM's NICs in its
    subscription: a reference elsewhere is a broken answer, never read with the token)."""
    try:
        return parse_resource_id(resource_id).subscription == subscription
    except JoinRejected:
        return False


def _ignore(result: str) -> None:
    return None
