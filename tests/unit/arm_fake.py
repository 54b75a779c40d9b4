"""A fake Azure Resource Manager for unit tests: an aiohttp app that records requests.

Shared by ``test_arm.py`` and ``test_binding.py``; serves VM GET/list and scale-set
instance list/get with ``nextLink`` paging, the rate-limit headers, and switchable faults.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

NOW = 1_800_000_000.0
SUB = "11111111-1111-1111-1111-111111111111"
SUB2 = "22222222-2222-2222-2222-222222222222"
REMAINING_RESOURCE = "Microsoft.Compute/GetVM3Min;239,Microsoft.Compute/GetVM30Min;1199"


def vm_id(i: int) -> str:
    return f"{i:08d}-aaaa-bbbb-cccc-DDDDDDDDDDDD"


def _compute(rg: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute"


def vm_model(rg: str, name: str, i: int) -> dict[str, Any]:
    return {
        "id": f"{_compute(rg.upper())}/virtualMachines/{name}",
        "name": name,
        "location": "westeurope",
        "properties": {"vmId": vm_id(i), "provisioningState": "Succeeded"},
    }


def vmss_vm_model(rg: str, ss: str, instance: int) -> dict[str, Any]:
    return {
        "id": f"{_compute(rg)}/virtualMachineScaleSets/{ss}/virtualMachines/{instance}",
        "name": f"{ss}_{instance}",
        "instanceId": str(instance),
        "properties": {"vmId": vm_id(100 + instance)},
    }


class FakeArm:
    def __init__(self) -> None:
        self.base = ""
        self.vms: dict[str, list[dict[str, Any]]] = {}  # rg (lower) -> models
        self.vmss: dict[str, list[dict[str, Any]]] = {}  # scale set (lower) -> models
        self.page_size = 2
        self.requests: list[str] = []
        self.auth: list[str | None] = []
        self.status: int | None = None
        self.status_headers: dict[str, str] = {}
        self.body: bytes | None = None
        self.next_link: str | None = None
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.reads_left = 250
        self.list_status: int | None = None  # answer only the VM list calls with this
        self.nics: dict[str, list[str]] = {}  # NIC name (lower) -> its private IPs

    def _headers(self) -> dict[str, str]:
        self.reads_left -= 1
        return {
            "x-ms-ratelimit-remaining-subscription-reads": str(self.reads_left),
            "x-ms-ratelimit-remaining-resource": REMAINING_RESOURCE,
        }

    async def _enter(self, request: web.Request) -> web.StreamResponse | None:
        self.requests.append(request.path_qs)
        self.auth.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.status is not None:
            return web.Response(
                status=self.status, headers={**self._headers(), **self.status_headers}, text="{}"
            )
        if self.body is not None:
            return web.Response(
                status=200, body=self.body, headers=self._headers(), content_type="application/json"
            )
        return None

    def _page(self, request: web.Request, items: list[dict[str, Any]]) -> web.StreamResponse:
        skip = int(request.query.get("$skiptoken", "0"))
        page = items[skip : skip + self.page_size]
        body: dict[str, Any] = {"value": page}
        if skip + self.page_size < len(items):
            version = request.query["api-version"]
            body["nextLink"] = self.next_link or (
                f"{self.base}{request.path}?api-version={version}"
                f"&$skiptoken={skip + self.page_size}"
            )
        return web.json_response(body, headers=self._headers())

    async def get_vm(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request)
        if early is not None:
            return early
        if request.match_info["sub"].lower() != SUB:
            return web.json_response({"error": {"code": "SubscriptionNotFound"}}, status=404)
        for model in self.vms.get(request.match_info["rg"].lower(), []):
            if model["name"].lower() == request.match_info["name"].lower():
                return web.json_response(model, headers=self._headers())
        return web.json_response(
            {"error": {"code": "ResourceNotFound"}}, status=404, headers=self._headers()
        )

    async def list_vms(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request)
        if early is not None:
            return early
        if self.list_status is not None:
            headers = {**self._headers(), **self.status_headers}
            return web.json_response({}, status=self.list_status, headers=headers)
        rg = request.match_info["rg"].lower()
        if rg not in self.vms:
            return web.json_response({"error": {"code": "ResourceGroupNotFound"}}, status=404)
        return self._page(request, self.vms[rg])

    async def list_vmss_vms(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request)
        if early is not None:
            return early
        return self._page(request, self.vmss.get(request.match_info["ss"].lower(), []))

    async def get_vmss_vm(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request)
        if early is not None:
            return early
        for model in self.vmss.get(request.match_info["ss"].lower(), []):
            if model["instanceId"] == request.match_info["inst"]:
                return web.json_response(model, headers=self._headers())
        return web.json_response({}, status=404)

    async def get_nic(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request)
        if early is not None:
            return early
        ips = self.nics.get(request.match_info["nic"].lower())
        if ips is None:
            return web.json_response({"error": {"code": "NotFound"}}, status=404)
        configs = [
            {"name": f"ipconfig{i}", "properties": {"privateIPAddress": ip}}
            for i, ip in enumerate(ips)
        ]
        return web.json_response(
            {"name": request.match_info["nic"], "properties": {"ipConfigurations": configs}},
            headers=self._headers(),
        )


PREFIX = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute"
NETWORK = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network"


def fake_arm_app(fake: FakeArm) -> web.Application:
    app = web.Application()
    app.router.add_get(PREFIX + "/virtualMachines/{name}", fake.get_vm)
    app.router.add_get(PREFIX + "/virtualMachines", fake.list_vms)
    app.router.add_get(PREFIX + "/virtualMachineScaleSets/{ss}/virtualMachines", fake.list_vmss_vms)
    app.router.add_get(
        PREFIX + "/virtualMachineScaleSets/{ss}/virtualMachines/{inst}", fake.get_vmss_vm
    )
    app.router.add_get(NETWORK + "/networkInterfaces/{nic}", fake.get_nic)
    app.router.add_get(
        PREFIX + "/virtualMachineScaleSets/{ss}/virtualMachines/{inst}/networkInterfaces/{nic}",
        fake.get_nic,
    )
    return app


async def start_fake_arm() -> AsyncIterator[FakeArm]:
    """Run a ``FakeArm`` on 127.0.0.1, port 0 (use as the body of a fixture)."""
    fake = FakeArm()
    runner = web.AppRunner(fake_arm_app(fake))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()
