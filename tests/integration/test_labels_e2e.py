"""Node labels end to end: emulator, auth service and gateway over real TLS.

A tagged VM joins over HTTPS with a token listing two of its tags; the labels (verified
attributes and those tags, no other) reach the auth service, which keeps them with the
host: ``join-gateway nodes ls`` (a process, as an operator runs it) shows and filters
them, and both audit lines — the gateway's record and the auth service's — carry them.
A uniform scale set's instance gets its set and instance ID. After a tag change, the VM's
next join (a renewal, once the gateway's cached VM record expired) replaces the host's
labels. A join request cannot bring
labels of its own: the join API has no such field, and an unknown field is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.core.config import Config
from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.joins import join_body, post_join, post_join_body
from tests.support.nodes_cli import run_nodes
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

SUB = "11111111-1111-1111-1111-111111111111"
# The gateway's VM record cache: a tag change reaches the labels once it expires.
VM_TTL = 0.5
TOKENS = azure_token_yaml(SUB, name="labelled") + "    labels_from_tags: [env, Team]\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    def short_vm_cache(config: Config) -> Config:
        return dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, vm_ttl_seconds=VM_TTL)
        )

    async with dev_stack(
        tmp_path_factory.mktemp("labels"), tokens_yaml=TOKENS, adjust=short_vm_cache
    ) as st:
        yield st


@pytest.fixture(scope="module")
def tenant(stack: DevStack) -> str:
    return stack.emulator.add_tenant()


nodes = run_nodes


def new_vm(stack: DevStack, tenant: str, name: str, **kw: Any) -> EmulatedVm:
    # A resource group per VM: Resource Manager is read VM by VM (no group listing to wait
    # for), so each join is decided on its own VM's record.
    return stack.emulator.add_vm(
        subscription=SUB,
        resource_group=f"rg-{name}",
        name=name,
        tenant=tenant,
        identity="system",
        **kw,
    )


async def ls_json(stack: DevStack, *args: str) -> dict[str, dict[str, Any]]:
    code, out, err = await nodes(stack, "ls", "--json", *args)
    assert code == 0, err
    return {n["vm_id"]: n for n in json.loads(out)}


async def test_a_tagged_vm_joins_with_its_labels_in_the_inventory_and_both_audit_lines(
    stack: DevStack, tenant: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway.audit")
    caplog.set_level("INFO", logger="gateway.authservice.app")
    vm = new_vm(
        stack,
        tenant,
        "tagged-1",
        location="northeurope",
        tags={"ENV": "prod", "team": "infra", "not-listed": "secret-ish"},
    )
    status, body = await post_join(stack, vm, tmp_path, token="labelled")
    assert status == 200, body
    expected = {
        "azure/tenant": tenant,
        "azure/subscription": SUB,
        "azure/resource_group": "rg-tagged-1",
        "azure/vm_id": vm.vm_id,
        "azure/vm_name": "tagged-1",
        "azure/location": "northeurope",
        # Tag names compare as Azure does; the key is the token's spelling.
        "azure/tag/env": "prod",
        "azure/tag/Team": "infra",
    }

    row = (await ls_json(stack))[vm.vm_id]
    assert row["host_id"] == body["host_id"]
    assert row["labels"] == expected

    code, out, err = await nodes(stack, "ls", "--labels")
    assert code == 0, err
    [line] = [ln for ln in out.splitlines() if body["host_id"] in ln]
    assert "azure/tag/env=prod" in line and "azure/location=northeurope" in line
    assert "not-listed" not in out and "secret-ish" not in out
    assert "LABELS" in out.splitlines()[0] and "host(s)" in out.splitlines()[-1]

    assert set(await ls_json(stack, "--label", "azure/tag/Team=infra")) == {vm.vm_id}
    assert await ls_json(stack, "--label", "azure/tag/env=dev") == {}
    assert await ls_json(stack, "--label", "azure/tag/env=prod", "--label", "azure/vm_name=x") == {}

    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert audit[-1]["outcome"] == "joined" and audit[-1]["labels"] == expected
    [auth_line] = [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.authservice.app" and body["host_id"] in r.getMessage()
    ]
    assert auth_line.startswith("registered host")
    assert "labels=" + json.dumps(expected, sort_keys=True, separators=(",", ":")) in auth_line


async def test_a_uniform_scale_set_instance_is_labelled_with_its_set_and_instance(
    stack: DevStack, tenant: str, tmp_path: Path
) -> None:
    _, vm = stack.emulator.add_scale_set(
        subscription=SUB,
        resource_group="pool",
        name="pool-u",
        tenant=tenant,
        capacity=2,
        identity="user",
    )
    status, _ = await post_join(stack, vm, tmp_path, token="labelled")
    assert status == 200
    labels = (await ls_json(stack))[vm.vm_id]["labels"]
    assert (labels["azure/scale_set"], labels["azure/instance_id"]) == ("pool-u", vm.instance_id)
    assert labels["azure/vm_name"] == vm.name
    assert not any(k.startswith("azure/tag/") for k in labels)


async def test_a_renewal_after_a_tag_change_updates_the_labels(
    stack: DevStack, tenant: str, tmp_path: Path
) -> None:
    vm = new_vm(stack, tenant, "renew-1", tags={"env": "dev", "team": "a"})
    status, first = await post_join(stack, vm, tmp_path, token="labelled")
    assert status == 200
    labels = (await ls_json(stack))[vm.vm_id]["labels"]
    assert (labels["azure/tag/env"], labels["azure/tag/Team"]) == ("dev", "a")

    stack.emulator.set_tags("renew-1", {"env": "prod"})  # env changed, team removed
    await asyncio.sleep(VM_TTL * 2)  # the gateway's cached VM record expires
    status, second = await post_join(stack, vm, tmp_path, token="labelled")
    assert status == 200 and second["host_id"] == first["host_id"]
    labels = (await ls_json(stack))[vm.vm_id]["labels"]
    assert labels["azure/tag/env"] == "prod" and "azure/tag/Team" not in labels


@pytest.mark.parametrize(
    "where",
    ["body", "host"],
    ids=["labels beside the evidence are refused", "labels in the host block are refused"],
)
async def test_a_join_request_cannot_bring_its_own_labels(
    stack: DevStack, tenant: str, tmp_path: Path, where: str
) -> None:
    vm = new_vm(stack, tenant, f"inject-{where}")
    body = join_body(stack, vm, tmp_path, token="labelled")
    forged = {"labels": {"azure/tag/env": "prod", "azure/location": "westeurope"}}
    (body if where == "body" else body["host"]).update(forged)
    status, data = await post_join_body(stack, body)
    assert (status, data["error"]["code"]) == (400, "invalid_request")
    assert "labels" in data["error"]["message"]
    assert vm.vm_id not in await ls_json(stack)
