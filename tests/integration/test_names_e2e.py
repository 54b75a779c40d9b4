"""Certificates name only what was verified, end to end: emulator, auth service (with a
SPIFFE trust domain) and gateway over real TLS.

Each VM joins over HTTPS; the certificates it gets are parsed with ``cryptography``: the
node name is the VM's Azure name (a uniform instance's ``<set>_<id>``) or the token's
template, extra names pass only when the token's ``host_names`` render them, IPs only
from the VM's own NIC as Resource Manager lists it, and the X.509 certificate carries the
node's SPIFFE ID. Every other name is ``403 name_not_allowed``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.authservice import AuthSettings
from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.joins import post_join

pytestmark = pytest.mark.asyncio(loop_scope="module")

SUB = "11111111-1111-1111-1111-111111111111"
TD = "cluster.test"

TOKENS = f"""
kind: token
version: v2
metadata:
  name: plain
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {SUB}
---
kind: token
version: v2
metadata:
  name: templated
spec:
  roles: [Node]
  join_method: azure
  azure:
    node_name: "{{vm_name}}.{{resource_group}}.internal"
    host_names: ["{{vm_name}}.prod.internal", "{{scale_set}}.pools.internal"]
    host_ips: nic
    allow:
      - subscription: {SUB}
"""


@dataclass
class Vms:
    web_a: EmulatedVm
    web_b: EmulatedVm
    pool_1: EmulatedVm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    async with dev_stack(
        tmp_path_factory.mktemp("names"),
        tokens_yaml=TOKENS,
        auth_settings=AuthSettings(spiffe_trust_domain=TD),
    ) as st:
        yield st


@pytest.fixture(scope="module")
def vms(stack: DevStack) -> Vms:
    emu = stack.emulator
    t = emu.add_tenant()
    pool = emu.add_scale_set(
        subscription=SUB, resource_group="uni", name="pool", tenant=t, capacity=2, identity="user"
    )
    return Vms(
        web_a=emu.add_vm(
            subscription=SUB, resource_group="App", name="Web-A", tenant=t, identity="system"
        ),
        web_b=emu.add_vm(
            subscription=SUB, resource_group="App", name="web-b", tenant=t, identity="system"
        ),
        pool_1=pool[1],
    )


@dataclass
class Issued:
    dns: set[str]
    ips: set[str]
    uris: list[str]
    ssh_principals: set[str]


async def _join(
    stack: DevStack, vm: EmulatedVm, keys: Path, token: str, **host: Any
) -> tuple[int, str | None, Issued | None]:
    status, data = await post_join(stack, vm, keys, token=token, host=host)
    if status != 200:
        return status, (data.get("error") or {}).get("code"), None
    cert = x509.load_pem_x509_certificate(data["certs"]["tls"].encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ssh = serialization.load_ssh_public_identity(data["certs"]["ssh"].encode())
    assert isinstance(ssh, serialization.SSHCertificate)
    return (
        status,
        None,
        Issued(
            dns=set(sans.get_values_for_type(x509.DNSName)),
            ips={str(ip) for ip in sans.get_values_for_type(x509.IPAddress)},
            uris=sans.get_values_for_type(x509.UniformResourceIdentifier),
            ssh_principals={p.decode() for p in ssh.valid_principals},
        ),
    )


def _names(issued: Issued | None) -> set[str]:
    """Every name the certificates carry except the host ID (a UUID the auth service
    mints)."""
    assert issued is not None
    return {n for n in issued.dns | issued.ssh_principals if len(n) != 36}


async def test_a_vm_that_asks_for_no_name_gets_its_azure_name(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    status, code, issued = await _join(stack, vms.web_a, tmp_path, "plain", node_name=None)
    assert (status, code) == (200, None)
    assert _names(issued) == {"web-a"}
    assert issued is not None and issued.ips == set()


async def test_the_x509_certificate_carries_the_spiffe_id(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    _, _, issued = await _join(stack, vms.web_a, tmp_path, "plain")
    assert issued is not None
    assert issued.uris == [
        f"spiffe://{TD}/azure/{vms.web_a.tenant}/{SUB}/{vms.web_a.vm_id.lower()}"
    ]


async def test_a_uniform_scale_set_instance_is_named_set_underscore_id(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    status, _, issued = await _join(stack, vms.pool_1, tmp_path, "plain", node_name=None)
    assert status == 200 and issued is not None
    # An underscore is no hostname character: an SSH principal, not a dNSName SAN.
    assert "pool_1" in issued.ssh_principals and "pool_1" not in issued.dns


async def test_a_template_token_gives_the_templated_name(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    status, _, issued = await _join(stack, vms.web_a, tmp_path, "templated", node_name=None)
    assert status == 200
    assert _names(issued) == {"web-a.app.internal"}


async def test_allowed_host_names_and_the_vms_own_nic_ip_appear_in_the_certificates(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    own_ip = vms.web_a.private_ips[0]
    before = stack.emulator.counters.get("arm.get_nic", 0)
    status, code, issued = await _join(
        stack,
        vms.web_a,
        tmp_path,
        "templated",
        node_name="web-a.app.internal",
        dns_names=["WEB-A.prod.internal"],
        additional_principals=[own_ip],
    )
    assert (status, code) == (200, None) and issued is not None
    assert _names(issued) == {"web-a.app.internal", "web-a.prod.internal", own_ip}
    assert issued.ips == {own_ip}
    # The NIC is read from Resource Manager once, then cached with the VM record.
    await _join(stack, vms.web_a, tmp_path, "templated", additional_principals=[own_ip])
    assert stack.emulator.counters.get("arm.get_nic", 0) - before == 1


async def test_a_scale_set_instances_nic_is_read_under_its_own_api_version(
    stack: DevStack, vms: Vms, tmp_path: Path
) -> None:
    own_ip = vms.pool_1.private_ips[0]
    status, code, issued = await _join(
        stack,
        vms.pool_1,
        tmp_path,
        "templated",
        node_name=None,
        dns_names=["pool.pools.internal", own_ip],
    )
    assert (status, code) == (200, None) and issued is not None
    assert issued.ips == {own_ip} and "pool.pools.internal" in issued.dns


REFUSED: list[tuple[str, str, dict[str, Any]]] = [
    ("another VM's name as node name", "plain", {"node_name": "web-b"}),
    ("another VM's name as a principal", "plain", {"additional_principals": ["web-b"]}),
    ("the auth service's name", "templated", {"dns_names": ["auth.cluster.internal"]}),
    ("localhost", "templated", {"dns_names": ["localhost"]}),
    ("loopback", "templated", {"additional_principals": ["127.0.0.1"]}),
    ("another VM's host name", "templated", {"dns_names": ["web-b.prod.internal"]}),
    ("an IP of another VM's NIC", "templated", {"additional_principals": ["<web_b ip>"]}),
    ("the VM's own IP when the token allows none", "plain", {"dns_names": ["<own ip>"]}),
    ("a name the default policy has no room for", "plain", {"dns_names": ["web-a.prod.internal"]}),
]


@pytest.mark.parametrize(("token", "host"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_names_outside_the_policy_are_refused(
    stack: DevStack, vms: Vms, tmp_path: Path, token: str, host: dict[str, Any]
) -> None:
    ips = {"<web_b ip>": vms.web_b.private_ips[0], "<own ip>": vms.web_a.private_ips[0]}
    host = {
        k: [ips.get(v, v) for v in vs] if isinstance(vs, list) else vs for k, vs in host.items()
    }
    assert ipaddress.ip_address(ips["<web_b ip>"]).is_private
    status, code, _ = await _join(stack, vms.web_a, tmp_path, token, **host)
    assert (status, code) == (403, "name_not_allowed")
