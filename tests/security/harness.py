"""The hostile-input corpus's harness: one real gateway over HTTPS, and valid evidence to
mutate.

Every corpus module starts the dev stack once (emulator + auth service + gateway on
loopback, ``gateway.dev.devstack.dev_stack``) and drives it with an aiohttp client that trusts
only the stack's CA. Cases start from a *valid* join body — a challenge the gateway issued,
the emulator's attested document for that nonce, the emulator's managed-identity token,
agent-shaped keys — and change one thing. After each case the same process must still
issue a challenge: a hostile input may be refused, never crash or wedge the gateway.

The emulator keeps its attestation CAs in a state directory, so forged documents can be
issued by the *trusted* intermediate (wrong name, expired leaf) as well as by untrusted
chains; forged tokens are signed with the emulator's Entra keys.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.agent.keys import NodeKeys, load_or_create_keys
from gateway.core.config import Config
from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import AzureEmulator, EmulatedVm, Latency
from gateway.dev.emulator.pki import AttestationCas
from tests.support.cms_forge import Issued, azure_content
from tests.support.tokens import refusal_tokens_yaml

__all__ = [
    "S1",
    "S3",
    "TOKENS",
    "Body",
    "Builder",
    "Harness",
    "open_harness",
]

S1 = "11111111-1111-1111-1111-111111111111"  # allowed, any resource group
S3 = "55555555-5555-5555-5555-555555555555"  # no rule allows it

TOKENS = f"""
kind: token
version: v2
metadata:
  name: azure-token
spec:
  roles: [Node]
  join_method: azure
  azure:
    # What the joining VM's body asks for: its host name and its own NIC address.
    host_names: ["{{vm_name}}.internal"]
    host_ips: nic
    allow:
      - subscription: {S1}
