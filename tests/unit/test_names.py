"""The name policy (gateway/join/names.py): certificates name only what was verified.

Tables, each case a sentence: what a VM may be named (templates over verified
attributes), which requested names and IPs pass, and every hostile name of the attack
that motivated it (another VM's name, the auth service's, localhost, an IP not on the
VM's NIC), wildcards, IDNA look-alikes, overlong names, and addresses no certificate
may carry even when a NIC has them. The token-file side is in
``tests/unit/test_rules.py``-style cases at the end (file:line errors).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.core.config import ConfigError
from gateway.core.errors import Code, JoinRejected
from gateway.join.names import (
    DecidedNames,
    NamePolicy,
    VmAttributes,
    decide_names,
    is_certifiable_name,
    parse_template,
    wants_nic_ips,
)
from gateway.join.rules import load_token_files
from gateway.protocol import HostParams

SUB = "22222222-2222-2222-2222-222222222222"
TENANT = "11111111-1111-1111-1111-111111111111"
VM_ID = "0f3e9f3c-58a1-4f2f-9a6d-2f1e6c1e7a10"

VM_A = VmAttributes(
    vm_name="vm-a",
    scale_set=None,
    instance_id=None,
    resource_group="kube",
    subscription=SUB,
    tenant=TENANT,
    location="westeurope",
    vm_id=VM_ID,
)
POOL_3 = VmAttributes(
    vm_name="pool_3",
    scale_set="pool",
    instance_id="3",
    resource_group="Kube-Prod",
    subscription=SUB,
    tenant=TENANT,
    location="westeurope",
    vm_id=VM_ID,
)
NIC = frozenset(
    ipaddress.ip_address(a)
    for a in ("10.0.0.4", "fd00::4", "127.0.0.1", "169.254.0.9", "fe80::1", "::1", "224.0.0.1")
)
OPEN = NamePolicy(
    host_names=(
        parse_template("{vm_name}.prod.internal"),
        parse_template("{vm_name}.{resource_group}.internal"),
    ),
    host_ips="nic",
)


def host(node_name: str = "", *, principals: tuple[str, ...] = (), dns: tuple[str, ...] = ()):
    return HostParams(
        node_name=node_name,
        role="Node",
        public_ssh_key="ssh-ed25519 AAAA",
        public_tls_key="tls",
        additional_principals=principals,
        dns_names=dns,
    )


def policy(node_name: str = "{vm_name}", *host_names: str, ips: bool = False) -> NamePolicy:
    return NamePolicy(
        node_name=parse_template(node_name),
        host_names=tuple(parse_template(h) for h in host_names),
        host_ips="nic" if ips else "none",
    )


# --- what is decided -------------------------------------------------------------------

ACCEPTED: list[tuple[str, NamePolicy, VmAttributes, HostParams, DecidedNames]] = [
    (
        "a VM that asks for no name is named after its Azure name",
        NamePolicy(),
        VM_A,
        host(),
        DecidedNames("vm-a"),
    ),
    (
        "a VM asking for its own name is accepted",
        NamePolicy(),
        VM_A,
        host("vm-a"),
        DecidedNames("vm-a"),
    ),
    (
        "a VM asking for its own name in another case gets the canonical lowercase name",
        NamePolicy(),
        VM_A,
        host("VM-A"),
        DecidedNames("vm-a"),
    ),
    (
        "a uniform scale-set instance is named <scale set>_<instance id>",
        NamePolicy(),
        POOL_3,
        host(),
        DecidedNames("pool_3"),
    ),
    (
        "a template renders verified attributes, lowercased",
        policy("{vm_name}.{resource_group}.internal"),
        POOL_3,
        host(),
        DecidedNames("pool_3.kube-prod.internal"),
    ),
    (
        "a template of scale set and instance",
        policy("{scale_set}-{instance_id}"),
        POOL_3,
        host("pool-3"),
        DecidedNames("pool-3"),
    ),
    (
        "host names the policy renders pass, as principal and as DNS name",
        OPEN,
        VM_A,
        host(principals=("vm-a.prod.internal",), dns=("VM-A.kube.internal",)),
        DecidedNames("vm-a", ("vm-a.prod.internal",), ("vm-a.kube.internal",)),
    ),
    (
        "the node name itself may be listed again",
        NamePolicy(),
        VM_A,
        host(dns=("vm-a",)),
        DecidedNames("vm-a", dns_names=("vm-a",)),
    ),
    (
        "a private IP of the VM's own NIC passes when the token allows NIC IPs",
        OPEN,
        VM_A,
        host(principals=("10.0.0.4",), dns=("fd00:0:0:0:0:0:0:4",)),
        DecidedNames("vm-a", ips=("10.0.0.4", "fd00::4")),
    ),
]


@pytest.mark.parametrize(
    ("pol", "attrs", "req", "expected"),
    [c[1:] for c in ACCEPTED],
    ids=[c[0] for c in ACCEPTED],
)
def test_decided_names(
    pol: NamePolicy, attrs: VmAttributes, req: HostParams, expected: DecidedNames
) -> None:
    assert decide_names(pol, attrs, req, nic_ips=NIC) == expected


# --- what is refused -------------------------------------------------------------------

REFUSED: list[tuple[str, NamePolicy, VmAttributes, HostParams, str]] = [
    # the attack, name by name
    ("another VM's node name", OPEN, VM_A, host("vm-b"), "vm-b"),
    ("another VM's name as a principal", OPEN, VM_A, host(principals=("vm-b",)), "vm-b"),
    (
        "another VM's templated host name",
        OPEN,
        VM_A,
        host(dns=("vm-b.prod.internal",)),
        "vm-b.prod.internal",
    ),
    (
        "the auth service's name",
        OPEN,
        VM_A,
        host(dns=("auth.cluster.internal",)),
        "auth.cluster.internal",
    ),
    ("localhost as a DNS name", OPEN, VM_A, host(dns=("localhost",)), "localhost"),
    ("localhost as the node name", OPEN, VM_A, host("localhost"), "localhost"),
    ("an IP not on the VM's NIC", OPEN, VM_A, host(principals=("10.0.0.5",)), "10.0.0.5"),
    (
        "an IP requested as a DNS name is still an IP",
        OPEN,
        VM_A,
        host(dns=("10.0.0.5",)),
        "10.0.0.5",
    ),
    (
        "the VM's own NIC IP when the token allows no IPs",
        policy("{vm_name}", "{vm_name}.prod.internal"),
        VM_A,
        host(principals=("10.0.0.4",)),
        "10.0.0.4",
    ),
    # addresses no certificate carries, even on a NIC
    ("IPv4 loopback, even on a NIC", OPEN, VM_A, host(principals=("127.0.0.1",)), "127.0.0.1"),
    ("IPv6 loopback, even on a NIC", OPEN, VM_A, host(principals=("::1",)), "::1"),
    (
        "IPv4 link-local (IMDS's range), even on a NIC",
        OPEN,
        VM_A,
        host(principals=("169.254.0.9",)),
        "169.254.0.9",
    ),
    ("IPv6 link-local, even on a NIC", OPEN, VM_A, host(principals=("fe80::1",)), "fe80::1"),
    ("a multicast address, even on a NIC", OPEN, VM_A, host(dns=("224.0.0.1",)), "224.0.0.1"),
    ("the unspecified IPv4 address", OPEN, VM_A, host(principals=("0.0.0.0",)), "0.0.0.0"),
    ("the unspecified IPv6 address", OPEN, VM_A, host(principals=("::",)), "::"),
    (
        "an IPv4-mapped IPv6 form of the NIC's address",
        OPEN,
        VM_A,
        host(principals=("::ffff:10.0.0.4",)),
        "::ffff:10.0.0.4",
    ),
    # wildcards and look-alikes
    ("a wildcard", OPEN, VM_A, host(principals=("*",)), "*"),
    ("a wildcard label", OPEN, VM_A, host(principals=("*.prod.internal",)), "*.prod.internal"),
    (
        "a punycode look-alike of the VM's host name",
        OPEN,
        VM_A,
        host(dns=("xn--vm-a-ss.prod.internal",)),
        "xn--vm-a-ss.prod.internal",
    ),
    (
        "the VM's host name with a trailing dot",
        OPEN,
        VM_A,
        host(principals=("vm-a.prod.internal.",)),
        "vm-a.prod.internal.",
    ),
]


@pytest.mark.parametrize(
    ("pol", "attrs", "req", "refused"),
    [c[1:] for c in REFUSED],
    ids=[c[0] for c in REFUSED],
)
def test_refused_names(pol: NamePolicy, attrs: VmAttributes, req: HostParams, refused: str) -> None:
    with pytest.raises(JoinRejected) as info:
        decide_names(pol, attrs, req, nic_ips=NIC)
    assert info.value.code is Code.NAME_NOT_ALLOWED
    # The message names the first refused name (the agent's log says which).
    assert repr(refused) in info.value.detail


def test_ips_are_refused_when_the_nics_were_not_read() -> None:
    with pytest.raises(JoinRejected) as info:
        decide_names(OPEN, VM_A, host(principals=("10.0.0.4",)), nic_ips=None)
    assert info.value.code is Code.NAME_NOT_ALLOWED


def test_the_first_refused_name_is_named() -> None:
    req = host(principals=("vm-a.prod.internal", "evil.example", "worse.example"))
    with pytest.raises(JoinRejected) as info:
        decide_names(OPEN, VM_A, req, nic_ips=NIC)
    assert "'evil.example'" in info.value.detail and "worse" not in info.value.detail


# --- names the VM's own attributes cannot produce --------------------------------------

HOSTILE_VM_NAMES = [
    ("a Kelvin sign that str.lower() would fold to k", "\u212aube"),
    ("fullwidth letters", "\uff56\uff4d-a"),
    ("a punycode label", "xn--kube-abc"),
    ("a reserved ??-- label", "ab--cd"),
    ("a label longer than 63", "a" * 64),
    ("a label starting with a hyphen", "-vm"),
    ("an all-numeric name a resolver reads as an IPv4 address", "10"),
    ("localhost", "LocalHost"),
    ("a name under localhost", "vm.localhost"),
]


@pytest.mark.parametrize(
    "vm_name", [n for _, n in HOSTILE_VM_NAMES], ids=[i for i, _ in HOSTILE_VM_NAMES]
)
def test_a_vm_whose_name_is_no_hostname_is_refused(vm_name: str) -> None:
    attrs = VmAttributes(**{**VM_A.__dict__, "vm_name": vm_name})
    with pytest.raises(JoinRejected) as info:
        decide_names(NamePolicy(), attrs, host(), nic_ips=None)
    assert info.value.code is Code.NAME_NOT_ALLOWED


def test_an_overlong_rendered_name_is_refused() -> None:
    # 4 labels of 63 plus dots: 255 characters > 253.
    pol = policy("{vm_name}." + ".".join(["a" * 63] * 3))
    attrs = VmAttributes(**{**VM_A.__dict__, "vm_name": "b" * 63})
    with pytest.raises(JoinRejected):
        decide_names(pol, attrs, host(), nic_ips=None)
    assert is_certifiable_name(".".join(["a" * 63] * 3) + "." + "b" * 61)  # 253: fine


def test_a_template_variable_the_vm_lacks_is_refused() -> None:
    # {scale_set} of a VM in no scale set: no name, rather than "-vm-a".
    with pytest.raises(JoinRejected):
        decide_names(policy("{scale_set}-{vm_name}"), VM_A, host(), nic_ips=None)


def test_a_host_name_pattern_the_vm_cannot_render_gives_no_name() -> None:
    pol = policy("{vm_name}", "{scale_set}.pools.internal")
    with pytest.raises(JoinRejected):
        decide_names(pol, VM_A, host(dns=(".pools.internal"[1:],)), nic_ips=None)
    got = decide_names(pol, POOL_3, host(dns=("pool.pools.internal",)), nic_ips=None)
    assert got.dns_names == ("pool.pools.internal",)


def test_nics_are_read_only_when_the_token_allows_ips_and_the_request_asks() -> None:
    assert wants_nic_ips(OPEN, host(principals=("10.0.0.4",)))
    assert not wants_nic_ips(OPEN, host(dns=("vm-a.prod.internal",)))
    assert not wants_nic_ips(NamePolicy(), host(principals=("10.0.0.4",)))


def test_decided_names_replace_the_requested_ones_in_the_registration() -> None:
    req = host("VM-A", principals=("VM-A.prod.internal", "10.0.0.4"))
    out = decide_names(OPEN, VM_A, req, nic_ips=NIC).apply(req)
    assert (out.node_name, out.additional_principals, out.dns_names) == (
        "vm-a",
        ("vm-a.prod.internal", "10.0.0.4"),
        (),
    )
    assert out.public_ssh_key == req.public_ssh_key


# --- templates at load time --------------------------------------------------------------

BAD_TEMPLATES = [
    ("an unknown placeholder", "{hostname}", "unknown placeholder {hostname}"),
    ("a request field as placeholder", "{node_name}.x", "unknown placeholder"),
    ("a wildcard", "*.{vm_name}.internal", "'*' is not allowed"),
    ("no placeholder: every VM would share the name", "auth.cluster.internal", "no placeholder"),
    ("an unbalanced brace", "{vm_name", "unbalanced brace"),
    ("a character no hostname has", "{vm_name}/x", "only letters"),
]


@pytest.mark.parametrize(
    ("text", "message"), [c[1:] for c in BAD_TEMPLATES], ids=[c[0] for c in BAD_TEMPLATES]
)
def test_bad_templates_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_template(text)
    assert message in str(info.value)


TOKEN = """\
kind: token
version: v2
metadata:
  name: names
