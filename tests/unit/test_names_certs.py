"""The decided names, through the reference authority's real signing: what the X.509 and
SSH host certificates carry is what ``decide_names`` decided — and, with a SPIFFE trust
domain, the node's SPIFFE ID as a URI SAN. Real keys, a real CA, parsed certificates."""

from __future__ import annotations

import dataclasses
import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.agent.keys import load_or_create_keys
from gateway.authservice.app import AuthSettings
from gateway.authservice.authority import (
    HostAuthority,
    check_trust_domain,
    ensure_authorities,
    spiffe_id,
)
from gateway.cli import main
from gateway.join.names import NamePolicy, decide_names, parse_template
from gateway.protocol import HostParams, JoinBlock
from tests.unit.test_names import SUB, TENANT, VM_A, VM_ID

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)
# The same VM as the names table, with its Azure name in mixed case.
ATTRS = dataclasses.replace(VM_A, vm_name="Vm-A")
JOIN = JoinBlock(
    method="azure",
    tenant=TENANT,
    subscription=SUB,
    resource_group="kube",
    vm_id=VM_ID.upper(),
    resource_id=f"/subscriptions/{SUB}/resourceGroups/kube/providers/"
    "Microsoft.Compute/virtualMachines/Vm-A",
)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> HostAuthority:
    return HostAuthority.load(ensure_authorities(tmp_path_factory.mktemp("auth")))


@pytest.fixture(scope="module")
def node_host(tmp_path_factory: pytest.TempPathFactory) -> HostParams:
    keys = load_or_create_keys(tmp_path_factory.mktemp("node"))
    return HostParams(
        node_name="",
        role="Node",
        public_ssh_key=keys.public_ssh_key,
        public_tls_key=keys.public_tls_key,
        additional_principals=("VM-A.prod.internal", "10.0.0.4"),
        dns_names=("vm-a.kube.internal",),
    )


def _sans(pem: str) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_the_certificates_carry_exactly_the_decided_names(
    authority: HostAuthority, node_host: HostParams
) -> None:
    policy = NamePolicy(
        host_names=(
            parse_template("{vm_name}.prod.internal"),
            parse_template("{vm_name}.{resource_group}.internal"),
        ),
        host_ips="nic",
    )
    decided = decide_names(policy, ATTRS, node_host, nic_ips={ipaddress.ip_address("10.0.0.4")})
    result = authority.issue(
        host_id="host-1", host=decided.apply(node_host), now=NOW, ttl=timedelta(hours=1)
    )
    sans = _sans(result.tls_cert)
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "host-1",
        "vm-a",
        "vm-a.prod.internal",
        "vm-a.kube.internal",
    }
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.4")]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == []
    ssh = serialization.load_ssh_public_identity(result.ssh_cert.encode())
    assert isinstance(ssh, serialization.SSHCertificate)
    assert {p.decode() for p in ssh.valid_principals} == {
        "host-1",
        "vm-a",
        "vm-a.prod.internal",
        "vm-a.kube.internal",
        "10.0.0.4",
    }


def test_a_spiffe_trust_domain_adds_the_nodes_spiffe_id(
    authority: HostAuthority, node_host: HostParams
) -> None:
    uri = spiffe_id("cluster.example", JOIN)
    assert uri == f"spiffe://cluster.example/azure/{TENANT}/{SUB}/{VM_ID}"
    host = dataclasses.replace(node_host, additional_principals=(), dns_names=())
    host = decide_names(NamePolicy(), ATTRS, host).apply(host)
    result = authority.issue(
        host_id="host-2", host=host, now=NOW, ttl=timedelta(hours=1), uri_sans=(uri,)
    )
    assert _sans(result.tls_cert).get_values_for_type(x509.UniformResourceIdentifier) == [uri]


TRUST_DOMAINS = [
    ("a plain domain", "cluster.example", True),
    ("digits, dash and underscore", "prod-1_eu.example", True),
    ("upper case (the spec wants lowercase)", "Cluster.example", False),
    ("a scheme", "spiffe://cluster.example", False),
    ("a port", "cluster.example:443", False),
    ("a path", "cluster.example/x", False),
    ("empty", "", False),
    ("a Unicode letter", "clüster.example", False),
    ("256 characters", "a" * 256, False),
]


@pytest.mark.parametrize(
    ("value", "ok"), [c[1:] for c in TRUST_DOMAINS], ids=[c[0] for c in TRUST_DOMAINS]
)
def test_trust_domains_are_checked_per_the_spiffe_spec(value: str, ok: bool) -> None:
    if ok:
        assert check_trust_domain(value) == value
        assert AuthSettings(spiffe_trust_domain=value).spiffe_trust_domain == value
    else:
        with pytest.raises(ValueError):
            AuthSettings(spiffe_trust_domain=value)


def test_auth_serve_refuses_a_bad_trust_domain_at_start(tmp_path: Path) -> None:
    args = ["auth", "serve", "--data-dir", str(tmp_path), "--spiffe-trust-domain", "Bad/TD"]
    assert main(args) == 2
