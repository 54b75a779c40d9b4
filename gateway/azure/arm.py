"""Azure Resource Manager client: the few Compute reads VM binding needs.

ARM is where join storms hurt (DESIGN §5): reads are a token bucket per subscription and
principal (250 burst, +25/s) and Compute's list calls have their own budget; a ``429``
carries ``Retry-After`` and every answer the ``x-ms-ratelimit-remaining-*`` headers
(https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-
throttling, https://learn.microsoft.com/troubleshoot/azure/virtual-machines/windows/
troubleshooting-throttling-errors). So this client:

* spends from an injected per-subscription ``ArmBudget`` before each request, every page
  of a list included (``gateway.azure.budget.SubscriptionBudget`` in production; the
  default ``NoBudget`` spends nothing);
* records the last rate-limit headers it saw (for metrics) and tells the budget;
* after a ``429`` refuses further reads for that subscription until ``Retry-After`` has
  passed, instead of provoking more ``429`` s — only further list calls when the 429
  came from Compute's list budget and ARM still reports subscription reads left;
* serves lists whole (``list_vms``) or page by page (``list_vms_page``: a caller can
  spread a listing over time and resume it at its ``nextLink``), and says without
  spending when the next request of a kind could go (``ready_in``);
* bounds concurrency, sets a timeout on every call, follows ``nextLink`` only on its own
  endpoint (the bearer token must never travel to another host).

The bearer token is the joining VM's own access token (passed per call), never stored or
logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import aiohttp

from gateway.azure.resource_id import ResourceId, azure_name_key, parse_resource_id
from gateway.azure.token import normalize_guid
from gateway.core.clock import Clock
from gateway.core.errors import Code, JoinRejected, Overloaded
from gateway.core.httputil import parse_retry_after, read_capped

__all__ = [
    "ArmBudget",
    "ArmClient",
    "ArmLimitsObserver",
    "ArmReadKind",
    "ListedVm",
    "NoBudget",
    "VmPage",
    "VmRecord",
    "vm_record_from_model",
]

logger = logging.getLogger(__name__)

_MAX_BODY = 8 * 1024 * 1024  # a page of 1000 VM models is a few MiB
_MAX_PAGES = 200
_DEFAULT_RETRY_AFTER = 5.0
_MAX_RETRY_AFTER = 300.0
# Azure's largest VM sizes take 8 NICs; more in a model is a broken answer, and the cap
# bounds the reads one join can cause.
_MAX_NICS = 8
_MAX_IP_CONFIGS = 256
# Microsoft.Network's networkInterfaces, and the scale-set instance NIC path Azure serves
# only under 2018-10-01 (https://learn.microsoft.com/rest/api/virtualnetwork/
# network-interface-in-vm-ss/get-virtual-machine-scale-set-network-interface).
NETWORK_API_VERSION = "2024-05-01"
VMSS_NIC_API_VERSION = "2018-10-01"


@dataclass(frozen=True)
class VmRecord:
    """One VM as ARM describes it. ``vm_id`` is ``properties.vmId``, lowercased."""

    resource_id: str  # as ARM returned it
    name: str
    vm_id: str
    resource_group: str
    subscription: str  # lowercase GUID
    scale_set: str | None = None
    instance_id: str | None = None
    # For the allow rules (locations, tags) — what ARM said, no extra call.
    location: str | None = None
    tags: Mapping[str, str] | None = None
    # properties.networkProfile.networkInterfaces[].id (at most _MAX_NICS): where the
    # VM's private IPs are, read only when a token allows IP names (get_nic_private_ips).
    nic_ids: tuple[str, ...] = ()
    # ``resource_id`` as ``vm_record_from_model`` parsed it, so that the directory does
    # not parse every listed VM's ID a second time; not compared (it follows from
    # ``resource_id``), and read through ``parsed_id``, which parses when it is absent.
    rid: ResourceId | None = field(default=None, compare=False, repr=False)

    def parsed_id(self) -> ResourceId:
        """``resource_id``, parsed (raises ``JoinRejected`` when it does not parse)."""
        rid = self.rid
        if rid is not None and rid.raw == self.resource_id:
            return rid
        return parse_resource_id(self.resource_id)


class ListedVm:
    """One VM model of a list page, held until someone asks for its ``VmRecord``.

    A listing answers every later join of its group, but most VMs it lists never join
    through this process (another worker gets them, or they never join at all), so a
    page keeps of each model only what finds it — its vmId and its resource ID's folded
    key (``azure_name_key``, the form ``ResourceId.key`` has) — and the few raw fields a
    record is made of. ``record()`` makes and checks the record the first time it is
    asked, exactly as ``vm_record_from_model`` does for a model read whole, and keeps the
    answer (then drops the raw fields).

    Only models with a string ``id`` and ``name`` and a GUID ``properties.vmId`` become
    one (``listed_vm``): anything else is skipped when the page is read, as before."""

    __slots__ = ("_built", "_raw", "key", "vm_id")

    def __init__(
        self, vm_id: str, key: str, raw: tuple[str, str, object, object, object, object]
    ) -> None:
        self.vm_id = vm_id  # properties.vmId, lowercased (normalize_guid)
        self.key = key  # azure_name_key(id)
        # (id, name, location, tags, properties.networkProfile,
        # properties.virtualMachineScaleSet), as JSON decoded them; None once built.
        self._raw: tuple[str, str, object, object, object, object] | None = raw
        self._built: VmRecord | None = None

    def record(self) -> VmRecord | None:
        """The model's ``VmRecord``; None when it is malformed (logged once)."""
        raw = self._raw
        if raw is None:
            return self._built
        self._raw = None
        raw_id, name, location, tags, network_profile, scale_set_ref = raw
        try:
            self._built = _record_of(
                raw_id, name, self.vm_id, location, tags, network_profile, scale_set_ref
            )
        except (ValueError, JoinRejected) as exc:
            logger.warning("skipping a malformed VM model from ARM: %s", exc)
        return self._built

    def __repr__(self) -> str:
        state = "unbuilt" if self._raw is not None else "built" if self._built else "malformed"
        return f"<ListedVm {self.key[:200]!r} vmId={self.vm_id} {state}>"


