"""The Azure emulator behaves like Azure where the gateway (and the agent) can tell.

Every test drives the emulator over real HTTP(S) sockets on loopback; tokens and documents
are really signed, so a check that passes here is a check that would pass against Azure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from gateway.core.clock import FixedClock
from gateway.dev.emulator import ArmLimits, AzureEmulator, EmulatedVm, Latency, build_fleet
from gateway.dev.emulator.fleet import apply_fleet_spec

SUB = "11111111-1111-1111-1111-111111111111"
SUB2 = "22222222-2222-2222-2222-222222222222"
NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
API_ATTESTED = "2025-04-07"
API_TOKEN = "2018-02-01"
API_ARM = "2024-07-01"
ARM = "https://management.azure.com/"


class World:
    """An emulator on a fixed clock with a small, known fleet."""

    def __init__(self, emu: AzureEmulator, clock: FixedClock, session: aiohttp.ClientSession):
        self.emu = emu
        self.clock = clock
        self.session = session
        self.tid = emu.add_tenant()
        self.user_vm = emu.add_vm(
            subscription=SUB, resource_group="rg-a", name="web-1", tenant=self.tid, identity="user"
        )
        self.user_vm2 = emu.add_vm(
            subscription=SUB,
            resource_group="rg-a",
            name="web-2",
            tenant=self.tid,
            identity="user",
            client_id=self.user_vm.client_id,
        )
        self.sys_vm = emu.add_vm(
            subscription=SUB, resource_group="rg-b", name="db-1", tenant=self.tid, identity="system"
        )
        self.ss_user = emu.add_scale_set(
            subscription=SUB,
            resource_group="rg-a",
            name="pool",
            tenant=self.tid,
            capacity=4,
            identity="user",
        )
        self.ss_sys = emu.add_scale_set(
            subscription=SUB2,
            resource_group="rg-c",
            name="sys-pool",
            tenant=self.tid,
            capacity=2,
            identity="system",
        )
        self.ssl = emu.client_ssl_context()

    async def imds(
        self, vm: EmulatedVm, what: str, params: dict[str, str], headers: dict[str, str] | None
    ) -> tuple[int, Any]:
        path = (
            "/metadata/attested/document"
            if what == "attested"
            else "/metadata/identity/oauth2/token"
        )
        async with self.session.get(vm.imds_url + path, params=params, headers=headers or {}) as r:
            return r.status, await r.json(content_type=None)

    async def arm(
        self, path: str, token: str | None, *, api: str | None = API_ARM, url: str | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"api-version": api} if api and url is None else None
        target = url or self.emu.https_url + path
        async with self.session.get(target, params=params, headers=headers, ssl=self.ssl) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FixedClock(NOW)
    emu = AzureEmulator(latency=Latency.none(), clock=clock, page_size=3)
    async with emu, aiohttp.ClientSession() as session:
        yield World(emu, clock, session)


def _claims(jwt: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))  # type: ignore[no-any-return]


def _header(jwt: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(jwt.split(".")[0] + "=="))  # type: ignore[no-any-return]


def _rg_path(sub: str, rg: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute"


# --------------------------------------------------------------------------- IMDS


META = {"Metadata": "true"}

ATTESTED_CASES = [
    (
        "a request without the Metadata header is refused",
        {},
        {"api-version": API_ATTESTED},
        400,
        "metadata header",
    ),
    (
        "Metadata: false is refused",
        {"Metadata": "false"},
        {"api-version": API_ATTESTED},
        400,
        "metadata header",
    ),
    ("a request without api-version is refused", META, {}, 400, "api-version was not specified"),
    (
        "an unknown api-version is refused",
        META,
        {"api-version": "2099-01-01"},
        400,
        "api-version is invalid",
    ),
    (
        "a 33-character nonce is refused",
        META,
        {"api-version": API_ATTESTED, "nonce": "n" * 33},
        400,
        "Nonce",
    ),
    (
        "a request carrying X-Forwarded-For is refused",
        {**META, "X-Forwarded-For": "10.0.0.1"},
        {"api-version": API_ATTESTED},
        400,
        "X-Forwarded-For",
    ),
    (
        "a 32-character nonce is accepted",
        META,
        {"api-version": API_ATTESTED, "nonce": "n" * 32},
        200,
        None,
    ),
    ("an old api-version is accepted", META, {"api-version": "2019-04-30"}, 200, None),
]


@pytest.mark.parametrize(
    ("headers", "params", "status", "error_part"),
    [c[1:] for c in ATTESTED_CASES],
    ids=[c[0] for c in ATTESTED_CASES],
)
async def test_imds_attested_request_checks(
    world: World,
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
    error_part: str | None,
) -> None:
    got, body = await world.imds(world.user_vm, "attested", params, headers)
    assert got == status
    if error_part is None:
        assert set(body) == {"encoding", "signature"}
        assert body["encoding"] == "pkcs7"
        base64.b64decode(body["signature"], validate=True)
    else:
        assert error_part.lower() in body["error"].lower()


async def test_imds_attested_without_nonce_uses_expires_on(world: World) -> None:
    status, body = await world.imds(world.user_vm, "attested", {"api-version": API_ATTESTED}, META)
    assert status == 200
    der = base64.b64decode(body["signature"])
    start = der.index(b'{"licenseType"')
    content = json.loads(der[start : der.index(b'"}', der.index(b'"vmId"')) + 2])
    assert content["nonce"] == "20261124-180000"
    assert content["timeStamp"] == {
        "createdOn": "11/24/26 12:00:00 -0000",
        "expiresOn": "11/24/26 18:00:00 -0000",
    }
    assert content["vmId"] == world.user_vm.vm_id
    assert content["subscriptionId"] == SUB


TOKEN_CASES: list[tuple[str, dict[str, str], dict[str, str], int, str | None]] = [
    (
        "the token endpoint refuses a missing Metadata header",
        {},
        {"api-version": API_TOKEN, "resource": ARM},
        400,
        "metadata header",
    ),
    (
        "the token endpoint refuses an unknown api-version",
        META,
        {"api-version": "2001-01-01", "resource": ARM},
        400,
        "api-version",
    ),
    (
        "the token endpoint refuses a missing resource",
        META,
        {"api-version": API_TOKEN},
        400,
        "resource",
    ),
    (
        "the token endpoint refuses X-Forwarded-For",
        {**META, "X-Forwarded-For": "1.2.3.4"},
        {"api-version": API_TOKEN, "resource": ARM},
        400,
        "X-Forwarded-For",
    ),
    (
        "a client_id that is not on the VM is not found",
        META,
        {
            "api-version": API_TOKEN,
            "resource": ARM,
            "client_id": "99999999-9999-9999-9999-999999999999",
        },
        400,
        "Identity not found",
    ),
    (
        "an object_id that is not on the VM is not found",
        META,
        {
            "api-version": API_TOKEN,
            "resource": ARM,
            "object_id": "99999999-9999-9999-9999-999999999999",
        },
        400,
        "Identity not found",
    ),
    (
        "no client_id picks the VM's only identity",
        META,
        {"api-version": API_TOKEN, "resource": ARM},
        200,
        None,
    ),
]


@pytest.mark.parametrize(
    ("headers", "params", "status", "error_part"),
    [c[1:] for c in TOKEN_CASES],
    ids=[c[0] for c in TOKEN_CASES],
)
async def test_imds_token_request_checks(
    world: World,
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
    error_part: str | None,
) -> None:
    got, body = await world.imds(world.user_vm, "token", params, headers)
    assert got == status
    if error_part is None:
        assert body["token_type"] == "Bearer"
    else:
        assert body["error"] == "invalid_request"
        assert error_part.lower() in body["error_description"].lower()


async def test_imds_token_response_values_are_all_strings(world: World) -> None:
    params = {"api-version": API_TOKEN, "resource": ARM, "client_id": str(world.user_vm.client_id)}
    status, body = await world.imds(world.user_vm, "token", params, META)
    assert status == 200
    assert set(body) == {
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    }
    assert all(isinstance(v, str) for v in body.values())
    assert body["client_id"] == world.user_vm.client_id
    assert body["resource"] == ARM
    assert int(body["expires_on"]) - int(body["not_before"]) == 24 * 3600


async def test_imds_token_by_msi_res_id(world: World) -> None:
    jwt = world.emu.token_for(world.user_vm)
    mirid = _claims(jwt)["xms_mirid"]
    params = {"api-version": API_TOKEN, "resource": ARM, "msi_res_id": mirid}
    status, body = await world.imds(world.user_vm, "token", params, META)
    assert status == 200
    assert _claims(body["access_token"])["xms_mirid"] == mirid


def _rid(sub: str, rg: str, tail: str) -> str:
    return f"/subscriptions/{sub}/resourcegroups/{rg}/providers/{tail}"


@pytest.mark.parametrize(
    ("which", "mirid_tail", "az_rid_tail"),
    [
        (
            "user_vm",
            "Microsoft.ManagedIdentity/userAssignedIdentities/id-web-1",
            "Microsoft.Compute/virtualMachines/web-1",
        ),
        ("sys_vm", "Microsoft.Compute/virtualMachines/db-1", None),
        (
            "ss_user",
            "Microsoft.ManagedIdentity/userAssignedIdentities/id-pool",
            "Microsoft.Compute/virtualMachineScaleSets/pool",
        ),
        ("ss_sys", "Microsoft.Compute/virtualMachineScaleSets/sys-pool", None),
    ],
    ids=[
        "a user-assigned VM token names the identity and the VM",
        "a system-assigned VM token names the VM in xms_mirid only",
        "a scale-set instance token names the scale set in xms_az_rid",
        "a system-assigned scale-set token names the scale set in xms_mirid",
    ],
)
async def test_token_claims_name_the_right_resources(
    world: World, which: str, mirid_tail: str, az_rid_tail: str | None
) -> None:
    target = getattr(world, which)
    vm: EmulatedVm = target[1] if isinstance(target, list) else target
    jwt = world.emu.token_for(vm)
    claims = _claims(jwt)
    header = _header(jwt)
    assert header["alg"] == "RS256"
    assert header["x5t"] == header["kid"]
    assert claims["xms_mirid"] == _rid(vm.subscription, vm.resource_group, mirid_tail)
    if az_rid_tail is None:
        assert "xms_az_rid" not in claims
    else:
        assert claims["xms_az_rid"] == _rid(vm.subscription, vm.resource_group, az_rid_tail)
    assert claims["aud"] == ARM
    assert claims["iss"] == f"https://sts.windows.net/{world.tid}/"
    assert claims["tid"] == world.tid
    assert claims["oid"] == claims["sub"] == vm.principal_oid
    assert claims["ver"] == "1.0"
    assert claims["exp"] - claims["iat"] == 24 * 3600
    assert claims["iat"] == int(NOW.timestamp())


# --------------------------------------------------------------------------- ARM


async def test_arm_list_pages_with_next_link(world: World) -> None:
    token = world.emu.token_for(world.user_vm)
    status, body, _ = await world.arm(_rg_path(SUB, "rg-a") + "/virtualMachines", token)
    pages = [body]
    while "nextLink" in body:
        status, body, _ = await world.arm("", token, url=body["nextLink"])
        assert status == 200
        pages.append(body)
    names = [vm["name"] for page in pages for vm in page["value"]]
    # rg-a holds web-1, web-2 (standalone); scale-set instances are not in the VM list
    assert names == ["web-1", "web-2"]
    assert len(pages) == 1

    status, body, _ = await world.arm(
        _rg_path(SUB, "rg-a") + "/virtualMachineScaleSets/pool/virtualMachines", token
    )
    assert status == 200
    assert len(body["value"]) == 3
    status, body2, _ = await world.arm("", token, url=body["nextLink"])
    assert status == 200
    assert "nextLink" not in body2
    got = {(i["instanceId"], i["properties"]["vmId"]) for i in body["value"] + body2["value"]}
    assert got == {(v.instance_id, v.vm_id) for v in world.ss_user}


async def test_arm_list_pages_many_vms(world: World) -> None:
    vms = [
        world.emu.add_vm(
            subscription=SUB2,
            resource_group="big",
            name=f"b-{i}",
            tenant=world.tid,
            identity="user",
        )
        for i in range(7)
    ]
    token = world.emu.token_for(vms[0])
    status, body, _ = await world.arm(_rg_path(SUB2, "big") + "/virtualMachines", token)
    assert status == 200
    seen = [v["properties"]["vmId"] for v in body["value"]]
    pages = 1
    while "nextLink" in body:
        status, body, _ = await world.arm("", token, url=body["nextLink"])
        assert status == 200
        pages += 1
        seen += [v["properties"]["vmId"] for v in body["value"]]
    assert seen == [v.vm_id for v in vms]
    assert pages == 3


@pytest.mark.parametrize(
    "path",
    [
        f"/subscriptions/{SUB}/resourceGroups/rg-a/providers/Microsoft.Compute/virtualMachines/web-1",
        f"/subscriptions/{SUB}/resourcegroups/rg-a/providers/Microsoft.Compute/virtualMachines/web-1",
        f"/SUBSCRIPTIONS/{SUB}/RESOURCEGROUPS/RG-A/PROVIDERS/microsoft.compute/VIRTUALMACHINES/WEB-1",
    ],
    ids=["canonical case", "lower-case resourcegroups as in token claims", "all upper case"],
)
async def test_arm_segments_are_case_insensitive(world: World, path: str) -> None:
    status, body, headers = await world.arm(path, world.emu.token_for(world.user_vm))
    assert status == 200
    assert body["id"] == world.user_vm.resource_id
    assert body["properties"]["vmId"] == world.user_vm.vm_id
    assert body["type"] == "Microsoft.Compute/virtualMachines"
    assert body["identity"]["type"] == "UserAssigned"
    assert "x-ms-ratelimit-remaining-subscription-reads" in headers


async def test_arm_get_scale_set_instance(world: World) -> None:
    vm = world.ss_user[2]
    status, body, _ = await world.arm(
        _rg_path(SUB, "rg-a") + "/virtualMachineScaleSets/pool/virtualMachines/2",
        world.emu.token_for(vm),
    )
    assert status == 200
    assert body["instanceId"] == "2"
    assert body["properties"]["vmId"] == vm.vm_id
    assert body["id"] == vm.resource_id


async def test_arm_get_system_assigned_vm(world: World) -> None:
    vm = world.sys_vm
    status, body, _ = await world.arm(
        _rg_path(SUB, "rg-b") + "/virtualMachines/db-1", world.emu.token_for(vm)
    )
    assert status == 200
    assert body["identity"] == {
        "type": "SystemAssigned",
        "principalId": vm.principal_oid,
        "tenantId": world.tid,
    }


async def test_arm_serves_a_vms_nic_with_its_private_ip(world: World) -> None:
    vm = world.user_vm
    token = world.emu.token_for(vm)
    _, model, _ = await world.arm(_rg_path(SUB, "rg-a") + "/virtualMachines/web-1", token)
    [ref] = model["properties"]["networkProfile"]["networkInterfaces"]
    assert "/providers/Microsoft.Network/networkInterfaces/" in ref["id"]
    status, nic, _ = await world.arm(ref["id"], token, api="2024-05-01")
    assert status == 200 and nic["type"] == "Microsoft.Network/networkInterfaces"
    ips = [c["properties"]["privateIPAddress"] for c in nic["properties"]["ipConfigurations"]]
    assert ips == list(vm.private_ips) and ips[0].startswith("10.")
    assert nic["properties"]["virtualMachine"]["id"] == vm.resource_id


async def test_arm_serves_a_scale_set_instances_nic_under_2018_10_01_only(world: World) -> None:
    vm = world.ss_user[2]
    token = world.emu.token_for(vm)
    _, model, _ = await world.arm(
        _rg_path(SUB, "rg-a") + "/virtualMachineScaleSets/pool/virtualMachines/2", token
    )
    [ref] = model["properties"]["networkProfile"]["networkInterfaces"]
    assert ref["id"].startswith(vm.resource_id + "/networkInterfaces/")
    status, nic, _ = await world.arm(ref["id"], token, api="2018-10-01")
    assert status == 200
    assert nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"] == (
        vm.private_ips[0]
    )
    status, err, _ = await world.arm(ref["id"], token, api="2024-05-01")
    assert (status, err["error"]["code"]) == (400, "NoRegisteredProviderFound")


def _tampered(jwt: str) -> str:
    head, body, sig = jwt.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["oid"] = "00000000-0000-0000-0000-000000000000"
    new = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{new}.{sig}"


ARM_AUTH_CASES = [
    ("no Authorization header is 401", "none", 401, "AuthenticationFailed"),
    ("a garbage bearer is 401", "garbage", 401, "InvalidAuthenticationToken"),
    ("a tampered token is 401", "tampered", 401, "InvalidAuthenticationToken"),
    ("a token for another audience is 401", "vault", 401, "InvalidAuthenticationTokenAudience"),
    ("an expired token is 401", "expired", 401, "ExpiredAuthenticationToken"),
    ("a token of another resource group's identity is 403", "other-rg", 403, "AuthorizationFailed"),
    ("an unknown VM in a readable group is 404", "missing-vm", 404, "ResourceNotFound"),
    ("a missing api-version is 400", "no-api", 400, "MissingApiVersionParameter"),
]


@pytest.mark.parametrize(
    ("case", "status", "code"), [c[1:] for c in ARM_AUTH_CASES], ids=[c[0] for c in ARM_AUTH_CASES]
)
async def test_arm_rejections(world: World, case: str, status: int, code: str) -> None:
    path = _rg_path(SUB, "rg-a") + "/virtualMachines/web-1"
    api: str | None = API_ARM
    token: str | None = world.emu.token_for(world.user_vm)
    if case == "none":
        token = None
    elif case == "garbage":
        token = "not-a-jwt"
    elif case == "tampered":
        assert token is not None
        token = _tampered(token)
    elif case == "vault":
        token = world.emu.token_for(world.user_vm, "https://vault.azure.net")
    elif case == "expired":
        world.clock.advance(24 * 3600 + 1)
    elif case == "other-rg":
        token = world.emu.token_for(world.sys_vm)
    elif case == "missing-vm":
        path = _rg_path(SUB, "rg-a") + "/virtualMachines/nope"
    elif case == "no-api":
        api = None
    got, body, headers = await world.arm(path, token, api=api)
    assert got == status
    assert body["error"]["code"] == code
    assert "x-ms-ratelimit-remaining-subscription-reads" in headers
    assert "x-ms-ratelimit-remaining-resource" in headers
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer ")


async def test_arm_grant_read_opens_another_group(world: World) -> None:
    path = _rg_path(SUB, "rg-a") + "/virtualMachines/web-1"
    token = world.emu.token_for(world.sys_vm)
    assert (await world.arm(path, token))[0] == 403
    world.emu.grant_read(world.sys_vm.principal_oid, f"/subscriptions/{SUB}")
    assert (await world.arm(path, token))[0] == 200
    world.emu.revoke_read(world.sys_vm.principal_oid, f"/subscriptions/{SUB}")
    assert (await world.arm(path, token))[0] == 403


async def test_arm_subscription_read_bucket_throttles_with_retry_after() -> None:
    clock = FixedClock(NOW)
    limits = ArmLimits(read_burst=3, read_per_second=0.5, list_per_minute=100)
    async with AzureEmulator(latency=Latency.none(), clock=clock, arm_limits=limits) as emu:
        world = World(emu, clock, aiohttp.ClientSession())
        try:
            token = emu.token_for(world.user_vm)
            path = _rg_path(SUB, "rg-a") + "/virtualMachines/web-1"
            remaining = []
            for _ in range(3):
                status, _, headers = await world.arm(path, token)
                assert status == 200
                remaining.append(int(headers["x-ms-ratelimit-remaining-subscription-reads"]))
            assert remaining == [2, 1, 0]
            status, body, headers = await world.arm(path, token)
            assert status == 429
            assert body["error"]["code"] == "SubscriptionRequestsThrottled"
            assert headers["Retry-After"] == "2"
            # another principal has its own bucket
            assert (
                await world.arm(
                    _rg_path(SUB, "rg-b") + "/virtualMachines/db-1", emu.token_for(world.sys_vm)
                )
            )[0] == 200
            clock.advance(int(headers["Retry-After"]))
            assert (await world.arm(path, token))[0] == 200
            assert emu.counters["arm.429"] == 1
        finally:
            await world.session.close()


async def test_arm_list_budget_throttles_list_calls_only() -> None:
    clock = FixedClock(NOW)
    limits = ArmLimits(read_burst=100, read_per_second=10, list_per_minute=2)
    async with AzureEmulator(latency=Latency.none(), clock=clock, arm_limits=limits) as emu:
        world = World(emu, clock, aiohttp.ClientSession())
        try:
            token = emu.token_for(world.user_vm)
            lst = _rg_path(SUB, "rg-a") + "/virtualMachines"
            seen = []
            for _ in range(2):
                status, _, headers = await world.arm(lst, token)
                assert status == 200
                seen.append(headers["x-ms-ratelimit-remaining-resource"])
            assert seen == [
                "Microsoft.Compute/HighCostGet1Min;1",
                "Microsoft.Compute/HighCostGet1Min;0",
            ]
            status, body, headers = await world.arm(lst, token)
            assert status == 429
            assert body["error"]["code"] == "OperationNotAllowed"
            assert body["error"]["details"][0]["code"] == "TooManyRequests"
            assert int(headers["Retry-After"]) == 30
            # point reads are not list calls
            assert (await world.arm(lst + "/web-1", token))[0] == 200
        finally:
            await world.session.close()


# --------------------------------------------------------------------------- Entra ID


async def test_entra_discovery_and_keys(world: World) -> None:
    async with world.session.get(
        f"{world.emu.https_url}/{world.tid}/.well-known/openid-configuration", ssl=world.ssl
    ) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["issuer"] == f"https://sts.windows.net/{world.tid}/"
    assert doc["jwks_uri"] == f"{world.emu.https_url}/{world.tid}/discovery/keys"
    async with world.session.get(doc["jwks_uri"], ssl=world.ssl) as r:
        keys = (await r.json())["keys"]
    rsa = [k for k in keys if k["kty"] == "RSA"]
    assert [k["kty"] for k in keys].count("EC") == 1
    assert all(set(k) == {"kty", "use", "kid", "x5t", "n", "e", "x5c"} for k in rsa)
    assert all(k["kid"] == k["x5t"] for k in rsa)
    kid = _header(world.emu.token_for(world.user_vm))["kid"]
    assert kid in {k["kid"] for k in rsa}
    async with world.session.get(
        f"{world.emu.https_url}/common/discovery/keys", ssl=world.ssl
    ) as r:
        assert kid in {k["kid"] for k in (await r.json())["keys"]}
    async with world.session.get(
        f"{world.emu.https_url}/00000000-0000-0000-0000-000000000001/.well-known/openid-configuration",
        ssl=world.ssl,
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_tenant"
    assert world.emu.counters["entra.discovery"] == 2
    assert world.emu.counters["entra.jwks"] == 2


async def test_key_rotation_publishes_new_key_and_retires_old(world: World) -> None:
    old_token = world.emu.token_for(world.user_vm)
    old_kid = _header(old_token)["kid"]
    new_kid = world.emu.rotate_signing_key(world.tid)
    assert new_kid != old_kid
    new_token = world.emu.token_for(world.user_vm)
    assert _header(new_token)["kid"] == new_kid
    url = f"{world.emu.https_url}/{world.tid}/discovery/keys"
    async with world.session.get(url, ssl=world.ssl) as r:
        kids = {k["kid"] for k in (await r.json())["keys"] if k["kty"] == "RSA"}
    assert kids == {old_kid, new_kid}
    path = _rg_path(SUB, "rg-a") + "/virtualMachines/web-1"
    assert (await world.arm(path, old_token))[0] == 200
    world.emu.retire_old_keys(world.tid)
    async with world.session.get(url, ssl=world.ssl) as r:
        kids = {k["kid"] for k in (await r.json())["keys"] if k["kty"] == "RSA"}
    assert kids == {new_kid}
    assert (await world.arm(path, old_token))[0] == 401
    assert (await world.arm(path, new_token))[0] == 200


async def test_admin_rotation_endpoint(world: World) -> None:
    async with world.session.post(
        f"{world.emu.http_url}/_emulator/tenants/{world.tid}/rotate"
    ) as r:
        assert r.status == 200
        kids = (await r.json())["kids"]
    assert len(kids) == 2
    assert world.emu.signing_kids(world.tid) == tuple(kids)


# --------------------------------------------------------------------------- AIA, counters, faults


async def test_aia_serves_the_intermediate_in_der(world: World) -> None:
    from cryptography import x509

    leaf_aia = world.emu.attestation_pki.aia_url
    assert leaf_aia.startswith(world.emu.aia_prefix)
    async with world.session.get(leaf_aia) as r:
        assert r.status == 200
        der = await r.read()
    assert x509.load_der_x509_certificate(der) == x509.load_pem_x509_certificate(
        world.emu.intermediate_pem
    )
    async with world.session.get(world.emu.aia_prefix + "nope.crt") as r:
        assert r.status == 404
    assert world.emu.counters["aia"] == 2


async def test_counters_count_every_call_by_kind(world: World) -> None:
    token = world.emu.token_for(world.user_vm)
    await world.imds(world.user_vm, "attested", {"api-version": API_ATTESTED}, META)
    await world.imds(world.user_vm, "token", {"api-version": API_TOKEN, "resource": ARM}, META)
    await world.arm(_rg_path(SUB, "rg-a") + "/virtualMachines/web-1", token)
    await world.arm(_rg_path(SUB, "rg-a") + "/virtualMachines", token)
    await world.arm(_rg_path(SUB, "rg-a") + "/virtualMachineScaleSets/pool/virtualMachines", token)
    await world.arm(
        _rg_path(SUB, "rg-a") + "/virtualMachineScaleSets/pool/virtualMachines/0", token
    )
    expected = {
        "imds.attested": 1,
        "imds.token": 1,
        "arm.get_vm": 1,
        "arm.list_vms": 1,
        "arm.list_vmss_vms": 1,
        "arm.get_vmss_vm": 1,
    }
    assert world.emu.counters == expected
    async with world.session.get(f"{world.emu.http_url}/_emulator/counters") as r:
        assert await r.json() == expected
    async with world.session.delete(f"{world.emu.http_url}/_emulator/counters") as r:
        assert r.status == 200
    assert world.emu.counters == {}


FAULT_CASES = [
    (
        "an ARM 503 fault answers 503 with Retry-After once",
        "arm",
        {"status": 503, "times": 1, "retry_after": 7},
    ),
    ("an IMDS 500 fault answers 500", "imds", {"status": 500, "times": 1}),
    ("an Entra 503 fault answers 503", "entra", {"status": 503, "times": 1}),
    ("an AIA 404 fault answers 404", "aia", {"status": 404, "times": 1}),
]


def _probe(world: World, service: str) -> tuple[str, dict[str, Any]]:
    if service == "arm":
        return world.emu.https_url + _rg_path(
            SUB, "rg-a"
        ) + f"/virtualMachines/web-1?api-version={API_ARM}", {
            "headers": {"Authorization": "Bearer " + world.emu.token_for(world.user_vm)},
            "ssl": world.ssl,
        }
    if service == "imds":
        return world.user_vm.imds_url + f"/metadata/attested/document?api-version={API_ATTESTED}", {
            "headers": META
        }
    if service == "entra":
        return f"{world.emu.https_url}/{world.tid}/discovery/keys", {"ssl": world.ssl}
    return world.emu.attestation_pki.aia_url, {}


@pytest.mark.parametrize(
    ("service", "fault"), [c[1:] for c in FAULT_CASES], ids=[c[0] for c in FAULT_CASES]
)
@pytest.mark.parametrize("via", ["python", "admin-http"])
async def test_status_faults(world: World, service: str, fault: dict[str, Any], via: str) -> None:
    if via == "python":
        world.emu.set_fault(service, **fault)  # type: ignore[arg-type]
    else:
        async with world.session.post(
            f"{world.emu.http_url}/_emulator/faults", json={"service": service, **fault}
        ) as r:
            assert r.status == 200
            assert service in await r.json()
    url, kw = _probe(world, service)
    async with world.session.get(url, **kw) as r:
        assert r.status == fault["status"]
        if "retry_after" in fault:
            assert r.headers["Retry-After"] == str(fault["retry_after"])
    async with world.session.get(url, **kw) as r:
        assert r.status == 200, "the fault was set for one request only"
    assert world.emu.counters[f"{service}.fault"] == 1


async def test_drop_fault_closes_the_connection(world: World) -> None:
    world.emu.set_fault("arm", drop=True)
    url, kw = _probe(world, "arm")
    with pytest.raises(aiohttp.ClientError):
        async with world.session.get(url, **kw) as r:
            await r.read()
    world.emu.clear_fault("arm")
    async with world.session.get(url, **kw) as r:
        assert r.status == 200


async def test_hang_fault_makes_the_client_time_out(world: World) -> None:
    async with world.session.post(
        f"{world.emu.http_url}/_emulator/faults", json={"service": "entra", "hang": True}
    ) as r:
        assert r.status == 200
    url, kw = _probe(world, "entra")
    with pytest.raises(asyncio.TimeoutError):
        async with world.session.get(url, timeout=aiohttp.ClientTimeout(total=0.3), **kw) as r:
            await r.read()
    async with world.session.delete(f"{world.emu.http_url}/_emulator/faults") as r:
        assert r.status == 200
    assert world.emu.faults == {}


@pytest.mark.parametrize(
    "body",
    [
        {"service": "dns", "status": 500},
        {"service": "arm"},
        {"service": "arm", "status": 200},
        {"service": "arm", "status": "x"},
    ],
    ids=[
        "an unknown service is refused",
        "a fault with no kind is refused",
        "a 2xx fault is refused",
        "a non-integer status is refused",
    ],
)
async def test_admin_fault_endpoint_validates(world: World, body: dict[str, Any]) -> None:
    async with world.session.post(f"{world.emu.http_url}/_emulator/faults", json=body) as r:
        assert r.status == 400
    assert world.emu.faults == {}


async def test_latency_is_added_per_service(world: World) -> None:
    world.emu.set_latency(entra=0.2)
    url, kw = _probe(world, "entra")
    t0 = time.perf_counter()
    async with world.session.get(url, **kw) as r:
        assert r.status == 200
    assert time.perf_counter() - t0 >= 0.2
    async with world.session.post(
        f"{world.emu.http_url}/_emulator/latency", json={"entra": 0}
    ) as r:
        assert (await r.json())["entra"] == 0
    assert world.emu.latency.entra == 0


# --------------------------------------------------------------------------- world building


async def test_build_fleet_spreads_vms() -> None:
    async with AzureEmulator(latency=Latency.none()) as emu:
        fleet = build_fleet(
            emu,
            vms=50,
            subscriptions=2,
            resource_groups=4,
            scale_set_fraction=0.4,
            scale_set_capacity=7,
        )
        assert len(fleet.vms) == 50
        assert sum(1 for v in fleet.vms if v.scale_set) == 20
        assert {v.subscription for v in fleet.vms} == set(fleet.subscriptions)
        assert len({(v.subscription, v.resource_group) for v in fleet.vms}) == 4
        assert len({v.name for v in fleet.vms}) == 50
        # one user-assigned identity per resource group
        per_rg: dict[tuple[str, str], set[str | None]] = {
            (v.subscription, v.resource_group): set() for v in fleet.vms
        }
        for v in fleet.vms:
            per_rg[(v.subscription, v.resource_group)].add(v.client_id)
        assert all(len(ids) == 1 for ids in per_rg.values())
        again = AzureEmulator(latency=Latency.none())
        async with again:
            assert build_fleet(again, vms=1, subscriptions=2).subscriptions == fleet.subscriptions


@pytest.mark.parametrize(
    "spec",
    [
        {"vms": [{"name": "a"}]},
        {
            "vms": [
                {
                    "name": "a",
                    "subscription": SUB,
                    "resource_group": "r",
                    "tenant": SUB,
                    "identity": "user",
                    "color": "red",
                }
            ]
        },
        {"generate": {"vms": 1, "planets": 3}},
        {
            "scale_sets": [
                {
                    "name": "s",
                    "subscription": SUB,
                    "resource_group": "r",
                    "tenant": SUB,
                    "identity": "robot",
                    "capacity": 1,
                }
            ]
        },
        ["not", "a", "mapping"],
    ],
    ids=[
        "a VM without its required keys is refused",
        "a VM with an unknown key is refused",
        "an unknown generate option is refused",
        "an unknown identity kind is refused",
        "a fleet that is not a mapping is refused",
    ],
)
async def test_fleet_spec_errors(spec: object) -> None:
    async with AzureEmulator(latency=Latency.none()) as emu:
        with pytest.raises(ValueError):
            apply_fleet_spec(emu, spec)


async def test_fleet_spec_builds_named_vms() -> None:
    spec = {
        "vms": [
            {
                "name": "a",
                "subscription": SUB,
                "resource_group": "r",
                "tenant": SUB2,
                "identity": "system",
            }
        ],
        "scale_sets": [
            {
                "name": "s",
                "subscription": SUB,
                "resource_group": "r",
                "tenant": SUB2,
                "identity": "user",
                "capacity": 2,
            }
        ],
    }
    async with AzureEmulator(latency=Latency.none()) as emu:
        fleet = apply_fleet_spec(emu, spec)
        assert [v.name for v in fleet.vms] == ["a", "s_0", "s_1"]
        assert fleet.tenants == (SUB2,)
        assert emu.info()["vms"][1]["scale_set"] == "s"


async def test_v2_discovery_has_its_own_issuer(world: World) -> None:
    url = f"{world.emu.https_url}/{world.tid}/v2.0/.well-known/openid-configuration"
    async with world.session.get(url, ssl=world.ssl) as r:
        doc = await r.json()
    assert doc["issuer"] == f"{world.emu.https_url}/{world.tid}/v2.0"
    async with world.session.get(doc["jwks_uri"], ssl=world.ssl) as r:
        assert r.status == 200
        kids = {k["kid"] for k in (await r.json())["keys"]}
    assert _header(world.emu.token_for(world.user_vm))["kid"] in kids


async def test_state_dir_keeps_the_trust_anchors_across_restarts(tmp_path: Any) -> None:
    first = AzureEmulator(latency=Latency.none(), state_dir=tmp_path)
    async with first:
        root, tls_ca = first.attestation_root_pem, first.tls_ca_pem
        leaf1 = first.attestation_pki.leaf_cert
    assert (tmp_path / "attestation-root.key").stat().st_mode & 0o077 == 0
    second = AzureEmulator(latency=Latency.none(), state_dir=tmp_path)
    async with second:
        assert second.attestation_root_pem == root
        assert second.tls_ca_pem == tls_ca
        leaf2 = second.attestation_pki.leaf_cert
        assert leaf2.serial_number != leaf1.serial_number
        assert leaf2.issuer == leaf1.issuer
    fresh = AzureEmulator(latency=Latency.none())
    async with fresh:
        assert fresh.attestation_root_pem != root


def test_the_emulator_never_imports_the_gateway_verifier() -> None:
    """DESIGN §9: a verifier bug must not be cancelled out by the same bug in the emulator."""
    import ast
    from pathlib import Path

    import gateway.dev.emulator

    forbidden = ("gateway.azure", "gateway.join", "gateway.http", "gateway.agent")
    package = Path(gateway.dev.emulator.__file__).parent
    offenders = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{source.name}: {n}" for n in names if n.startswith(forbidden)]
    assert offenders == []
    assert len(list(package.glob("*.py"))) >= 8


async def test_signing_threads_serve_concurrent_joins() -> None:
    async with (
        AzureEmulator(latency=Latency.none(), signing_threads=2) as emu,
        aiohttp.ClientSession() as session,
    ):
        fleet = build_fleet(emu, vms=20, resource_groups=2)

        async def join(vm: EmulatedVm) -> tuple[int, int]:
            async with session.get(
                vm.imds_url + "/metadata/attested/document",
                params={"api-version": API_ATTESTED, "nonce": vm.name},
                headers=META,
            ) as r:
                doc_status = r.status
            async with session.get(
                vm.imds_url + "/metadata/identity/oauth2/token",
                params={"api-version": API_TOKEN, "resource": ARM, "client_id": "bad"},
                headers=META,
            ) as r:
                bad_status = r.status
            return doc_status, bad_status

        results = await asyncio.gather(*(join(vm) for vm in fleet.vms))
        assert set(results) == {(200, 400)}
        assert emu.counters["imds.400"] == 20
