"""Hostile corpus: Azure names that Python's case folding merges and Azure does not.

Resource Manager compares names ASCII-case-insensitively and exactly otherwise: a
resource group ``\\u212aube`` (KELVIN SIGN) is a group of its own beside ``kube``. A
gateway that compared with ``casefold()`` admitted it (and ``straße``) under a rule for
``kube`` (``strasse``). Each case is a real VM of the emulator — which keeps such groups
apart as Resource Manager does — joining over HTTPS with its own evidence; a rule names
the ASCII look-alike. The gateway must refuse with ``not_allowed`` and keep serving.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from gateway.agent.keys import NodeKeys, load_or_create_keys
from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

SUB = "11111111-1111-1111-1111-111111111111"
RULE_GROUPS = ("kube", "strasse", "prod-east", "infra", "web")
TOKENS = azure_token_yaml(SUB, resource_groups=RULE_GROUPS)

# (id, the VM's resource group, expected status, expected code)
CASES: list[tuple[str, str, int, str | None]] = [
    ("the rule's own group joins", "kube", 200, None),
    ("the rule's group in other ASCII case joins", "KUBE", 200, None),
    ("a Kelvin sign for k is another group", "\u212aube", 403, "not_allowed"),
    ("a sharp s for ss is another group", "stra\u00dfe", 403, "not_allowed"),
    ("a long s for s is another group", "prod-ea\u017ft", 403, "not_allowed"),
    ("a dotless i for i is another group", "\u0131nfra", 403, "not_allowed"),
    ("a capital I with a dot for i is another group", "\u0130nfra", 403, "not_allowed"),
    ("fullwidth letters are another group", "\uff57\uff45\uff42", 403, "not_allowed"),
]


class Names:
    def __init__(self, stack: DevStack, session: aiohttp.ClientSession, keys: NodeKeys) -> None:
        self.stack = stack
        self.session = session
        self.keys = keys
        self.tenant = stack.emulator.add_tenant()
        self.vms: dict[str, EmulatedVm] = {}

    def vm(self, group: str) -> EmulatedVm:
        if group not in self.vms:
            self.vms[group] = self.stack.emulator.add_vm(
                subscription=SUB,
                resource_group=group,
                name=f"vm-{len(self.vms)}",
                tenant=self.tenant,
                identity="user",
            )
        return self.vms[group]

    async def join(self, vm: EmulatedVm) -> tuple[int, str | None]:
        url = self.stack.gateway_url
        async with self.session.post(f"{url}/v1/join/azure/challenge", json={}) as resp:
            challenge = (await resp.json())["challenge"]
        emu = self.stack.emulator
        body = {
            "token_name": "azure-token",
            "challenge": challenge,
            "attested_data": emu.attested_document_for(vm, nonce=challenge),
            "access_token": emu.token_for(vm),
            "host": {
                "node_name": vm.name,
                "role": "Node",
                "public_ssh_key": self.keys.public_ssh_key,
                "public_tls_key": self.keys.public_tls_key,
            },
        }
        headers = {"Content-Type": "application/json"}
        join_url = f"{url}/v1/join/azure"
        async with self.session.post(join_url, data=json.dumps(body), headers=headers) as resp:
            text = await resp.text()
            if resp.status == 200:
                return 200, None
            return resp.status, json.loads(text)["error"]["code"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def names(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Names]:
    workdir: Path = tmp_path_factory.mktemp("names")
    async with dev_stack(workdir / "stack", tokens_yaml=TOKENS) as st:
        trust = ssl.create_default_context(cafile=str(st.gateway_ca_file))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=trust), timeout=aiohttp.ClientTimeout(total=20)
        ) as session:
            yield Names(st, session, load_or_create_keys(workdir / "agent-keys"))


@pytest.mark.parametrize(
    ("group", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_names_compare_as_azure_compares_them(
    names: Names, group: str, status: int, code: str | None
) -> None:
    vm = names.vm(group)
    assert vm.resource_group == group
    assert await names.join(vm) == (status, code)
    challenge_url = f"{names.stack.gateway_url}/v1/join/azure/challenge"
    async with names.session.post(challenge_url, json={}) as r:
        assert r.status == 200, "the gateway still serves"


async def test_the_emulator_keeps_a_kelvin_sign_group_apart_from_its_look_alike(
    names: Names,
) -> None:
    """Resource Manager's behaviour, as the emulator must model it: listing ``kube`` does
    not return the VM of ``\\u212aube`` (the emulator once grouped with ``str.lower()``)."""
    kube, kelvin = names.vm("kube"), names.vm("\u212aube")
    emu = names.stack.emulator
    token = emu.token_for(kube)
    group = f"/subscriptions/{SUB}/resourceGroups/kube"
    listing = f"{group}/providers/Microsoft.Compute/virtualMachines"
    ctx = emu.client_ssl_context()
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{emu.https_url}{listing}?api-version=2024-07-01",
            headers={"Authorization": f"Bearer {token}"},
            ssl=ctx,
        ) as resp,
    ):
        assert resp.status == 200
        ids = [vm["properties"]["vmId"] for vm in (await resp.json())["value"]]
    assert kube.vm_id in ids and kelvin.vm_id not in ids