def listed_vm(item: dict[str, Any]) -> ListedVm | None:
    """A list item (a JSON object) as a ``ListedVm``, or None (logged) when it lacks what
    every VM model has: a string ``id`` and ``name`` and a GUID ``properties.vmId`` (the
    first check of ``vm_record_from_model``; the rest waits for ``ListedVm.record``).
    JSON decodes objects to ``dict`` only, so ``dict`` is checked, not ``Mapping``."""
    raw_id = item.get("id")
    name = item.get("name")
    props = item.get("properties")
    vm_id = normalize_guid(props.get("vmId")) if type(props) is dict else None
    if vm_id is None or type(props) is not dict or type(raw_id) is not str or type(name) is not str:
        logger.warning(
            "skipping a malformed VM model from ARM: "
            "VM model lacks id, name or a GUID properties.vmId"
        )
        return None
    fields = (
        raw_id,
        name,
        item.get("location"),
        item.get("tags"),
        props.get("networkProfile"),
        props.get("virtualMachineScaleSet"),
    )
    return ListedVm(vm_id, azure_name_key(raw_id), fields)


@dataclass(frozen=True)
class VmPage:
    """One page of a list call; ``next_link`` (on our endpoint, checked) names the next
    page, None after the last one.

    ``ArmClient``'s page reads fill ``models`` (each VM made into a record only when asked,
    ``ListedVm``) and leave ``records`` empty; a page put together by hand may hold records
    made already there instead."""

    records: tuple[VmRecord, ...]
    next_link: str | None
    models: tuple[ListedVm, ...] = ()


# "list": a page of a list call, which also spends from Compute's list budget.
ArmReadKind = Literal["read", "list"]


class ArmBudget(Protocol):
    """Per-subscription read budget (``gateway.azure.budget.SubscriptionBudget``).

    ``acquire`` waits for or refuses one request (raising
    ``Overloaded(AZURE_BUDGET_EXHAUSTED)``); ``observe`` is told what ARM said:
    ``remaining_reads`` from ``x-ms-ratelimit-remaining-subscription-reads``,
    ``remaining_lists`` (list pages only) the smallest count in
    ``x-ms-ratelimit-remaining-resource``, and ``retry_after`` when ARM sent one, which
    holds back every read (``closes="read"``) or list calls only (``closes="list"``)."""

    async def acquire(self, subscription: str, *, kind: ArmReadKind = "read") -> None: ...

    def ready_in(self, subscription: str, *, kind: ArmReadKind = "read", ahead: int = 0) -> float:
        """Seconds until ``acquire(kind=kind)`` would be granted without waiting, after
        ``ahead`` more requests of that kind have taken theirs."""
        ...

    def observe(
        self,
        subscription: str,
        *,
        remaining_reads: int | None,
        retry_after: float | None,
        remaining_lists: int | None = None,
        closes: ArmReadKind = "read",
    ) -> None: ...


