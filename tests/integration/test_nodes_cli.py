"""The inventory and locks from the command line: ``join-gateway nodes`` over the admin API.

The whole system on loopback (emulator, auth service, gateway over real TLS); VMs join over
HTTPS; ``join-gateway nodes --data-dir D`` (a process, as an operator runs it on the auth
service's host) lists them, locks them by host, vmId, subscription and token — each lock
refuses the VM's next join with ``403 host_locked`` at the gateway — and unlocks, removes
and prunes. The admin API takes only the admin certificate; the admin certificate cannot
register nodes.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.authservice.authority import AuthPaths
from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.joins import post_join
from tests.support.nodes_cli import run_nodes
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

SUB = "11111111-1111-1111-1111-111111111111"
OTHER_SUB = "22222222-2222-2222-2222-222222222222"
TOKENS = azure_token_yaml(SUB, name="fleet") + "---\n" + azure_token_yaml(OTHER_SUB, name="other")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    async with dev_stack(tmp_path_factory.mktemp("nodes"), tokens_yaml=TOKENS) as st:
        yield st


@pytest.fixture(scope="module")
def tenant(stack: DevStack) -> str:
    return stack.emulator.add_tenant()


def new_vm(stack: DevStack, tenant: str, name: str, sub: str = SUB) -> EmulatedVm:
    # A resource group per VM: a VM created after its group was listed would wait for the
    # gateway's next listing (503 azure_budget_exhausted, retryable) — not this test's subject.
    return stack.emulator.add_vm(
        subscription=sub, resource_group=f"rg-{name}", name=name, tenant=tenant, identity="system"
    )


async def join(
    stack: DevStack, vm: EmulatedVm, keys: Path, token: str = "fleet"
) -> tuple[int, dict[str, Any]]:
    return await post_join(stack, vm, keys, token=token)


nodes = run_nodes


async def ls(stack: DevStack) -> dict[str, dict[str, Any]]:
    code, out, err = await nodes(stack, "ls", "--json")
    assert code == 0, err
    return {n["vm_id"]: n for n in json.loads(out)}


async def test_ls_shows_every_joined_vm_with_its_azure_identity(
    stack: DevStack, tenant: str, tmp_path: Path
) -> None:
    vm = new_vm(stack, tenant, "inv-1")
    status, body = await join(stack, vm, tmp_path)
    assert status == 200
    row = (await ls(stack))[vm.vm_id]
    assert row["host_id"] == body["host_id"]
    assert (row["tenant"], row["subscription"], row["resource_group"], row["vm_name"]) == (
        tenant,
        SUB,
        "rg-inv-1",
        "inv-1",
    )
    assert row["first_joined"] and row["last_renewed"] and row["cert_expiry"]
    assert row["locked"] is False
    code, out, _ = await nodes(stack, "ls")
    assert code == 0 and "HOST ID" in out and body["host_id"] in out and "locked" in out
    code, out, _ = await nodes(stack, "show", body["host_id"])
    assert code == 0 and json.loads(out)["vm_id"] == vm.vm_id


@pytest.mark.parametrize(
    "target",
    ["host", "vm_id", "subscription", "token"],
    ids=[
        "a lock on the host",
        "a lock on the vmId",
        "a lock on the subscription",
        "a lock on the token",
    ],
)
async def test_each_kind_of_lock_refuses_and_unlock_restores(
    stack: DevStack, tenant: str, tmp_path: Path, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway.audit")
    sub = OTHER_SUB if target in ("subscription", "token") else SUB
    token = "other" if sub == OTHER_SUB else "fleet"
    vm = new_vm(stack, tenant, f"lock-{target}", sub)
    status, first = await join(stack, vm, tmp_path, token)
    assert status == 200
    how = {
        "host": [first["host_id"]],
        "vm_id": ["--vm-id", vm.vm_id],
        "subscription": ["--subscription", OTHER_SUB],
        "token": ["--token", "other"],
    }[target]
    code, out, err = await nodes(stack, "lock", *how, "--reason", f"incident {target}")
    assert code == 0, err
    lock_id = out.split()[1].rstrip(":")
    assert (await ls(stack))[vm.vm_id]["locked"] is True

    status, refused = await join(stack, vm, tmp_path, token)
    assert (status, refused["error"]["code"]) == (403, "host_locked")
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert audit[-1]["code"] == "host_locked" and f"incident {target}" in audit[-1]["detail"]
    counted = stack.gateway.metrics.registry.get_sample_value(
        "join_gateway_joins_total", {"outcome": "rejected", "code": "host_locked"}
    )
    assert counted is not None and counted >= 1

    code, out, _ = await nodes(stack, "locks")
    assert lock_id in out and f"incident {target}" in out
    assert (await nodes(stack, "unlock", lock_id))[0] == 0
    status, again = await join(stack, vm, tmp_path, token)
    assert status == 200 and again["host_id"] == first["host_id"]  # the same host, renewed


async def test_a_lock_with_a_ttl_expires(stack: DevStack, tenant: str, tmp_path: Path) -> None:
    vm = new_vm(stack, tenant, "ttl-1")
    assert (await join(stack, vm, tmp_path))[0] == 200
    code, _, err = await nodes(
        stack, "lock", "--vm-id", vm.vm_id, "--reason", "brief", "--ttl", "1s"
    )
    assert code == 0, err
    assert (await join(stack, vm, tmp_path))[0] == 403
    await asyncio.sleep(1.2)
    assert (await join(stack, vm, tmp_path))[0] == 200


async def test_rm_makes_the_next_join_a_new_host_and_prune_removes_stale_ones(
    stack: DevStack, tenant: str, tmp_path: Path
) -> None:
    vm = new_vm(stack, tenant, "rm-1")
    _, first = await join(stack, vm, tmp_path)
    assert (await nodes(stack, "rm", first["host_id"]))[0] == 0
    assert vm.vm_id not in await ls(stack)
    _, second = await join(stack, vm, tmp_path)
    assert second["host_id"] != first["host_id"]
    assert (await nodes(stack, "rm", first["host_id"]))[0] == 1  # already gone

    # Margins: rm-1 is 5 s old, fresh-1 only as old as the CLI runs since it joined (each
    # a Python start, well under the 3 s threshold even on a loaded machine).
    await asyncio.sleep(5)
    fresh = new_vm(stack, tenant, "fresh-1")
    assert (await join(stack, fresh, tmp_path))[0] == 200
    code, out, _ = await nodes(stack, "ls", "--stale", "3s", "--json")
    stale = {n["vm_id"] for n in json.loads(out)}
    assert vm.vm_id in stale and fresh.vm_id not in stale
    code, out, _ = await nodes(stack, "prune", "--stale", "3s")
    assert code == 0 and second["host_id"] in out
    inventory = await ls(stack)
    assert vm.vm_id not in inventory and fresh.vm_id in inventory


async def test_the_admin_api_takes_only_the_admin_certificate(stack: DevStack) -> None:
    assert stack.auth.paths is not None
    paths: AuthPaths = stack.auth.paths

    def ctx(cert: Path, key: Path) -> ssl.SSLContext:
        c = ssl.create_default_context(cafile=str(paths.cluster_ca))
        c.load_cert_chain(str(cert), str(key))
        return c

    gateway_ctx = ctx(paths.gateway_client_cert, paths.gateway_client_key)
    admin_ctx = ctx(paths.admin_cert, paths.admin_key)
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.auth.url + "/v1/admin/nodes", ssl=gateway_ctx) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (403, "forbidden")
        async with s.post(stack.auth.url + "/v1/register", json={}, ssl=admin_ctx) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (403, "forbidden")
        async with s.get(stack.auth.url + "/v1/admin/nodes", ssl=admin_ctx) as r:
            assert r.status == 200
        # A label filter is KEY=VALUE (the CLI checks it too, before asking).
        async with s.get(
            stack.auth.url + "/v1/admin/nodes", params={"label": "azure/location"}, ssl=admin_ctx
        ) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_request")


async def test_an_admin_body_sent_in_pieces_is_read_whole(stack: DevStack) -> None:
    """A lock whose JSON body arrives in several reads (here: three chunks a moment apart)
    is read to its end; reading only what had arrived answered 400 malformed_body."""
    assert stack.auth.paths is not None
    paths: AuthPaths = stack.auth.paths
    admin_ctx = ssl.create_default_context(cafile=str(paths.cluster_ca))
    admin_ctx.load_cert_chain(str(paths.admin_cert), str(paths.admin_key))
    body = json.dumps(
        {"target": "vm_id", "value": "in-pieces", "reason": "a body sent in pieces"}
    ).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 20):
            yield body[at : at + 20]
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as s:
        async with s.post(
            stack.auth.url + "/v1/admin/locks",
            data=pieces(),
            headers={"Content-Type": "application/json"},
            ssl=admin_ctx,
        ) as r:
            assert r.status in (200, 201), await r.text()
        async with s.get(stack.auth.url + "/v1/admin/locks", ssl=admin_ctx) as r:
            locks = (await r.json())["locks"]
    assert any(lk.get("value") == "in-pieces" for lk in locks), locks


@pytest.mark.parametrize(
    "args",
    [["lock", "--vm-id", "x"], ["prune"], ["ls", "--stale", "soon"], ["ls", "--label", "env"]],
    ids=[
        "a lock without a reason",
        "prune without --stale",
        "a duration that is not one",
        "a label filter that is not KEY=VALUE",
    ],
)
async def test_usage_errors_are_exit_2(stack: DevStack, args: list[str]) -> None:
    assert (await nodes(stack, *args))[0] == 2