---
""" + refusal_tokens_yaml(S1)

Body = dict[str, Any]
# A case builds what is POSTed: a body dict (JSON-encoded by the harness) or raw bytes.
Builder = Callable[["Harness"], Awaitable[Body | bytes]]


def _pem_to_der(pem: bytes) -> bytes:
    lines = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    return base64.b64decode("".join(lines))


@dataclass
class Harness:
    stack: DevStack
    session: aiohttp.ClientSession
    keys: NodeKeys
    cas: AttestationCas
    vm: EmulatedVm  # user-assigned identity, subscription S1: joins
    neighbour: EmulatedVm  # same resource group as vm
    system_vm: EmulatedVm  # system-assigned identity, S1
    other_sub_vm: EmulatedVm  # subscription S3: no allow rule
    other_tenant: str  # a second tenant the emulator serves

    # ------------------------------------------------------------------ evidence

    @property
    def emulator(self) -> AzureEmulator:
        return self.stack.emulator

    @property
    def url(self) -> str:
        return self.stack.gateway_url

    @property
    def leaf(self) -> Issued:
        """The emulator's trusted signing leaf, as the CMS forger wants it."""
        pki = self.emulator.attestation_pki
        return Issued(pki.leaf_key, pki.leaf_cert)

    @property
    def intermediate(self) -> Issued:
        """The emulator's trusted intermediate CA (with its key, from the state dir)."""
        return Issued(self.cas.intermediate_key, self.cas.intermediate_cert)

    def tenant_key(self, tid: str | None = None) -> tuple[str, rsa.RSAPrivateKey]:
        """(kid, private key) of the tenant's current Entra signer. Test-only access to the
        emulator's internals: there is no public way to mint a token with custom claims."""
        tenant = self.emulator._tenant(tid or self.vm.tenant)
        return tenant.signer.kid, tenant.signer.key

    def content(self, nonce: str, *, vm: EmulatedVm | None = None, **kwargs: Any) -> bytes:
        """Azure-shaped document content for ``vm`` (default: the joining VM), created now."""
        vm = vm or self.vm
        kwargs.setdefault("created_on", datetime.now(UTC) - timedelta(seconds=5))
        return azure_content(nonce=nonce, vm_id=vm.vm_id, subscription_id=vm.subscription, **kwargs)

    def token(self, vm: EmulatedVm | None = None) -> str:
        return self.emulator.token_for(vm or self.vm)

    def body(
        self,
        challenge: str,
        *,
        vm: EmulatedVm | None = None,
        signature: str | None = None,
        token: str | None = None,
    ) -> Body:
        vm = vm or self.vm
        if signature is None:
            signature = self.emulator.attested_document_for(vm, nonce=challenge)["signature"]
        return {
            "token_name": "azure-token",
            "challenge": challenge,
            "attested_data": {"encoding": "pkcs7", "signature": signature},
            "intermediates": [
                base64.b64encode(_pem_to_der(self.emulator.intermediate_pem)).decode()
            ],
            "access_token": token if token is not None else self.token(vm),
            "host": {
                "node_name": vm.name,
                "role": "Node",
                "public_ssh_key": self.keys.public_ssh_key,
                "public_tls_key": self.keys.public_tls_key,
                "additional_principals": list(vm.private_ips),
                "dns_names": [f"{vm.name}.internal"],
            },
        }

    # ------------------------------------------------------------------ HTTP

    async def challenge(self) -> str:
        async with self.session.post(f"{self.url}/v1/join/azure/challenge", json={}) as resp:
            assert resp.status == 200, await resp.text()
            value = (await resp.json())["challenge"]
            assert isinstance(value, str) and len(value) == 32
            return value

    async def post(
        self, path: str, data: bytes, *, headers: dict[str, str] | None = None
    ) -> tuple[int, str | None]:
        """POST raw bytes; returns (status, error code or None)."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.post(f"{self.url}{path}", data=data, headers=hdrs) as resp:
            text = await resp.text()
            return resp.status, _error_code(resp.status, text)

    async def join(self, body: Body | bytes) -> tuple[int, str | None]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.post("/v1/join/azure", data)

    async def assert_alive(self) -> None:
        """The same gateway process still serves: a fresh challenge is issued."""
        await self.challenge()


def _error_code(status: int, text: str) -> str | None:
    if status == 200:
        return None
    try:
        doc = json.loads(text)
        code = doc["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"<not our error shape: {text[:80]!r}>"
    return str(code)


def client_ssl(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    return ctx


def _short_body_timeout(config: Config) -> Config:
    """A body read deadline short enough for the slow-drip case to see it within its run."""
    return dataclasses.replace(
        config,
        limits=dataclasses.replace(
            config.limits, body_read_timeout_seconds=2.0, header_read_timeout_seconds=2.0
        ),
    )


@asynccontextmanager
async def open_harness(
    workdir: Path, *, adjust: Callable[[Config], Config] | None = None
) -> AsyncIterator[Harness]:
    """``adjust``: a corpus module's own limits, applied after the short timeouts."""
    state = workdir / "emulator-state"

    def configure(config: Config) -> Config:
        config = _short_body_timeout(config)
        return config if adjust is None else adjust(config)

    async with (
        AzureEmulator(latency=Latency.none(), state_dir=state) as emu,
        dev_stack(workdir / "stack", tokens_yaml=TOKENS, emulator=emu, adjust=configure) as st,
    ):
        cas = AttestationCas.load(state)
        assert cas is not None
        t1 = emu.add_tenant()
        t2 = emu.add_tenant()
        vm = emu.add_vm(
            subscription=S1, resource_group="rg-a", name="vm-a", tenant=t1, identity="user"
        )
        neighbour = emu.add_vm(
            subscription=S1, resource_group="rg-a", name="vm-b", tenant=t1, identity="user"
        )
        system_vm = emu.add_vm(
            subscription=S1, resource_group="rg-a", name="vm-sys", tenant=t1, identity="system"
        )
        other = emu.add_vm(
            subscription=S3, resource_group="rg-x", name="vm-x", tenant=t1, identity="user"
        )
        connector = aiohttp.TCPConnector(ssl=client_ssl(st.gateway_ca_file))
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=20)
        ) as session:
            yield Harness(
                stack=st,
                session=session,
                keys=load_or_create_keys(workdir / "agent-keys"),
                cas=cas,
                vm=vm,
                neighbour=neighbour,
                system_vm=system_vm,
                other_sub_vm=other,
                other_tenant=t2,
            )