class ArmLimitsObserver(Protocol):
    """Told what each ARM answer said about our rate limits (``Metrics`` is one): the
    headers are parsed here once, never by the observer."""

    def arm_limits(
        self,
        *,
        status: int,
        remaining_reads: int | None,
        remaining_resource: Mapping[str, int],
        retry_after: float | None,
    ) -> None: ...


class NoBudget:
    """A budget that never refuses (``--mode naive`` and unit tests of the client)."""

    async def acquire(self, subscription: str, *, kind: ArmReadKind = "read") -> None:
        return None

    def ready_in(self, subscription: str, *, kind: ArmReadKind = "read", ahead: int = 0) -> float:
        return 0.0

    def observe(
        self,
        subscription: str,
        *,
        remaining_reads: int | None,
        retry_after: float | None,
        remaining_lists: int | None = None,
        closes: ArmReadKind = "read",
    ) -> None:
        return None

    def __repr__(self) -> str:
        return "NoBudget()"


def _parse_remaining_resource(value: str | None) -> dict[str, int]:
    # "Microsoft.Compute/GetVM3Min;239,Microsoft.Compute/GetVM30Min;1199"
    out: dict[str, int] = {}
    for item in (value or "").split(","):
        name, sep, count = item.strip().rpartition(";")
        if sep and name:
            try:
                out[name] = int(count)
            except ValueError:
                continue
    return out