spec:
  roles: [Node]
  join_method: azure
  azure:
{names}
    allow:
      - subscription: {sub}
"""


def _load(tmp_path: Path, names: str, *, vm_binding: bool = True):
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKEN.format(names=names, sub=SUB))
    return load_token_files([path], vm_binding=vm_binding)


def test_a_token_file_sets_the_policy(tmp_path: Path) -> None:
    token = _load(
        tmp_path,
        '    node_name: "{vm_name}.{resource_group}.internal"\n'
        '    host_names: ["{vm_name}.prod.internal"]\n'
        "    host_ips: nic\n",
    ).get("names")
    assert token.names.node_name.text == "{vm_name}.{resource_group}.internal"
    assert [t.text for t in token.names.host_names] == ["{vm_name}.prod.internal"]
    assert token.names.host_ips == "nic"
    assert "IPs: the private IPs" in token.names.describe()


def test_a_token_without_a_policy_names_the_vm_only(tmp_path: Path) -> None:
    token = _load(tmp_path, "").get("names")
    assert token.names == NamePolicy()
    assert token.names.describe() == "node name the VM's Azure name; no other names; no IPs"


@pytest.mark.parametrize(
    ("names", "line", "message"),
    [
        ('    node_name: "{hostname}"\n', 9, "unknown placeholder {hostname}"),
        ('    host_names:\n      - "{vm_name}.ok"\n      - "*.{vm_name}"\n', 11, "'*'"),
        ("    host_names: []\n", 9, "non-empty list"),
        ("    host_ips: yes\n", 9, "host_ips must be a string"),
        ("    host_ips: everything\n", 9, "host_ips must be one of none, nic"),
    ],
    ids=[
        "an unknown placeholder in node_name",
        "a wildcard host name, on its own line",
        "an empty host_names list",
        "a boolean host_ips",
        "an unknown host_ips source",
    ],
)
def test_token_file_errors_name_the_file_and_line(
    tmp_path: Path, names: str, line: int, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, names)
    assert str(info.value).startswith(f"{tmp_path / 'tokens.yaml'}:{line}:")
    assert message in str(info.value)


def test_resource_manager_placeholders_need_vm_binding(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="location"):
        _load(tmp_path, '    node_name: "{vm_name}.{location}"\n', vm_binding=False)
    with pytest.raises(ConfigError, match="host_ips"):
        _load(tmp_path, "    host_ips: nic\n", vm_binding=False)
