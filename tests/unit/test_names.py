"""Certificates name only what was verified (gateway/join/names.py): a table of requested
names, including every name the attack used, against the token's naming policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.config import ConfigError
from gateway.core.errors import Code, JoinRejected
from gateway.join.names import (
    HostNamePolicy,
    NodeNames,
    VerifiedNames,
    check_template,
    decide_names,
)
from gateway.join.rules import load_token_files

VM = VerifiedNames(
    vm_name="vm-a",
    resource_group="prod-rg",
    subscription="11111111-1111-1111-1111-111111111111",
    vm_id="5d06deb3-807b-46dd-aef5-78aaf9193f71",
    location="westeurope",
)
UNIFORM = VerifiedNames(
    vm_name="pool_3",
    resource_group="prod-rg",
    subscription=VM.subscription,
    vm_id=VM.vm_id,
    scale_set="pool",
    instance_id="3",
)
POLICY = HostNamePolicy(
    host_names=("{vm_name}.prod.internal", "{vm_name}.{resource_group}.internal")
)


ALLOWED: list[tuple[str, HostNamePolicy, VerifiedNames, str, list[str], list[str], NodeNames]] = [
    (
        "no names asked: the node is its Azure name",
        HostNamePolicy(),
        VM,
        "",
        [],
        [],
        NodeNames("vm-a", (), ()),
    ),
    (
        "asking for its own Azure name is fine (ASCII case ignored)",
        HostNamePolicy(),
        VM,
        "VM-A",
        [],
        [],
        NodeNames("vm-a", (), ()),
    ),
    (
        "a uniform scale-set instance is <set>_<id>",
        HostNamePolicy(),
        UNIFORM,
        "",
        [],
        [],
        NodeNames("pool_3", (), ()),
    ),
    (
        "a node_name template renders the verified attributes",
        HostNamePolicy(node_name="{vm_name}.{resource_group}.internal"),
        VM,
        "",
        [],
        [],
        NodeNames("vm-a.prod-rg.internal", (), ()),
    ),
    (
        "host_names templates allow those names",
        POLICY,
        VM,
        "",
        ["vm-a.prod.internal"],
        ["VM-A.prod-rg.internal"],
        NodeNames("vm-a", ("vm-a.prod.internal",), ("vm-a.prod-rg.internal",)),
    ),
]


@pytest.mark.parametrize(
    ("policy", "verified", "node", "principals", "dns", "expected"),
    [c[1:] for c in ALLOWED],
    ids=[c[0] for c in ALLOWED],
)
def test_allowed(
    policy: HostNamePolicy,
    verified: VerifiedNames,
    node: str,
    principals: list[str],
    dns: list[str],
    expected: NodeNames,
) -> None:
    got = decide_names(
        policy,
        verified,
        requested_node_name=node,
        requested_principals=principals,
        requested_dns_names=dns,
    )
    assert got == expected


REFUSED: list[tuple[str, str, list[str], list[str]]] = [
    ("another VM's node name (vm-b)", "vm-b", [], []),
    ("the auth service's name", "", [], ["auth.cluster.internal"]),
    ("localhost", "", ["localhost"], []),
    ("a private IP from the request", "", ["10.0.0.5"], []),
    ("a loopback IP", "", [], ["127.0.0.1"]),
    ("a link-local IPv6", "", ["fe80::1"], []),
    ("a wildcard", "", [], ["*.prod.internal"]),
    ("another VM's allowed pattern", "", ["vm-b.prod.internal"], []),
    ("an IDNA look-alike of an allowed name", "", ["xn--vm-a-9ua.prod.internal"], []),
    ("a Cyrillic a in an allowed name", "", ["vm-\u0430.prod.internal"], []),
    ("an overlong name", "", ["a" * 300], []),
    ("a label too long", "", [("b" * 64) + ".prod.internal"], []),
    ("too many names", "", ["vm-a.prod.internal"] * 40, []),
    ("a name with a space", "", ["vm-a .prod.internal"], []),
]


@pytest.mark.parametrize(
    ("node", "principals", "dns"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused(node: str, principals: list[str], dns: list[str]) -> None:
    with pytest.raises(JoinRejected) as info:
        decide_names(
            POLICY,
            VM,
            requested_node_name=node,
            requested_principals=principals,
            requested_dns_names=dns,
        )
    assert info.value.code == Code.NAME_NOT_ALLOWED
    assert info.value.status == 403


def test_a_template_that_renders_no_dns_name_issues_nothing() -> None:
    policy = HostNamePolicy(node_name="{vm_name} {resource_group}")
    with pytest.raises(JoinRejected) as info:
        decide_names(
            policy, VM, requested_node_name="", requested_principals=[], requested_dns_names=[]
        )
    assert info.value.code == Code.NAME_NOT_ALLOWED


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{vm_name}.internal", None),
        ("{hostname}.internal", "unknown field 'hostname'"),
        ("*.{vm_name}.internal", "no wildcards"),
        ("{vm_name", "not a template"),
    ],
    ids=["a known field", "an unknown field", "a wildcard", "a broken brace"],
)
def test_templates_are_checked_at_load(template: str, problem: str | None) -> None:
    found = check_template(template)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_the_token_file_carries_the_naming_policy(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "kind: token\nversion: v2\nmetadata: {name: t}\nspec:\n  roles: [Node]\n"
        "  join_method: azure\n  azure:\n"
        '    node_name: "{vm_name}.{resource_group}.internal"\n'
        '    host_names: ["{vm_name}.prod.internal"]\n'
        "    labels_from_tags: [env, team]\n"
        "    allow: [{subscription: 11111111-1111-1111-1111-111111111111}]\n"
    )
    (token,) = list(load_token_files([path]))
    assert token.names == HostNamePolicy(
        node_name="{vm_name}.{resource_group}.internal", host_names=("{vm_name}.prod.internal",)
    )
    assert token.labels_from_tags == ("env", "team")


def test_a_bad_template_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "kind: token\nversion: v2\nmetadata: {name: t}\nspec:\n  roles: [Node]\n"
        "  join_method: azure\n  azure:\n"
        '    host_names: ["*.{vm_name}.internal"]\n'
        "    allow: [{subscription: 11111111-1111-1111-1111-111111111111}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_token_files([path])
    assert str(info.value).startswith(f"{path}:8:") and "no wildcards" in str(info.value)