class ArmClient:
    """Parameters:

    * session — the shared ``aiohttp.ClientSession`` (owned by the caller).
    * endpoint — the cloud's ARM endpoint (``https://management.azure.com``) or the
      emulator's.
    * clock — injected; ``Retry-After`` holds use it.
    * api_version — Compute API version for every call.
    * timeout — total seconds per HTTP request.
    * max_concurrency — in-flight ARM requests from this process.
    * budget — per-subscription read budget (default ``NoBudget``).
    * observer — told every answer's rate-limit headers (metrics); none by default.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        endpoint: str,
        clock: Clock,
        api_version: str = "2024-07-01",
        timeout: float = 10.0,
        max_concurrency: int = 16,
        budget: ArmBudget | None = None,
        observer: ArmLimitsObserver | None = None,
    ) -> None:
        endpoint = endpoint.rstrip("/")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"ARM endpoint {endpoint!r} is not an http(s) URL")
        self._session = session
        self._endpoint = endpoint
        self._origin = (parts.scheme, parts.hostname.lower(), parts.port)
        self._path_prefix = parts.path
        self._clock = clock
        self._api_version = api_version
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._sem = asyncio.Semaphore(max_concurrency)
        self._budget: ArmBudget = budget or NoBudget()
        self._observer = observer
        # (subscription, "read" | "list") -> until: a "read" hold stops every request of
        # the subscription, a "list" hold list pages only (see _read_limits).
        self._blocked_until: dict[tuple[str, ArmReadKind], float] = {}
        self.calls: Counter[str] = Counter()
        # Last rate-limit headers seen, for metrics.
        self.remaining_subscription_reads: int | None = None
        self.remaining_resource: dict[str, int] = {}
        self.last_retry_after: float | None = None

    # -- public -------------------------------------------------------------------------

    async def get_vm(self, rid: ResourceId, *, bearer: str) -> VmRecord | None:
        """The VM ``rid`` names, or None when ARM says 404."""
        if not rid.is_vm:
            raise ValueError("get_vm needs a virtualMachines resource ID")
        url = self._url(
            rid.subscription,
            rid.resource_group,
            "virtualMachines",
            rid.name,
        )
        body = await self._get(url, "get_vm", rid.subscription, bearer)
        return None if body is None else self._point_record(body, rid, "get_vm")

    async def list_vms(
        self, subscription: str, resource_group: str, *, bearer: str
    ) -> list[VmRecord]:
        """Every VM in a resource group (all pages). A missing group is an empty list."""
        url = self._url(subscription, resource_group, "virtualMachines")
        return await self._list(url, "list_vms", subscription, bearer)

    async def get_vmss_vm(self, rid: ResourceId, *, bearer: str) -> VmRecord | None:
        """One scale set instance (``…/virtualMachineScaleSets/<ss>/virtualMachines/<i>``)."""
        if not rid.is_scale_set_vm:
            raise ValueError("get_vmss_vm needs a scale set VM resource ID")
        url = self._url(
            rid.subscription,
            rid.resource_group,
            "virtualMachineScaleSets",
            rid.name,
            "virtualMachines",
            rid.child_names[0],
        )
        body = await self._get(url, "get_vmss_vm", rid.subscription, bearer)
        return None if body is None else self._point_record(body, rid, "get_vmss_vm")

    async def list_vmss_vms(
        self, subscription: str, resource_group: str, scale_set: str, *, bearer: str
    ) -> list[VmRecord]:
        """Every instance of a scale set (all pages). A missing scale set is an empty list."""
        url = self._url(
            subscription, resource_group, "virtualMachineScaleSets", scale_set, "virtualMachines"
        )
        return await self._list(url, "list_vmss_vms", subscription, bearer)

    async def list_vms_page(
        self, subscription: str, resource_group: str, *, bearer: str, next_link: str | None
    ) -> VmPage:
        """One page of a resource group's VMs: the first (``next_link=None``) or the one a
        previous page's ``next_link`` names. A missing group is an empty last page. Lets a
        caller spread one listing over time and resume it (``VmDirectory``)."""
        url = next_link or self._url(subscription, resource_group, "virtualMachines")
        return await self._page(url, "list_vms", subscription, bearer)

    async def list_vmss_vms_page(
        self,
        subscription: str,
        resource_group: str,
        scale_set: str,
        *,
        bearer: str,
        next_link: str | None,
    ) -> VmPage:
        """One page of a scale set's instances (see ``list_vms_page``)."""
        url = next_link or self._url(
            subscription, resource_group, "virtualMachineScaleSets", scale_set, "virtualMachines"
        )
        return await self._page(url, "list_vmss_vms", subscription, bearer)

    async def get_nic_private_ips(self, nic_id: str, *, bearer: str) -> tuple[str, ...] | None:
        """The private IPs of one network interface (``properties.ipConfigurations[]
        .properties.privateIPAddress``), or None when ARM says 404. ``nic_id`` is a VM
        model's NIC reference: a ``Microsoft.Network/networkInterfaces`` ID, or a uniform
        scale-set instance's ``…/virtualMachines/<i>/networkInterfaces/<nic>``."""
        rid = parse_resource_id(nic_id)
        shape = (azure_name_key(rid.provider), tuple(azure_name_key(t) for t in rid.types))
        if shape == ("microsoft.network", ("networkinterfaces",)):
            version = NETWORK_API_VERSION
        elif shape == (
            "microsoft.compute",
            ("virtualmachinescalesets", "virtualmachines", "networkinterfaces"),
        ):
            version = VMSS_NIC_API_VERSION
        else:
            raise ValueError("not a network interface ID")
        names = (rid.name, *rid.child_names)
        path = [seg for pair in zip(rid.types, names, strict=True) for seg in pair]
        url = self._url(
            rid.subscription, rid.resource_group, *path, provider=rid.provider, api_version=version
        )
        body = await self._get(url, "get_nic", rid.subscription, bearer)
        if body is None:
            return None
        props = body.get("properties")
        configs = props.get("ipConfigurations") if isinstance(props, Mapping) else None
        if not isinstance(configs, list) or len(configs) > _MAX_IP_CONFIGS:
            raise self._bad_answer("get_nic", "no ipConfigurations list")
        ips: list[str] = []
        for config in configs:
            cprops = config.get("properties") if isinstance(config, Mapping) else None
            ip = cprops.get("privateIPAddress") if isinstance(cprops, Mapping) else None
            if isinstance(ip, str) and ip:
                ips.append(ip)
        return tuple(ips)

    def ready_in(self, subscription: str, *, kind: ArmReadKind = "read", ahead: int = 0) -> float:
        """Seconds until a request of ``kind`` for ``subscription`` could be sent (after
        ``ahead`` more of them): 0 when now, else the longer of a ``Retry-After`` hold and
        the budget's wait. Lets the caller choose between a list page and a point read
        without spending either."""
        sub = azure_name_key(subscription)
        return max(self._held_for(sub, kind), self._budget.ready_in(sub, kind=kind, ahead=ahead))

    def _held_for(self, subscription: str, kind: ArmReadKind) -> float:
        """Seconds left of a Retry-After hold that stops a request of ``kind``."""
        now = self._clock.monotonic()
        kinds: tuple[ArmReadKind, ...] = ("read", "list") if kind == "list" else ("read",)
        held = 0.0
        for k in kinds:
            until = self._blocked_until.get((subscription, k))
            if until is not None:
                if until > now:
                    held = max(held, until - now)
                else:
                    del self._blocked_until[(subscription, k)]
        return held

    def __repr__(self) -> str:
        return (
            f"<ArmClient {self._endpoint} calls={dict(self.calls)} "
            f"remaining_reads={self.remaining_subscription_reads} "
            f"blocked={len(self._blocked_until)}>"
        )

    # -- plumbing -----------------------------------------------------------------------

    def _url(
        self,
        subscription: str,
        resource_group: str,
        *path: str,
        provider: str = "Microsoft.Compute",
        api_version: str | None = None,
    ) -> str:
        sub = normalize_guid(subscription)
        if sub is None:
            raise ValueError("subscription is not a GUID")
        segs = [
            "subscriptions",
            sub,
            "resourceGroups",
            resource_group,
            "providers",
            provider,
            *path,
        ]
        for seg in segs:
            if not seg or seg in (".", ".."):
                raise ValueError("empty or dot path segment")
        quoted = "/".join(quote(seg, safe="") for seg in segs)
        version = self._api_version if api_version is None else api_version
        return f"{self._endpoint}/{quoted}?api-version={quote(version, safe='')}"

    def _on_endpoint(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            origin = (parts.scheme, (parts.hostname or "").lower(), parts.port)
        except ValueError:
            return False
        return (
            origin == self._origin
            and not parts.username
            and not parts.password
            and parts.path.startswith(self._path_prefix + "/")
        )

    async def _list(self, url: str, kind: str, subscription: str, bearer: str) -> list[VmRecord]:
        records: list[VmRecord] = []
        next_url: str | None = url
        pages = 0
        while next_url is not None:
            pages += 1
            if pages > _MAX_PAGES:
                raise Overloaded(
                    Code.DEPENDENCY_UNAVAILABLE,
                    retry_after=_DEFAULT_RETRY_AFTER,
                    detail=f"ARM {kind}: more than {_MAX_PAGES} pages",
                )
            page = await self._page(next_url, kind, subscription, bearer)
            records.extend(page.records)
            for model in page.models:  # the whole list is asked for: make every record
                record = model.record()
                if record is not None:
                    records.append(record)
            next_url = page.next_link
        return records

    async def _page(self, url: str, kind: str, subscription: str, bearer: str) -> VmPage:
        body = await self._get(url, kind, subscription, bearer)
        if body is None:
            return VmPage((), None)
        value = body.get("value")
        if not isinstance(value, list):
            raise self._bad_answer(kind, "list has no 'value' array")
        models: list[ListedVm] = []
        for item in value:
            # Records are made when asked (ListedVm): most listed VMs never are.
            model = listed_vm(item) if type(item) is dict else None
            if model is not None:
                models.append(model)
        link = body.get("nextLink")
        if link is None or link == "":
            return VmPage((), None, tuple(models))
        if isinstance(link, str) and self._on_endpoint(link):
            return VmPage((), link, tuple(models))
        # Following it would send the bearer token to another host.
        raise self._bad_answer(kind, f"nextLink {str(link)[:200]!r} is off the endpoint")

    def _bad_answer(self, kind: str, why: str) -> Overloaded:
        return Overloaded(
            Code.DEPENDENCY_UNAVAILABLE,
            retry_after=_DEFAULT_RETRY_AFTER,
            detail=f"ARM {kind}: {why}",
        )

    def _point_record(self, body: Mapping[str, Any], rid: ResourceId, kind: str) -> VmRecord:
        """The ``VmRecord`` of a point read's answer; a malformed model, or one of another
        resource than the one asked about (not to be trusted), is a dependency failure."""
        try:
            record = vm_record_from_model(body)
        except (ValueError, JoinRejected) as exc:
            raise self._bad_answer("VM model", str(exc)) from exc
        if record.parsed_id().key != rid.key:
            raise self._bad_answer(kind, "answer names another resource")
        return record

    def _read_limits(
        self, subscription: str, resp: aiohttp.ClientResponse, *, is_list: bool
    ) -> tuple[float | None, ArmReadKind]:
        """Record the rate-limit headers, tell the budget; (Retry-After, what it holds)."""
        reads = resp.headers.get("x-ms-ratelimit-remaining-subscription-reads")
        remaining: int | None = None
        if reads is not None:
            try:
                remaining = int(reads)
            except ValueError:
                remaining = None
            self.remaining_subscription_reads = remaining
        resource = resp.headers.get("x-ms-ratelimit-remaining-resource")
        remaining_lists: int | None = None
        resource_now: dict[str, int] = {}
        if resource is not None:
            self.remaining_resource = resource_now = _parse_remaining_resource(resource)
            if is_list and self.remaining_resource:
                remaining_lists = min(self.remaining_resource.values())
        retry_after = parse_retry_after(
            resp.headers.get("Retry-After"), now=self._clock.now(), cap=_MAX_RETRY_AFTER
        )
        if retry_after is not None:
            self.last_retry_after = retry_after
        if self._observer is not None:
            self._observer.arm_limits(
                status=resp.status,
                remaining_reads=remaining,
                remaining_resource=resource_now,
                retry_after=retry_after,
            )
        # Compute's list calls have a budget of their own (HighCostGet), and Azure's answer
        # when it is spent still reports subscription reads left: then only list calls
        # must wait, and point reads may go on (https://learn.microsoft.com/troubleshoot/
        # azure/virtual-machines/windows/troubleshooting-throttling-errors).
        closes: ArmReadKind = (
            "list" if is_list and remaining is not None and remaining > 0 else "read"
        )
        self._budget.observe(
            subscription,
            remaining_reads=remaining,
            retry_after=retry_after,
            remaining_lists=remaining_lists,
            closes=closes,
        )
        return retry_after, closes

    async def _get(
        self, url: str, kind: str, subscription: str, bearer: str
    ) -> dict[str, Any] | None:
        """One GET: the JSON object, or None on 404. Everything else raises ours."""
        subscription = azure_name_key(subscription)
        is_list = kind.startswith("list")
        read_kind: ArmReadKind = "list" if is_list else "read"
        held = self._held_for(subscription, read_kind)
        if held > 0:
            raise Overloaded(
                Code.AZURE_BUDGET_EXHAUSTED,
                retry_after=held,
                detail=f"ARM asked us to wait for subscription {subscription}",
            )
        await self._budget.acquire(subscription, kind=read_kind)
        async with self._sem:
            self.calls[kind] += 1
            try:
                async with self._session.get(
                    url,
                    timeout=self._timeout,
                    allow_redirects=False,
                    headers={"Authorization": f"Bearer {bearer}", "Accept": "application/json"},
                ) as resp:
                    retry_after, closes = self._read_limits(subscription, resp, is_list=is_list)
                    status = resp.status
                    if status == 200:
                        body = await read_capped(resp, _MAX_BODY)
                    else:
                        body = b""
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise Overloaded(
                    Code.DEPENDENCY_UNAVAILABLE,
                    retry_after=_DEFAULT_RETRY_AFTER,
                    detail=f"ARM {kind}: {type(exc).__name__}",
                ) from exc
        if status == 200:
            try:
                value = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise self._bad_answer(kind, "body is not JSON") from exc
            if not isinstance(value, dict):
                raise self._bad_answer(kind, "body is not a JSON object")
            return value
        if status == 404:
            return None
        if status in (401, 403):
            action = (
                "Microsoft.Network/networkInterfaces/read on the VM's NICs"
                if kind == "get_nic"
                else "Microsoft.Compute/virtualMachines/read on the VM's scope"
            )
            raise JoinRejected(
                Code.VM_BINDING_FAILED,
                f"ARM {kind} answered {status}: the identity lacks {action}",
            )
        if status == 429:
            wait = retry_after if retry_after is not None else _DEFAULT_RETRY_AFTER
            self._blocked_until[(subscription, closes)] = self._clock.monotonic() + wait
            logger.warning(
                "ARM throttled %s for subscription %s: wait %.1fs", kind, subscription, wait
            )
            raise Overloaded(
                Code.AZURE_BUDGET_EXHAUSTED,
                retry_after=wait,
                detail=f"ARM {kind} answered 429 for subscription {subscription}",
            )
        raise Overloaded(
            Code.DEPENDENCY_UNAVAILABLE,
            retry_after=retry_after if retry_after is not None else _DEFAULT_RETRY_AFTER,
            detail=f"ARM {kind} answered HTTP {status}",
        )


def vm_record_from_model(item: Mapping[str, Any]) -> VmRecord:
    """A ``VmRecord`` from one VM model as ARM returns it (a GET or a list item); raises
    ``ValueError`` (or ``JoinRejected`` for a malformed resource ID) when it is not one."""
    raw_id = item.get("id")
    name = item.get("name")
    props = item.get("properties")
    if not isinstance(props, Mapping):
        props = {}  # so no vmId: refused below
    vm_id = normalize_guid(props.get("vmId"))
    if not isinstance(raw_id, str) or not isinstance(name, str) or vm_id is None:
        raise ValueError("VM model lacks id, name or a GUID properties.vmId")
    return _record_of(
        raw_id,
        name,
        vm_id,
        item.get("location"),
        item.get("tags"),
        props.get("networkProfile"),
        props.get("virtualMachineScaleSet"),
    )


def _record_of(
    raw_id: str,
    name: str,
    vm_id: str,
    location: object,
    tags: object,
    network_profile: object,
    scale_set_ref: object,
) -> VmRecord:
    """The record of a VM model's fields (``vm_record_from_model`` took them out and
    checked the first three; ``ListedVm`` keeps them until asked): raises ``ValueError``
    or ``JoinRejected`` as that function says."""
    rid = parse_resource_id(raw_id)
    if rid.is_vm:  # a standalone VM, or a flexible scale set's (its model names the set)
        scale_set, instance_id = _flexible_scale_set(scale_set_ref), None
    elif rid.is_scale_set_vm:  # a uniform scale set's instance: its ID names both
        scale_set, instance_id = rid.name, rid.child_names[0]
    else:
        raise ValueError("id names neither a VM nor a scale set VM")
    return VmRecord(
        resource_id=raw_id,
        name=name,
        vm_id=vm_id,
        resource_group=rid.resource_group,
        subscription=rid.subscription,
        scale_set=scale_set,
        instance_id=instance_id,
        location=location if isinstance(location, str) else None,
        tags=_tags(tags),
        nic_ids=_nic_ids(network_profile),
        rid=rid,
    )


def _nic_ids(profile: object) -> tuple[str, ...]:
    """``properties.networkProfile.networkInterfaces[].id``: the first ``_MAX_NICS``
    strings (a VM model without a network profile has none)."""
    nics = profile.get("networkInterfaces") if isinstance(profile, Mapping) else None
    if not isinstance(nics, list):
        return ()
    ids = [n.get("id") for n in nics if isinstance(n, Mapping)]
    return tuple(i for i in ids if isinstance(i, str) and i)[:_MAX_NICS]


def _flexible_scale_set(ref: object) -> str | None:
    """A flexible scale set's VM is an ordinary ``virtualMachines`` resource whose
    ``properties.virtualMachineScaleSet.id`` (``ref`` is that object) names its set
    (https://learn.microsoft.com/azure/virtual-machine-scale-sets/virtual-machine-scale-sets-orchestration-modes)."""
    ref_id = ref.get("id") if isinstance(ref, Mapping) else None
    if not isinstance(ref_id, str):
        return None
    try:
        rid = parse_resource_id(ref_id)
    except (ValueError, JoinRejected):
        return None
    return rid.name if rid.is_scale_set else None


def _tags(value: object) -> Mapping[str, str]:
    """ARM's ``tags``: absent means none; anything not str→str is dropped, never guessed."""
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
